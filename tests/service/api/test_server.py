"""The replica's shutdown (service/api/server.py) with real sockets: a connection made while the
listener closes is either served or refused (safe to retry elsewhere), never reset after its
request was written."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from service.api.server import STARTUP_FAILED, accept_queue_length, refuse_new_connections
from tests.deploy.cluster import ROOT
from tests.net import free_port

HEAD = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
REQUEST = HEAD + b"a" * 1000


def _outcome(port: int) -> str:
    """One request on a new connection, as nginx sends it: connect, write it whole, read."""
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "connect timeout"
    with conn:
        try:
            conn.sendall(REQUEST)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        except OSError as exc:
            return f"lost after writing ({type(exc).__name__})"
    if data.startswith(b"HTTP/1.1 200"):
        return "ok"
    return "closed without an answer" if not data else "bad answer"


def _storm(port: int, stop: threading.Event, counts: Counter[str], lock: threading.Lock) -> None:
    deadline = time.monotonic() + 30
    while not stop.is_set() and time.monotonic() < deadline:
        outcome = _outcome(port)
        with lock:
            counts[outcome] += 1
        if outcome == "refused":
            time.sleep(0.005)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the listener filter is Linux's")
@pytest.mark.parametrize("trial", range(3))
def test_sigterm_resets_no_connection_that_was_sent_a_request(trial: int) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.service.drain_app", str(port)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while _outcome(port) != "ok":
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        counts: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        clients = [
            threading.Thread(target=_storm, args=(port, stop, counts, lock)) for _ in range(8)
        ]
        for t in clients:
            t.start()
        time.sleep(0.5)
        with lock:
            before = counts["ok"]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        time.sleep(0.3)
        stop.set()
        for t in clients:
            t.join(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    print(f"\nSIGTERM during a connection storm: {dict(counts)}")
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    assert before > 0 and counts["ok"] > before  # served during the drain too
    assert set(counts) <= {"ok", "refused"}, counts


def test_listener_filter_refuses_new_connections_and_keeps_queued_ones() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()
        queued = socket.create_connection(address)
        assert refuse_new_connections(listener)
        assert accept_queue_length(listener) == 1
        with pytest.raises(TimeoutError):  # the attempt is dropped, not completed
            socket.create_connection(address, timeout=0.3)
        queued.sendall(b"still here")
        accepted, _ = listener.accept()
        assert accepted.recv(64) == b"still here"
        assert accept_queue_length(listener) == 0
        accepted.close()
        queued.close()
    with socket.socket(socket.AF_UNIX) as unix:
        assert not refuse_new_connections(unix)  # not a TCP listener: left alone


def test_workers_that_cannot_start_stop_the_replica(tmp_path) -> None:
    """With GEOLOC_WORKERS=2 and a data dir that is a file, each worker fails its start-up
    (its lifespan cannot open the database): the supervisor exits with the start-up failure
    code and does not start them again and again."""
    port = free_port()
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file")
    env = {"PATH": "/usr/bin:/bin", "GEOLOC_DATA_DIR": str(not_a_dir), "GEOLOC_WORKERS": "2"}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "serve", "--port", str(port), "--no-migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == STARTUP_FAILED, output[-3000:]
    assert "could not start; stopping" in output, output[-3000:]
    assert output.count("Started server process") == 2, output[-3000:]  # never restarted
    assert time.monotonic() - t0 < 100


def test_workers_share_the_cores(monkeypatch, tmp_path) -> None:
    """Each of N workers gets cores // N threads (at least one) for torch and the OpenMP/BLAS
    pools, unless the operator set them; a CPU quota caps the cores."""
    from service.api import server
    from service.config import Settings

    for var in server._POOL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(server, "available_cores", lambda: 8)
    s = server.share_threads(Settings(data_dir=tmp_path), 3)
    assert (s.torch_threads, s.workers) == (2, 3)
    assert all(os.environ[v] == "2" for v in server._POOL_VARS)

    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    s = server.share_threads(Settings(data_dir=tmp_path, torch_threads=4), 16)
    assert s.torch_threads == 4 and os.environ["OMP_NUM_THREADS"] == "5"
    assert os.environ["MKL_NUM_THREADS"] == "2"  # set by the first call, kept

    monkeypatch.undo()
    assert 1 <= server.available_cores() <= (os.cpu_count() or 1)
