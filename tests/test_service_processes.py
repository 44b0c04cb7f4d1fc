"""The service as real gunicorn processes: crash with kill -9, two processes on one queue,
and the database connection cut and restored mid-run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from service_support import (
    ServiceProcess,
    TcpProxy,
    demo_playlist_ids,
    execute,
    reset_queue,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def services(demo_dsn: str, checkpoint: Path, tmp_path: Path):
    """Start service processes on an empty queue; every one is stopped afterwards."""
    started: list[ServiceProcess] = []
    reset_queue(demo_dsn)

    def start(dsn: str | None = None, **env: str) -> ServiceProcess:
        settings = {
            "DATABASE_URL": dsn or demo_dsn, "MODEL_PATH": str(checkpoint), "WORKERS": "1",
            "THREADS": "8", "JOB_THREADS": "2", "JOB_BATCH_SIZE": "4", "LEASE_SECONDS": "3",
            "POLL_SECONDS": "0.2", "RETRY_BASE_SECONDS": "0.1", "TORCH_THREADS": "1",
            "API_TOKEN": "", "CATALOG_DIR": "", "LOG_LEVEL": "warning", **env,
        }
        service = ServiceProcess(settings, tmp_path / f"service-{len(started)}.log")
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def statuses(dsn: str) -> dict[str, int]:
    """Number of jobs per status."""
    return dict(execute(dsn, "SELECT status, count(*) FROM recommendation_jobs GROUP BY status"))


def all_done(dsn: str, expected: int) -> bool:
    """True when exactly ``expected`` jobs exist and all are done."""
    return statuses(dsn) == {"done": expected}


def assert_done_exactly_once(dsn: str, job_ids: set[int], k: int) -> None:
    """Every job completed once (audit log), and its playlist holds exactly k stored songs."""
    logged = execute(dsn, "SELECT job_id, count(*) FROM job_done_log GROUP BY job_id")
    assert dict(logged) == dict.fromkeys(job_ids, 1)
    stored = execute(dsn, "SELECT jobs.job_id, count(stored.rank) FROM recommendation_jobs AS jobs "
                          "LEFT JOIN recommendations AS stored USING (playlist_id) "
                          "GROUP BY jobs.job_id")
    assert dict(stored) == dict.fromkeys(job_ids, k)


def test_kill_9_with_jobs_in_flight_loses_nothing(services, demo_dsn: str) -> None:
    first = services(JOB_THREADS="1", JOB_BATCH_SIZE="2")
    playlists = demo_playlist_ids(demo_dsn, 200)

    def enqueue(playlist_id: int) -> int:
        status, body = first.request("POST", "/recommend", {"playlist_id": playlist_id, "k": 100})
        assert status == 202, body
        return body["job_id"]

    with ThreadPoolExecutor(8) as pool:
        accepted = set(pool.map(enqueue, playlists))
    wait_until(lambda: statuses(demo_dsn).get("running"), timeout=10, interval=0.002,
               message="a claimed batch in flight")
    first.kill()
    at_crash = statuses(demo_dsn)
    assert len(accepted) == 200
    assert at_crash.get("done", 0) < 200, "the crash should leave jobs queued or running"

    second = services()
    wait_until(lambda: all_done(demo_dsn, 200), timeout=120, interval=0.5,
               message=f"every accepted job done after the restart (at crash: {at_crash})")
    assert_done_exactly_once(demo_dsn, accepted, k=100)
    assert second.request("GET", "/ready")[0] == 200


def test_two_processes_share_the_queue_and_process_each_job_once(services,
                                                                 demo_dsn: str) -> None:
    services()
    services()
    playlists = demo_playlist_ids(demo_dsn, 200)
    rows = execute(demo_dsn, "SELECT request_recommendations(playlist_id) "
                             "FROM unnest(%s::bigint[]) AS playlist_id", (playlists,))
    job_ids = {row[0] for row in rows}
    wait_until(lambda: all_done(demo_dsn, 200), timeout=120, interval=0.5,
               message="every job done")
    attempts = dict(execute(demo_dsn, "SELECT attempts, count(*) FROM recommendation_jobs "
                                      "GROUP BY attempts"))
    assert attempts == {1: 200}, "a job was claimed twice"
    assert_done_exactly_once(demo_dsn, job_ids, k=10)
    processes = execute(demo_dsn, "SELECT DISTINCT split_part(worker, ':', 2) "
                                  "FROM recommendation_jobs")
    assert len(processes) == 2, "both processes should have taken jobs"


def test_database_cut_mid_run_recovers_without_restart(services, demo_dsn: str) -> None:
    parts = parse_dsn(demo_dsn)
    proxy = TcpProxy(parts.get("host", "127.0.0.1"), int(parts.get("port", 5432))).start()
    service = services(dsn=make_dsn(demo_dsn, port=proxy.port))
    pid = service.process.pid
    playlists = demo_playlist_ids(demo_dsn, 150)
    accepted = set()
    for playlist_id in playlists[:50]:
        status, body = service.request("POST", "/recommend", {"playlist_id": playlist_id})
        assert status == 202
        accepted.add(body["job_id"])
    proxy.cut()
    wait_until(lambda: service.request("GET", "/ready")[0] == 503, timeout=20,
               message="/ready to report the database down")
    status, body = service.request("GET", "/ready")
    assert body["error"].startswith("database unreachable")
    songs = [row[0] for row in execute(demo_dsn, "SELECT song_id FROM playlist_songs "
                                                 "WHERE playlist_id = %s", (playlists[0],))]
    status, body = service.request("POST", "/recommendations", {"song_ids": songs, "k": 5})
    assert status == 200
    assert len(body["recommendations"]) == 5
    status, body = service.request("POST", "/recommend", {"playlist_id": playlists[60]})
    assert status == 503
    assert "database unavailable" in body["error"]
    rows = execute(demo_dsn, "SELECT request_recommendations(playlist_id) "
                             "FROM unnest(%s::bigint[]) AS playlist_id", (playlists[50:],))
    accepted |= {row[0] for row in rows}
    proxy.restore()
    wait_until(lambda: service.request("GET", "/ready")[0] == 200, timeout=30,
               message="/ready after the database returns")
    wait_until(lambda: all_done(demo_dsn, 150), timeout=90, interval=0.5,
               message="the queue finished after the database returned")
    assert_done_exactly_once(demo_dsn, accepted, k=10)
    assert service.process.poll() is None
    assert service.process.pid == pid
    proxy.cut()


def test_sigterm_finishes_claimed_jobs_before_exit(services, demo_dsn: str) -> None:
    service = services(JOB_BATCH_SIZE="2", LEASE_SECONDS="60")
    playlists = demo_playlist_ids(demo_dsn, 200)
    execute(demo_dsn, "SELECT request_recommendations(playlist_id, 100) "
                      "FROM unnest(%s::bigint[]) AS playlist_id", (playlists,))
    wait_until(lambda: statuses(demo_dsn).get("running"), timeout=30, interval=0.002,
               message="a claimed batch in flight")
    service.stop()
    assert service.process.returncode == 0
    left = statuses(demo_dsn)
    assert "running" not in left, f"a claimed job was abandoned at shutdown: {left}"
    assert left.get("done", 0) + left.get("queued", 0) == 200
