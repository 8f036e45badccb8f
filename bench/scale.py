"""Large reference galleries: flat vs compressed (IVF-PQ) indexes on synthetic embeddings.

The vectors imitate real 512-d image embeddings rather than uniform noise: a mixture of
Gaussian clusters on the unit sphere with Zipf-distributed cluster sizes (a few popular
places hold many photos) and an anisotropic, power-law spectrum (real embeddings use a
few directions much more than others). They are generated in fixed chunks from seeded
streams, so a gallery of any size is produced (and re-produced for the exact ground
truth) chunk by chunk, never all at once. Queries are fresh draws from the same mixture:
new photos of known places.

For each size it builds the indexes through the project's own code (``publish_index``
for flat, ``publish_index_chunked`` for IVF-PQ with its float16 exact vectors on disk),
loads them as the service does (``load_index``: mmap) and reports build time, index
memory, single-query search latency p50/p95 and 1-recall@10 (the exact nearest
neighbour is among the 10 returned) against exact search computed in chunks, for each
nprobe and each re-ranking depth (``rerank_k``: the best PQ candidates re-scored with
the exact vectors; 0: PQ scores only).

Memory is the growth of the process's resident set from before the index is opened to
after the queries: it counts the pages of the memory-mapped index files that the
queries touched, not the operating system's file cache, through which the exact
vectors are read. Re-ranking reads rows of the exact vectors from disk, so each
setting with re-ranking is timed twice: ``p95 cold`` over fresh queries of its own,
never asked before in the run, with the vectors file evicted from the file cache
(each row they re-score is read from disk); then p50/p95 and recall over the common
queries once the rows they need are in the file cache.

    .venv/bin/python bench/scale.py --sizes 1000000 --nprobe 16,32,64 --rerank 0,128,256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index import store
from index.store import (
    EXACT_FILE,
    PointTable,
    VectorChunk,
    compressed_factory,
    exact_top_k,
    load_index,
    publish_index,
    publish_index_chunked,
    recall_1_at_k,
)

CHUNK = 100_000  # rows per generated chunk: the unit of the seeded streams


@dataclass(frozen=True)
class Mixture:
    """A clustered distribution of unit vectors shaped like real image embeddings."""

    dim: int = 512
    clusters: int = 20_000
    zipf: float = 1.0  # cluster popularity ~ 1 / rank**zipf
    spectrum: float = 0.6  # per-direction std ~ 1 / (1 + j)**spectrum
    spread: float = 0.75  # within-cluster noise relative to the centres' scale
    seed: int = 0

    def params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        scale = (1.0 + np.arange(self.dim)) ** -self.spectrum
        scale /= np.sqrt((scale**2).sum())
        basis, _ = np.linalg.qr(rng.normal(size=(self.dim, self.dim)))
        centres = (rng.normal(size=(self.clusters, self.dim)) * scale) @ basis.T
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        weights = 1.0 / (1.0 + np.arange(self.clusters)) ** self.zipf
        return centres.astype(np.float32), weights / weights.sum(), (scale, basis)

    def draw(self, n: int, stream: int, params: tuple) -> np.ndarray:
        centres, weights, (scale, basis) = params
        rng = np.random.default_rng([self.seed, 1, stream])
        which = rng.choice(len(centres), size=n, p=weights)
        noise = (rng.normal(size=(n, self.dim)) * scale) @ basis.T
        x = centres[which] + self.spread * noise.astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def gallery_chunks(mix: Mixture, params: tuple, n: int) -> Iterator[np.ndarray]:
    for i, start in enumerate(range(0, n, CHUNK)):
        yield mix.draw(min(CHUNK, n - start), stream=i, params=params)


def as_chunk(vecs: np.ndarray, start: int) -> VectorChunk:
    n = len(vecs)
    ids = np.arange(start, start + n, dtype=np.int64)
    latlon = np.zeros((n, 2))
    return VectorChunk(vecs, PointTable(ids=ids, latlon=latlon, country=np.full(n, "", "<U2")))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


@dataclass
class Row:
    size: int
    index: str
    nprobe: int | None
    rerank_k: int
    build_s: float
    disk_mib: float
    memory_mib: float
    p50_ms: float
    p95_ms: float
    p95_cold_ms: float | None
    recall_1_at_10: float


def evict(path: Path) -> None:
    """Drop a file's pages from the operating system's file cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(idx, queries: np.ndarray, nprobe: int | None, rerank_k: int) -> tuple[list, np.ndarray]:
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, rows = idx.search(q[None], 10, nprobe=nprobe, rerank_k=rerank_k)
        times.append((time.perf_counter() - t) * 1000)
        found.append(rows[0])
    return times, np.array(found)


