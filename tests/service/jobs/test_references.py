"""`geoloc images add` as a resumable job: CSV/Parquet input, shards, bad rows, Ray."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoders import load_model
from encoders.bluemarble import TileStyle, write_tileset
from encoders.model import resolve_device
from encoders.structure import colour_thumbnails, structure_descriptors
from index.store import (
    COLOUR_FILE,
    EXACT_FILE,
    STRUCTURE_FILE,
    WIDTH_FILE,
    list_indexes,
    load_index,
)
from service.config import Settings
from service.errors import GeolocError, InputImageError
from service.jobs.datasets import DatasetError
from service.jobs.indexes import add_reference_images
from service.jobs.references import (
    ShardEncoder,
    choose_runner,
    prepare_job,
    read_reference_table,
    read_uri,
)

ROOT = Path(__file__).resolve().parents[3]
GEOLOC = [sys.executable, "-m", "service.cli.main"]
STYLE = TileStyle(size=32, scale=(1.5, 1.5), augment=False)


def _tiles(out: Path, n: int, seed: int = 3) -> Path:
    """n rendered Blue Marble tiles and a table id,uri,lat,lon,width_km with three bad rows
    added: a latitude out of range, a missing file and a file that is not an image."""
    labels = write_tileset(out, n, seed=seed, style=STYLE)
    rows = list(csv.DictReader(labels.open()))
    (out / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    table = out / "refs.csv"
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "uri", "lat", "lon", "width_km"])
        for i, r in enumerate(rows):
            w.writerow([100 + i, r["image"], r["lat"], r["lon"], r["width_km"]])
        w.writerow([900, rows[0]["image"], "95.5", "10", ""])
        w.writerow([901, "gone.jpg", "10", "10", ""])
        w.writerow([902, "broken.jpg", "1", "2", ""])
    return table


def _without_ids(table: Path) -> Path:
    lines = table.read_text().splitlines()
    table.write_text("\n".join(",".join(li.split(",")[1:]) for li in lines) + "\n")
    return table


@pytest.fixture(scope="module")
def model():
    return load_model("bluemarble")


# -- the input table ---------------------------------------------------------------------------


def test_csv_and_parquet_tables_give_the_same_rows_and_bad_rows(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text(
        "ID,Url,Latitude,Lng\n"
        "1,a.jpg,10.5,20\n"
        "2,b.jpg,91,0\n"  # latitude out of range
        "x,c.jpg,1,1\n"  # id is not an integer
        "1,d.jpg,1,1\n"  # duplicate id
        "4,,1,1\n"  # no image
        "5,file:///abs/e.jpg,nan,1\n"  # not a number
        "6,sub/f.jpg,-33.9,151.2\n"
    )
    table, bad = read_reference_table(src)
    assert table.uri == ["a.jpg", "sub/f.jpg"]
    assert table.id.tolist() == [1, 6] and table.row.tolist() == [1, 7]
    np.testing.assert_allclose(table.lat, [10.5, -33.9])
    assert [(b.row, b.id) for b in bad] == [(2, "2"), (3, "x"), (4, "1"), (5, "4"), (6, "5")]
    assert "not a valid (lat, lon)" in bad[0].reason
    assert "not an integer" in bad[1].reason
    assert "duplicate id 1 (first on row 1)" in bad[2].reason
    assert "empty image uri" in bad[3].reason
    assert "not numbers" in bad[4].reason

    parquet = tmp_path / "t.parquet"
    pq.write_table(
        pa.table(
            {
                "id": [1, 2, 6],
                "uri": ["a.jpg", "b.jpg", "sub/f.jpg"],
                "lat": [10.5, 91.0, -33.9],
                "lon": [20.0, 0.0, 151.2],
            }
        ),
        parquet,
    )
    ptable, pbad = read_reference_table(parquet)
    assert ptable.uri == ["a.jpg", "sub/f.jpg"] and ptable.id.tolist() == [1, 6]
    assert [b.row for b in pbad] == [2]


def test_a_table_without_the_needed_columns_is_refused(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text("name,lat\nx,1\n")
    with pytest.raises(DatasetError, match="lack an image column"):
        read_reference_table(src)
    with pytest.raises(DatasetError, match="no such file"):
        read_reference_table(tmp_path / "nope.parquet")


def test_uris_paths_and_file_urls(tmp_path):
    (tmp_path / "a b.jpg").write_bytes(b"12345")
    assert read_uri("a b.jpg", tmp_path, 100) == b"12345"
    assert read_uri((tmp_path / "a b.jpg").as_uri(), Path("/elsewhere"), 100) == b"12345"
    assert read_uri("a b.jpg", tmp_path, 2) == b"123"  # at most max_bytes + 1
    with pytest.raises(InputImageError, match="no such file"):
        read_uri("missing.jpg", tmp_path, 100)
    with pytest.raises(InputImageError, match="cannot read"):
        read_uri("nosuchscheme://host/x.jpg", tmp_path, 100)


def test_runner_selection():
    assert choose_runner("auto", 10, ray_min_rows=100, ray_address="") == "inprocess"
    assert choose_runner("auto", 100, ray_min_rows=100, ray_address="") == "ray"
    assert choose_runner("auto", 10, ray_min_rows=100, ray_address="ray://head:10001") == "ray"
    assert choose_runner("inprocess", 10**9, ray_min_rows=100, ray_address="") == "inprocess"
    assert choose_runner("ray", 1, ray_min_rows=100, ray_address="") == "ray"
    with pytest.raises(ValueError, match="unknown runner"):
        choose_runner("spark", 1, ray_min_rows=100, ray_address="")


def test_encoder_device_selection():
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cuda:1", cuda_available=True) == "cuda:1"
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        resolve_device("cuda", cuda_available=False)
    # This machine decides 'auto' by what torch sees.
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


# -- in-process jobs ---------------------------------------------------------------------------


def test_in_process_job_resumes_reports_bad_rows_and_publishes_once(tmp_path, model):
    table = _tiles(tmp_path / "tiles", 45)
    s = Settings(data_dir=tmp_path / "data", refs_shard_rows=10)
    # A first run that stopped after one shard: that shard's files and marker exist.
    job, _ = prepare_job(
        s.data_dir / "jobs",
        table,
        index_name="refs-bluemarble",
        profile="bluemarble",
        checkpoint=None,
        weights=model.weights_id,
        shard_rows=10,
    )
    assert job.n_shards == 5 and job.n_rows == 47  # 45 tiles + the 2 rows with bad images
    ShardEncoder(_spec(s), str(job.dir), model=model).encode_shard(0)
    first = job.done_file(0).stat().st_mtime_ns

    r = add_reference_images(s, table, model=model, progress=False)
    assert r.runner == "inprocess" and r.resumed_shards == 1
    assert job.done_file(0).stat().st_mtime_ns == first  # the finished shard was not redone
    assert r.manifest.count == 45 and r.manifest.factory == "Flat"
    assert len(r.problems) == 3
    bad = list(csv.DictReader((r.report.parent / "bad_rows.csv").open()))
    assert [(b["row"], b["id"]) for b in bad] == [("46", "900"), ("47", "901"), ("48", "902")]
    assert "file-not-found" in bad[1]["reason"] and "corrupt-image" in bad[2]["reason"]
    report = json.loads(r.report.read_text())
    assert report["bad_rows"] == 3 and report["embedded"] == 45

    # The index holds the images under their ids, embedded as the model embeds them.
    idx = load_index(s.index_dir, "refs-bluemarble")
    ids = np.asarray(idx.points.ids)
    assert sorted(ids.tolist()) == list(range(100, 145))
    from PIL import Image

    rows = list(csv.DictReader(table.open()))
    want = model.embed_images([Image.open(table.parent / rows[i]["uri"]) for i in (0, 44)])
    got = idx.vectors(np.array([ids.tolist().index(100), ids.tolist().index(144)]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # ... with the structure descriptors verification compares, row for row.
    assert STRUCTURE_FILE in r.manifest.files
    pics = [Image.open(table.parent / rows[i]["uri"]) for i in (0, 44)]
    got = np.asarray(idx.points.structure)[[ids.tolist().index(100), ids.tolist().index(144)]]
    np.testing.assert_array_equal(got, structure_descriptors(pics))
    # ... and their colour thumbnails.
    assert COLOUR_FILE in r.manifest.files
    got = np.asarray(idx.points.colour)[[ids.tolist().index(100), ids.tolist().index(144)]]
    np.testing.assert_array_equal(got, colour_thumbnails(pics))
    # ... and the width of ground each view shows (32 px of 1.5 map pixels at 15 per degree).
    assert WIDTH_FILE in r.manifest.files
    stored = np.asarray(idx.points.width)
    want = np.array([float(row["width_km"]) for row in rows[:45]])
    np.testing.assert_allclose(stored[np.argsort(ids)], want, rtol=1e-6)
    assert abs(want[0] - 32 * 1.5 * 40075 / 360 / 15) < 0.1

    # Running the same command again adds nothing: the job was published.
    again = add_reference_images(s, table, model=model, progress=False)
    assert again.already_published and again.manifest.version == r.manifest.version
    assert len(list_indexes(s.index_dir, "refs-bluemarble")) == 1


def test_a_second_table_adds_to_the_index_and_can_compress_it(tmp_path, model):
    s = Settings(
        data_dir=tmp_path / "data",
        refs_shard_rows=16,
        compressed_min_rows=60,
        index_train_size=1000,
        index_nprobe=4,
        index_recall_queries=20,
    )
    first = add_reference_images(s, _tiles(tmp_path / "a", 40, seed=1), model=model, progress=False)
    assert first.manifest.factory == "Flat" and first.manifest.count == 40
    # Without ids in the second table, the new rows take the next free ids.
    src = _without_ids(_tiles(tmp_path / "b", 30, seed=2))
    r = add_reference_images(s, src, model=model, progress=False, factory="IVF4,PQ16x4")
    m = r.manifest
    assert m.count == 70 and m.factory == "IVF4,PQ16x4" and m.extra["on_disk"] is True
    assert m.extra["recall_nprobe"] == 4 and 0 < m.extra["recall_at_10"] <= 1
    idx = load_index(s.index_dir, "refs-bluemarble", m.version)
    assert sorted(np.asarray(idx.points.ids).tolist()) == [*range(100, 140), *range(140, 170)]

    assert m.extra["rerank_k"] == s.index_rerank_k and idx.exact is not None

    # The compressed index kept its exact vectors, so a third table is added to it: the new
    # version holds every image, the old ones with the vectors they had.
    third = _without_ids(_tiles(tmp_path / "c", 10, seed=3))
    m3 = add_reference_images(s, third, model=model, progress=False, factory="IVF4,PQ16x4")
    idx3 = load_index(s.index_dir, "refs-bluemarble", m3.manifest.version)
    assert m3.manifest.count == 80 and m3.manifest.extra["rerank_k"] > 0
    assert sorted(np.asarray(idx3.points.ids).tolist()) == list(range(100, 180))
    np.testing.assert_array_equal(idx3.vectors(np.arange(70)), idx.vectors(np.arange(70)))
    np.testing.assert_array_equal(
        np.asarray(idx3.points.structure)[:70], np.asarray(idx.points.structure)
    )
    np.testing.assert_array_equal(np.asarray(idx3.points.width)[:70], idx.points.width)
    np.testing.assert_array_equal(np.asarray(idx3.points.colour)[:70], idx.points.colour)
    assert np.asarray(idx3.points.colour)[70:].any(axis=1).all()
    assert np.isfinite(idx3.points.width).all()
    assert np.asarray(idx3.points.structure).any(axis=1).mean() > 0.8  # flat sea: zeros

    # One that kept only codes refuses a further table with a clear error, and the served
    # version stays.
    codes_only = s.model_copy(update={"index_rerank_k": 0})
    for table, factory in ((tmp_path / "a" / "refs.csv", ""), (src, "IVF4,PQ16x4")):
        add_reference_images(
            codes_only, table, model=model, name="codes", progress=False, factory=factory
        )
    assert EXACT_FILE not in list_indexes(s.index_dir, "codes")[-1].files
    with pytest.raises(GeolocError, match="without its exact vectors"):
        add_reference_images(codes_only, third, model=model, name="codes", progress=False)
    assert len(list_indexes(s.index_dir, "codes")) == 2


def _spec(s: Settings):
    from service.jobs.references import EncoderSpec

    return EncoderSpec(
        profile="bluemarble",
        checkpoint=None,
        backbone_checkpoint=None,
        device="cpu",
        batch_size=16,
        limits=s.image_limits(),
    )


# -- Ray ---------------------------------------------------------------------------------------


def _done(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("jobs/*/out/*.done"))


def test_ray_job_killed_half_way_resumes_and_reports_bad_rows(tmp_path):
    """A real local Ray (2 CPUs, one encoder actor) on 300 rendered tiles in 30 shards: the
    first run is SIGKILLed once some shards are done, the rerun finishes the rest only."""
    pytest.importorskip("ray")
    table = _tiles(tmp_path / "tiles", 297)
    data = tmp_path / "data"
    env = {
        **os.environ,
        "GEOLOC_DATA_DIR": str(data),
        "GEOLOC_RAY_NUM_CPUS": "2",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    cmd = [*GEOLOC, "images", "add", str(table), "--runner", "ray", "--shard-rows", "10"]
    cmd += ["--actors", "1", "--batch-size", "5"]
    first = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: Ray's processes die with it
    )
    try:
        deadline = time.monotonic() + 240
        while len(_done(data)) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_with = len(_done(data))
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(30)
        _kill_session(first.pid)
    assert 3 <= killed_with < 30, f"{killed_with} shards were done when the job was killed"
    before = {p.name: p.stat().st_mtime_ns for p in _done(data)}
    assert not list_indexes(data)  # nothing published by the killed run

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = second.stdout + second.stderr
    assert second.returncode == 1, out  # 1: bad rows were reported
    assert f"resumed {len(before)} finished shards" in out, out
    after = {p.name: p.stat().st_mtime_ns for p in _done(data)}
    assert len(after) == 30
    assert all(after[name] == t for name, t in before.items())  # finished shards were kept
    assert "300 reference images" not in out and "297 reference images" in out, out
    assert "(ray, resumed" in out
    bad = list(csv.DictReader(next(data.glob("jobs/*/bad_rows.csv")).open()))
    assert [b["id"] for b in bad] == ["900", "901", "902"]
    idx = load_index(data, "refs-bluemarble")
    assert len(idx) == 297 and sorted(np.asarray(idx.points.ids).tolist()) == list(range(100, 397))


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of the processes the killed job started (its session)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, s = (int(x) for x in line.split())
        if s == sid and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_nprobe_per_request_is_bounded_by_the_setting():
    from service.api.operations import locate_options
    from service.api.schemas import LocateRequestOptions
    from service.errors import InvalidOptionError

    s = Settings(max_nprobe=256)
    assert s.locate_options().nprobe == 0  # the index's own
    assert locate_options(s, LocateRequestOptions(nprobe=200)).nprobe == 200
    with pytest.raises(InvalidOptionError, match="nprobe must be between 1 and 256"):
        locate_options(s, LocateRequestOptions(nprobe=257))
    with pytest.raises(ValueError):
        LocateRequestOptions(nprobe=0)


def test_rerank_k_per_request_is_bounded_by_the_setting():
    from service.api.operations import locate_options
    from service.api.schemas import LocateRequestOptions
    from service.errors import InvalidOptionError

    s = Settings(max_rerank_k=500)
    assert s.locate_options().rerank_k is None  # the index's own
    assert locate_options(s, LocateRequestOptions(rerank_k=0)).rerank_k == 0  # off
    assert locate_options(s, LocateRequestOptions(rerank_k=500)).rerank_k == 500
    with pytest.raises(InvalidOptionError, match=r"rerank_k must be between 0 \(off\) and 500"):
        locate_options(s, LocateRequestOptions(rerank_k=501))
    with pytest.raises(ValueError):
        LocateRequestOptions(rerank_k=-1)
    with pytest.raises(InvalidOptionError, match="rerank_k"):
        Settings(rerank_k=600, max_rerank_k=500).locate_options()


def test_two_adds_to_one_index_never_both_run(tmp_path, model):
    """`geoloc images add` holds the build lock of its index as `index build` does: while one
    add to refs-bluemarble runs, a second is refused at once, and nothing is lost."""
    from service.db import IndexBuildLockedError, index_build_lock

    table = _tiles(tmp_path / "tiles", 12)
    s = Settings(data_dir=tmp_path / "data", refs_shard_rows=10)
    busy = pytest.raises(IndexBuildLockedError, match="another build of index 'refs-bluemarble'")
    with index_build_lock(s.db_url, "refs-bluemarble"), busy:  # the first add, still running
        add_reference_images(s, table, model=model, progress=False)
    assert list_indexes(s.index_dir, "refs-bluemarble") == []
    r = add_reference_images(s, table, model=model, progress=False)
    assert r.manifest.count == 12
