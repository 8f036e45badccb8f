"""Runs `geoloc ...` commands in forked children of one process that has already imported
geoloc, so that each run costs the command's own work, not seconds of imports, and can be
SIGKILLed at a chosen moment. The children run the real CLI code (service.cli.main.app).

Protocol: one JSON object per stdin line, ``{"args": [...], "kill_after": seconds|null,
"counted_from": glob|null, "log": path}``; one JSON line back per command, ``{"pid",
"status", "killed", "seconds", "started_at", "anchored_after"}``: status is the exit code, or
minus the signal that ended the child; started_at the wall-clock time of the fork. With
counted_from, the parent watches for a path matching that glob that did not exist at the fork:
anchored_after is the seconds from the fork to its appearance (null: it never appeared), and
kill_after counts from that moment, so that a kill lands at a chosen point of the command's
own progress however fast the machine runs it.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time

import numpy as np

import service.db
import service.engine.loading
import service.jobs.indexes  # noqa: F401  (the imports are the point: paid once, before any fork)
from index.geocode import ReverseGeocoder
from service.cli.main import app


def run(
    args: list[str], kill_after: float | None, log: str, counted_from: str | None = None
) -> dict[str, object]:
    t0 = time.monotonic()
    started_at = time.time()
    existing = set(glob.glob(counted_from)) if counted_from else set()
    pid = os.fork()
    if pid == 0:  # the child: the CLI, output to the log
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            app(args, prog_name="geoloc")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 70
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    killed, anchored_after = False, None
    reaped, wstatus = 0, 0
    while counted_from and not reaped:
        if set(glob.glob(counted_from)) - existing:
            anchored_after = time.monotonic() - t0
            break
        reaped, wstatus = os.waitpid(pid, os.WNOHANG)
        time.sleep(0.002)
    if kill_after is not None and not reaped:
        deadline = t0 + (anchored_after or 0.0) + kill_after
        while time.monotonic() < deadline:
            reaped, wstatus = os.waitpid(pid, os.WNOHANG)
            if reaped:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            killed = True
    if not reaped:
        _, wstatus = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wstatus)
    return {
        "pid": pid,
        "status": status,
        "killed": killed,
        "seconds": time.monotonic() - t0,
        "started_at": started_at,
        "anchored_after": anchored_after,
    }


def main() -> None:
    # The reverse geocoder's tables are module-level caches: load them once, here.
    ReverseGeocoder().country_codes(np.zeros((1, 2)))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        reply = run(
            request["args"], request.get("kill_after"), request["log"], request.get("counted_from")
        )
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
