"""How fast the light commands start: wall time of `geoloc --help`, `profiles`, `index list`,
`db current` and `apikey list` (and a `locate` of a missing file), each in a fresh process,
alternating between this checkout and another one (``--old``: e.g. a `git worktree` of an
earlier commit) so that both are measured in the same minutes of a noisy machine.

    .venv/bin/python bench/startup.py [--old DIR] [--runs 5]

Each run is ``python -m service.cli ARGS`` with the checkout as working directory (it comes
first on sys.path), a fresh SQLite data dir and no other GEOLOC_* settings. Printed: a
markdown table of median seconds and whether torch was imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tilesets import command_line, machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    ("--help",),
    ("profiles",),
    ("index", "list"),
    ("db", "current"),
    ("apikey", "list"),
    ("locate", "missing.jpg"),
)
PROBE = (
    "import runpy, sys; sys.argv = ['geoloc', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('service.cli', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "finally:\n    print('@@torch' if 'torch' in sys.modules else '@@light', file=sys.stderr)\n"
)


def run(tree: Path, args: tuple[str, ...], data: Path) -> tuple[float, bool]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    env["GEOLOC_DATA_DIR"] = str(data)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=tree, env=env, capture_output=True, text=True
    )
    return time.perf_counter() - t0, "@@torch" in r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(machine_line())
    print(command_line())
    trees = {"this": ROOT, **({"old": args.old.resolve()} if args.old else {})}
    times: dict[tuple[str, str], list[float]] = {}
    heavy: dict[tuple[str, str], bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for cmd in COMMANDS:
                for label, tree in trees.items():  # alternating: the same load for both
                    s, torch = run(tree, cmd, Path(tmp) / label)
                    times.setdefault((label, " ".join(cmd)), []).append(s)
                    heavy[(label, " ".join(cmd))] = torch
    rows = []
    for cmd in COMMANDS:
        name = " ".join(cmd)
        row = [f"`geoloc {name}`"]
        for label in trees:
            t = statistics.median(times[(label, name)])
            row.append(f"{t:.2f} s{' (torch)' if heavy[(label, name)] else ''}")
        if "old" in trees:
            new, old = (statistics.median(times[(k, name)]) for k in ("this", "old"))
            row.append(f"{old / new:.1f}×")
        rows.append(row)
    head = ["command", "this checkout", *(["old", "old / this"] if "old" in trees else [])]
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