def measured(
    root: Path,
    name: str,
    label: str,
    n: int,
    build: float,
    queries: np.ndarray,
    exact: np.ndarray,
    configs: list[tuple[int | None, int]],
    fresh: Iterator[np.ndarray],
) -> list[Row]:
    """One row per (nprobe, rerank_k), single-query searches, the index opened afresh;
    ``fresh`` gives each re-ranking setting its own never-asked queries for the cold p95."""
    disk = dir_mib(root / "indexes" / name)
    t = time.perf_counter()
    load_index(root, name)  # checksums verified once, as a service does at start-up
    print(f"[{n:,}] {label}: load with checksums {time.perf_counter() - t:.1f} s", file=sys.stderr)
    rows = []
    for nprobe, rerank_k in configs:
        gc.collect()
        before = rss_mib()
        idx = load_index(root, name, verify=False)
        cold = None
        idx.search(queries[:5], 10, nprobe=nprobe, rerank_k=0)  # warm the first lists' pages
        if idx.exact is not None and rerank_k:
            evict(idx.path / EXACT_FILE)
            times, _ = timed(idx, next(fresh), nprobe, rerank_k)
            cold = float(np.percentile(times, 95))
            timed(idx, queries, nprobe, rerank_k)  # their rows into the file cache
        times, found = timed(idx, queries, nprobe, rerank_k)
        rows.append(
            Row(
                n,
                label,
                nprobe,
                rerank_k if idx.exact is not None else 0,
                build,
                disk,
                rss_mib() - before,
                float(np.percentile(times, 50)),
                float(np.percentile(times, 95)),
                cold,
                recall_1_at_k(found, exact),
            )
        )
        print(asdict(rows[-1]), file=sys.stderr)
        del idx
    gc.collect()
    return rows


def run_size(args: argparse.Namespace, n: int, mix: Mixture, params: tuple) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="geoloc-scale-", dir=args.work_dir))
    rows: list[Row] = []
    try:
        queries = mix.draw(args.queries, stream=10**6, params=params)
        t = time.perf_counter()
        exact = exact_top_k(queries, gallery_chunks(mix, params, n), 10)
        print(f"[{n:,}] exact ground truth: {time.perf_counter() - t:.1f} s", file=sys.stderr)

        if n <= args.flat_max:
            t = time.perf_counter()
            vecs = np.concatenate(list(gallery_chunks(mix, params, n)))
            chunk = as_chunk(vecs, 0)
            publish_index(
                root,
                "flat",
                vecs,
                chunk.points,
                profile="bench",
                gallery_kind="images",
                h3_resolution=None,
                factory="Flat",
            )
            build = time.perf_counter() - t
            del vecs, chunk
            rows += measured(root, "flat", "Flat", n, build, queries, exact, [(None, 0)], iter(()))

        factory = args.factory or compressed_factory(n, mix.dim)
        rng = np.random.default_rng(1)
        train_n = min(args.train, n)
        train = np.concatenate(list(gallery_chunks(mix, params, min(n, 4 * train_n))))
        train = train[rng.choice(len(train), size=train_n, replace=False)]

        def chunks() -> Iterator[VectorChunk]:
            for i, x in enumerate(gallery_chunks(mix, params, n)):
                yield as_chunk(x, i * CHUNK)

        t = time.perf_counter()
        m = publish_index_chunked(
            root,
            "ivfpq",
            chunks,
            count=n,
            dim=mix.dim,
            train_vectors=train,
            profile="bench",
            gallery_kind="images",
            factory=factory,
            device=args.device,
            recall_queries=args.manifest_recall_queries,
            nprobe=args.nprobe[len(args.nprobe) // 2],
            rerank_k=sorted(args.rerank)[len(args.rerank) // 2],
        )
        build = time.perf_counter() - t
        del train
        print(f"[{n:,}] {factory}: {json.dumps(m.extra)}", file=sys.stderr)
        configs = [(p, r) for p in args.nprobe for r in args.rerank]
        fresh = (mix.draw(args.queries, stream=10**6 + 1 + i, params=params) for i in count())
        rows += measured(root, "ivfpq", factory, n, build, queries, exact, configs, fresh)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    out = [
        "| vectors | index | nprobe | rerank_k | build s | on disk MiB | memory MiB "
        "| p50 ms | p95 ms | p95 cold ms | 1-recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cold = "-" if r.p95_cold_ms is None else f"{r.p95_cold_ms:.2f}"
        out.append(
            f"| {r.size:,} | {r.index} | {r.nprobe or '-'} | {r.rerank_k or '-'} | "
            f"{r.build_s:.0f} | {r.disk_mib:,.0f} | {r.memory_mib:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p95_ms:.2f} | {cold} | {r.recall_1_at_10:.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000", help="comma-separated gallery sizes")
    ap.add_argument("--queries", type=int, default=300, help="queries (exact truth each)")
    ap.add_argument("--nprobe", default="16,32,64", help="comma-separated nprobe values")
    ap.add_argument(
        "--rerank",
        default="0,128,256",
        help="comma-separated re-ranking depths (0: PQ scores only); the middle one is the "
        "index's own, its manifest recall measured there",
    )
    ap.add_argument("--factory", default="", help="faiss factory; default compressed_factory()")
    ap.add_argument("--train", type=int, default=200_000, help="training sample size")
    ap.add_argument("--flat-max", type=int, default=1_000_000, help="largest size with Flat")
    ap.add_argument("--manifest-recall-queries", type=int, default=100)
    ap.add_argument("--device", default="auto", help="faiss device: auto, cpu or gpu")
    ap.add_argument("--clusters", type=int, default=Mixture.clusters)
    ap.add_argument("--work-dir", default=None, help="where the indexes are built (deleted)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument(
        "--quantizer-ef",
        type=int,
        default=store.QUANTIZER_EF,
        help="floor of the HNSW coarse quantizer's efSearch, which is max(floor, 2*nprobe)",
    )
    args = ap.parse_args()
    store.QUANTIZER_EF = args.quantizer_ef
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    args.rerank = [int(x) for x in args.rerank.split(",")]
    mix = Mixture(clusters=args.clusters)
    params = mix.params()
    rows: list[Row] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(args, n, mix, params)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else table(rows))
    print(f"machine: {os.cpu_count()} cores", file=sys.stderr)


if __name__ == "__main__":
    main()
