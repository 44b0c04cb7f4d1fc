"""Faults of issue 15 against real gunicorn processes and a real PostgreSQL: a frozen database
(F2), slow clients and gunicorn's own errors (F3, F12), the metrics folder (F16), and models
that must not be served (F1)."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from service_support import (
    ServiceProcess,
    TcpProxy,
    demo_playlist_ids,
    execute,
    http_json,
    prepare_database,
    raw_exchange,
    reset_queue,
    wait_until,
)

import jobs
from config import Settings
from db import Database
from workers import QueueWorkers

STATEMENT_SECONDS = 3.0
READ_SECONDS = 2.0


@pytest.fixture
def services(demo_dsn: str, checkpoint: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start service processes on an empty queue; every one is stopped afterwards."""
    started: list[ServiceProcess] = []
    reset_queue(demo_dsn)

    def start(dsn: str | None = None, own_metrics_dir: bool = True,
              **env: str) -> ServiceProcess:
        settings = {
            "DATABASE_URL": dsn or demo_dsn, "MODEL_PATH": str(checkpoint), "WORKERS": "1",
            "THREADS": "8", "JOB_THREADS": "2", "JOB_BATCH_SIZE": "4", "LEASE_SECONDS": "10",
            "POLL_SECONDS": "0.2", "RETRY_BASE_SECONDS": "0.1", "TORCH_THREADS": "1",
            "API_TOKEN": "", "CATALOG_DIR": "", "LOG_LEVEL": "warning", **env,
        }
        service = ServiceProcess(settings, tmp_path / f"service-{len(started)}.log",
                                 own_metrics_dir=own_metrics_dir)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def songs_of(dsn: str, playlist_id: int) -> list[int]:
    """Song ids of a playlist in order."""
    return [row[0] for row in execute(dsn, "SELECT song_id FROM playlist_songs "
                                           "WHERE playlist_id = %s ORDER BY pos", (playlist_id,))]


