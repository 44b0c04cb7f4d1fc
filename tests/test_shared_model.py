"""gunicorn with two workers loads the model and the catalog names once, in the master before
the fork, and both workers serve that one copy; a load that fails there leaves a running,
not-ready service."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from service_support import ServiceProcess, prepare_database, tiny_checkpoint, wait_until

pytestmark = pytest.mark.slow

LOADED = re.compile(r"\[(\d+)\] \[INFO\] bert4musicrec\.service: loaded model (\S+) in .* "
                    r"before forking the workers \(pid (\d+)\)")
NAMES_BEFORE_FORK = re.compile(r"\[(\d+)\] \[INFO\] bert4musicrec\.service: cached names of "
                               r"(\d+) songs in .* before forking the workers")
NAMES_IN_WORKER = re.compile(r"cached names of \d+ songs$", re.MULTILINE)
SERVING = re.compile(r"serving model (\S+) loaded before the fork by process (\d+) \(pid (\d+)\)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch tiny model trained on the demo data."""
    return tiny_checkpoint(tmp_path_factory.getbasetemp() / "shared-model")


@pytest.fixture(scope="module")
def demo_dsn(module_pg_dsn: str) -> str:
    """A database holding the schema, the service function and the demo tables."""
    prepare_database(module_pg_dsn)
    return module_pg_dsn


def two_workers(dsn: str, model: Path, log_path: Path) -> ServiceProcess:
    """The service with two worker processes, logging at info level."""
    return ServiceProcess({
        "DATABASE_URL": dsn, "MODEL_PATH": str(model), "WORKERS": "2", "THREADS": "4",
        "JOB_THREADS": "1", "TORCH_THREADS": "1", "API_TOKEN": "", "CATALOG_DIR": "",
        "LOG_LEVEL": "info"}, log_path).start()


def ready(service: ServiceProcess) -> bool:
    """True when /ready answers 200 (False while a worker that is being replaced resets)."""
    try:
        return service.request("GET", "/ready")[0] == 200
    except OSError:
        return False


def serving_pids(log: str, master: int) -> set[int]:
    """The worker processes that logged serving the model loaded by ``master``."""
    return {int(found[2]) for found in SERVING.findall(log) if int(found[1]) == master}


def test_two_workers_serve_the_one_model_the_master_loaded(demo_dsn: str, checkpoint: Path,
                                                           tmp_path: Path) -> None:
    service = two_workers(demo_dsn, checkpoint, tmp_path / "service.log")
    try:
        wait_until(lambda: ready(service), timeout=60, message="the service to be ready")
        status, answer = service.request("POST", "/recommendations",
                                         {"song_ids": [1, 2, 3], "k": 5})
        assert status == 200 and len(answer["recommendations"]) == 5
        assert all(song["song"] and song["artist"] for song in answer["recommendations"])
        assert service.process is not None
        master = service.process.pid
        wait_until(lambda: len(serving_pids(service.log_path.read_text(), master)) == 2,
                   timeout=30, message="both workers to start")
        log = service.log_path.read_text()
        loads = LOADED.findall(log)
        assert [(int(pid), int(logged)) for pid, _, logged in loads] == [(master, master)]
        assert master not in serving_pids(log, master)
        # the names too are read once, by the master, and the workers read none themselves
        assert [int(pid) for pid, _ in NAMES_BEFORE_FORK.findall(log)] == [master]
        assert not NAMES_IN_WORKER.findall(log)

        # SIGHUP loads the checkpoint again in the master, once, for the new workers
        os.kill(master, signal.SIGHUP)
        wait_until(lambda: len(LOADED.findall(service.log_path.read_text())) == 2
                   and len(serving_pids(service.log_path.read_text(), master)) == 4,
                   timeout=60, message="the reloaded workers")
        wait_until(lambda: ready(service), timeout=30,
                   message="the reloaded service to be ready")
    finally:
        service.stop()


def test_a_failed_preload_starts_a_service_that_is_not_ready(demo_dsn: str, tmp_path: Path
                                                              ) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    service = two_workers(demo_dsn, bad, tmp_path / "service.log")
    try:
        assert service.process is not None
        children = Path(f"/proc/{service.process.pid}/task/{service.process.pid}/children")
        wait_until(lambda: len(children.read_text().split()) == 2, timeout=30,
                   message="both workers to start")
        workers = children.read_text().split()
        for _ in range(3):
            status, body = service.request("GET", "/ready")
            assert status == 503 and body["error"].startswith(f"model not loaded: {bad}"), body
        # the same two workers are still up: nothing crashed or was restarted
        assert service.process.poll() is None and children.read_text().split() == workers
        assert not LOADED.findall(service.log_path.read_text())
    finally:
        service.stop()