def timed(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    """(status, body, seconds) of one request; the 20 s client timeout only detects a hang."""
    started = time.monotonic()
    status, answer = http_json(port, method, path, body, timeout=20)
    return status, answer, time.monotonic() - started


# -- F2: a frozen database -----------------------------------------------------------------------


@pytest.mark.slow
def test_frozen_database_answers_503_in_time_and_recovers(services, demo_dsn: str,
                                                          tmp_path: Path) -> None:
    parts = parse_dsn(demo_dsn)
    proxy = TcpProxy(parts.get("host", "127.0.0.1"), int(parts.get("port", 5432))).start()
    service = services(dsn=make_dsn(demo_dsn, port=proxy.port), DB_READY_TIMEOUT_SECONDS="2",
                       DB_STATEMENT_TIMEOUT_SECONDS=str(STATEMENT_SECONDS))
    playlists = demo_playlist_ids(demo_dsn, 3)
    songs = songs_of(demo_dsn, playlists[0])
    assert service.request("GET", "/ready")[0] == 200
    for playlist_id in playlists[:2]:
        assert service.request("POST", "/recommend", {"playlist_id": playlist_id})[0] == 202
    wait_until(lambda: all(item["song"] for item in service.request(
        "POST", "/recommendations", {"song_ids": songs, "k": 5})[1]["recommendations"]),
        timeout=30, message="names cached before the freeze")
    proxy.freeze()
    try:
        ready = timed(service.port, "GET", "/ready")  # on a warm pooled connection
        assert ready[0] == 503 and ready[2] < 5, ready
        assert ready[1]["error"] == "database unreachable: database did not answer within 2 s"
        with ThreadPoolExecutor(8) as pool:
            database_calls = [pool.submit(timed, service.port, "GET", "/ready"),
                              pool.submit(timed, service.port, "POST", "/recommend",
                                          {"playlist_id": playlists[2]}),
                              pool.submit(timed, service.port, "GET", "/jobs/1"),
                              pool.submit(timed, service.port, "GET",
                                          f"/playlists/{playlists[0]}/recommendations")]
            time.sleep(0.5)
            health = http_json(service.port, "GET", "/health", timeout=5)
            sync = http_json(service.port, "POST", "/recommendations",
                             {"song_ids": songs, "k": 5}, timeout=5)
            ready, enqueue, job, stored = (call.result() for call in database_calls)
        assert health == (200, {"status": "ok"})
        assert sync[0] == 200 and len(sync[1]["recommendations"]) == 5
        assert ready[0] == 503 and ready[2] < 5, ready
        assert ready[1]["error"] == "database unreachable: database did not answer within 2 s"
        for status, body, seconds in (enqueue, job, stored):
            assert status == 503, body
            assert body["error"].startswith("database unavailable: database did not answer")
            assert seconds < STATEMENT_SECONDS + 2
    finally:
        proxy.thaw()
    wait_until(lambda: service.request("GET", "/ready")[0] == 200, timeout=30,
               message="/ready after the database thawed")
    status, body = service.request("POST", "/recommend", {"playlist_id": playlists[2]})
    assert status == 202
    wait_until(lambda: execute(demo_dsn, "SELECT status FROM recommendation_jobs "
                                         "WHERE job_id = %s", (body["job_id"],))[0][0] == "done",
               timeout=30, message="a job enqueued after the thaw done")
    assert service.process.poll() is None
    proxy.cut()
    service.stop()
    assert service.process.returncode == 0
    metrics_dir = service.log_path.with_suffix(".metrics")
    assert metrics_dir.is_dir(), "the PROMETHEUS_MULTIPROC_DIR the user gave must stay"


# -- F3, F12, F16: slow clients, gunicorn's errors, the metrics folder --------------------------


@pytest.mark.slow
def test_slow_clients_starve_nothing_and_gunicorn_errors_are_json(
        services, demo_dsn: str, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    workers, threads = 1, 4
    service = services(own_metrics_dir=False, TMPDIR=str(temp), WORKERS=str(workers),
                       THREADS=str(threads), REQUEST_READ_SECONDS=str(READ_SECONDS))
    assert [path.name[:13] for path in temp.iterdir()] == ["b4mr-metrics-"]
    songs = songs_of(demo_dsn, demo_playlist_ids(demo_dsn, 1)[0])
    slow = []
    for index in range(2 * workers * threads):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
        if index % 2:
            sock.sendall(b"POST /recommendations HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"so")
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    opened = time.monotonic()
    try:
        time.sleep(0.3)
        assert http_json(service.port, "GET", "/health", timeout=5) == (200, {"status": "ok"})
        status, body = http_json(service.port, "POST", "/recommendations",
                                 {"song_ids": songs, "k": 5}, timeout=5)
        assert status == 200 and len(body["recommendations"]) == 5
        for sock in slow:
            assert sock.recv(100) == b"", "a slow client got an answer instead of being closed"
        assert time.monotonic() - opened >= READ_SECONDS - 0.5
    finally:
        for sock in slow:
            sock.close()
    for request_bytes in (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                          b"POST /recommendations HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 12x\r\n\r\n"):
        status_line, content_type, text = raw_exchange(service.port, request_bytes)
        assert status_line.split()[1] == "400", status_line
        assert content_type == "application/json"
        assert text.startswith('{"error": "bad request: ')
    service.stop()
    assert service.process.returncode == 0
    assert list(temp.iterdir()) == [], "the metrics folder gunicorn.conf.py made must go"


# -- F1: models that must not be served ---------------------------------------------------------


def rewrite_checkpoint(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """Copy a checkpoint with ``change`` applied to its state, in an envelope whose hash is
    right (as an older or a foreign writer could have made it)."""
    import torch

    envelope = torch.load(source, weights_only=True)
    state = torch.load(io.BytesIO(envelope["state"].numpy().tobytes()), weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    view = buffer.getbuffer()
    torch.save({"format": envelope["format"], "sha256": hashlib.sha256(view).hexdigest(),
                "state": torch.frombuffer(view, dtype=torch.uint8)}, target)
    return target


def nan_weights(state: dict) -> None:
    """Set the first floating-point weight of the network to NaN."""
    name = next(key for key, tensor in state["model"].items() if tensor.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")


def wrong_shape(state: dict) -> None:
    """Drop the last row of the first two-dimensional weight."""
    name = next(key for key, tensor in state["model"].items() if tensor.dim() == 2)
    state["model"][name] = state["model"][name][:-1].clone()


def damaged(source: Path, target: Path) -> Path:
    """A copy with 4 KiB XOR-ed in the middle."""
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(byte ^ 0x5A for byte in data[middle:middle + 4096])
    target.write_bytes(bytes(data))
    return target


@pytest.mark.slow
@pytest.mark.parametrize(("make", "reason"), [
    (lambda source, target: rewrite_checkpoint(source, target, nan_weights),
     "holds NaN or infinite values (the run diverged); retrain, e.g. with a lower train.lr"),
    (lambda source, target: rewrite_checkpoint(source, target, wrong_shape),
     "in the checkpoint, but the network of its config needs"),
    (damaged, "damaged checkpoint: its content does not match its SHA-256; restore the file "
              "or retrain"),
], ids=["non-finite", "wrong-shape", "damaged"])
def test_unloadable_checkpoint_is_not_ready_with_its_whole_reason(
        services, checkpoint: Path, tmp_path: Path, make: Callable[[Path, Path], Path],
        reason: str) -> None:
    bad = make(checkpoint, tmp_path / "bad.pt")
    service = services(MODEL_PATH=str(bad))
    status, body = service.request("GET", "/ready")
    assert status == 503
    assert body["error"].startswith(f"model not loaded: {bad}: ")
    assert reason in body["error"]
    status, answer = service.request("POST", "/recommendations", {"song_ids": [1], "k": 5})
    assert (status, answer) == (503, body)
    service.stop()
    assert body["error"] in service.log_path.read_text()


@dataclass
class Answer:
    """A model answer as a stub scorer gives it."""

    song_ids: list[int]
    scores: list[float]
    unknown_song_ids: list[int]


class StubScorer:
    """A scorer whose every answer is ``answer`` (NaN scores, or no songs)."""

    model_version = "stub"
    n_songs = 1000

    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    def recommend(self, playlists: list[list[int]], k: int = 10,
                  exclude_seen: bool = True) -> list[Answer]:
        return [self.answer for _ in playlists]


class NanModel:
    """The real recommender with one weight set to NaN after loading."""

    def __init__(self, checkpoint: Path) -> None:
        import torch

        from recommender import Recommender

        self.inner = Recommender.from_checkpoint(checkpoint)
        self.model_version = self.inner.model_version
        self.n_songs = self.inner.n_songs
        with torch.no_grad():
            next(self.inner.model.parameters()).view(-1)[0] = float("nan")

    def recommend(self, playlists: list[list[int]], k: int = 10,
                  exclude_seen: bool = True) -> list[Any]:
        return self.inner.recommend(playlists, k=k, exclude_seen=exclude_seen)


@pytest.mark.parametrize("scorer", [
    lambda checkpoint: StubScorer(Answer([5, 6], [float("nan"), 0.1], [])),
    lambda checkpoint: StubScorer(Answer([], [], [])),
    NanModel,
], ids=["nan-scores", "empty-answer", "nan-weights"])
def test_unusable_answers_fail_the_job_and_keep_stored_results(
        pg_dsn: str, checkpoint: Path, scorer: Callable[[Path], Any]) -> None:
    prepare_database(pg_dsn)
    playlist_id = demo_playlist_ids(pg_dsn, 1)[0]
    settings = replace(Settings.from_env({}), database_url=pg_dsn, max_attempts=1,
                       retry_base_seconds=0.01)
    database = Database(settings)
    try:
        good = jobs.Ranked(playlist_id, songs_of(pg_dsn, playlist_id)[:3], [0.5, 0.3, 0.2])
        database.run(lambda cursor: jobs.store_rankings(cursor, [good], "good-model"))
        before = execute(pg_dsn, "SELECT * FROM recommendations ORDER BY rank")
        job_id = execute(pg_dsn, "SELECT request_recommendations(%s)", (playlist_id,))[0][0]
        workers = QueueWorkers(settings, database, scorer(checkpoint))
        assert workers.process_batch("test-worker") == 1
        status, last_error = execute(pg_dsn, "SELECT status, last_error FROM "
                                             "recommendation_jobs WHERE job_id = %s",
                                     (job_id,))[0]
        assert status == "failed"
        assert last_error.startswith("model error: ")
        assert "NaN or infinite" in last_error or "no songs" in last_error
        assert execute(pg_dsn, "SELECT * FROM recommendations ORDER BY rank") == before
    finally:
        database.close()


def test_sync_path_refuses_a_model_gone_non_finite(demo_dsn: str, checkpoint: Path) -> None:
    from flask_app import EXTENSION_KEY, create_app

    settings = replace(Settings.from_env({}), database_url=demo_dsn, model_path=checkpoint)
    app = create_app(settings, NanModel(checkpoint))
    try:
        songs = songs_of(demo_dsn, demo_playlist_ids(demo_dsn, 1)[0])
        answer = app.test_client().post("/recommendations", json={"song_ids": songs, "k": 5})
        assert answer.status_code == 503
        assert answer.json["error"].startswith("model cannot answer: model ")
        assert "NaN or infinite scores" in answer.json["error"]
    finally:
        app.extensions[EXTENSION_KEY].database.close()
