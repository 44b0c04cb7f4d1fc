"""The service in-process against a real PostgreSQL: HTTP contract, queue behaviour, SQL path."""

from __future__ import annotations

import logging
import select
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hypothesis
import psycopg2
import pytest
import schemathesis
from psycopg2.extensions import parse_dsn
from service_support import (
    TcpProxy,
    demo_playlist_ids,
    execute,
    free_port,
    reset_queue,
    settings_for,
    wait_until,
)

import db
import flask_app
from config import MAX_K, Settings
from flask_app import create_app

if TYPE_CHECKING:
    from recommender import Recommendation, Recommender

EXTENSION = flask_app.EXTENSION_KEY
REAL_MODEL = object()


@pytest.fixture(scope="module")
def recommender(checkpoint: Path):
    """The real Recommender loaded from the tiny checkpoint."""
    from recommender import Recommender

    return Recommender.from_checkpoint(checkpoint)


@pytest.fixture
def make_app(demo_dsn: str, checkpoint: Path, recommender):
    """Build apps on an empty queue; their workers and pools are closed afterwards."""
    apps = []
    reset_queue(demo_dsn)

    def build(model=REAL_MODEL, dsn: str | None = None, **changes):
        settings = settings_for(dsn or demo_dsn, checkpoint, **changes)
        app = create_app(settings, recommender if model is REAL_MODEL else model)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions[EXTENSION].stop_workers(10)
        app.extensions[EXTENSION].database.close()


@pytest.fixture
def app(make_app):
    """The app on the demo database, workers not started."""
    return make_app()


@pytest.fixture
def client(app):
    """A test client of ``app``."""
    return app.test_client()


def job_rows(dsn: str) -> dict[int, tuple]:
    """job_id -> (status, attempts, last_error, playlist_id) of every job."""
    rows = execute(dsn, "SELECT job_id, status, attempts, last_error, playlist_id "
                        "FROM recommendation_jobs")
    return {row[0]: row[1:] for row in rows}


def playlist_songs(dsn: str, playlist_id: int) -> list[int]:
    """Song ids of a playlist in order."""
    rows = execute(dsn, "SELECT song_id FROM playlist_songs WHERE playlist_id = %s ORDER BY pos",
                   (playlist_id,))
    return [row[0] for row in rows]


class FlakyRecommender:
    """The real recommender whose first ``failures`` calls raise, as a crashing model would."""

    def __init__(self, inner: Recommender, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.model_version = inner.model_version

    def recommend(self, playlists: list[list[int]], k: int = 10,
                  exclude_seen: bool = True) -> list[Recommendation]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("injected model failure")
        return self.inner.recommend(playlists, k=k, exclude_seen=exclude_seen)


# -- operations ---------------------------------------------------------------------------------


def test_health_ready_and_openapi(client, app) -> None:
    assert client.get("/health").json == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json["model_version"]
    document = client.get("/openapi.json").json
    routes = {rule.rule.replace("<id:", "{").replace(">", "}")
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(document["paths"])


def test_ready_is_503_without_a_model_and_sync_path_says_why(make_app, tmp_path: Path) -> None:
    app = make_app(model=None, model_path=tmp_path / "missing.pt")
    client = app.test_client()
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert "model" in ready.json["error"]
    answer = client.post("/recommendations", json={"song_ids": [1]})
    assert answer.status_code == 503
    assert "model" in answer.json["error"]


def test_model_is_loaded_from_model_path(demo_dsn: str, checkpoint: Path) -> None:
    app = create_app(settings_for(demo_dsn, checkpoint))
    try:
        assert app.test_client().get("/ready").status_code == 200
    finally:
        app.extensions[EXTENSION].database.close()


def test_database_down_ready_503_sync_still_answers(make_app, demo_dsn: str) -> None:
    dead = psycopg2.extensions.make_dsn(demo_dsn, port=free_port())
    client = make_app(dsn=dead).test_client()
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json["error"].startswith("database unreachable")
    songs = playlist_songs(demo_dsn, demo_playlist_ids(demo_dsn, 1)[0])
    answer = client.post("/recommendations", json={"song_ids": songs, "k": 5})
    assert answer.status_code == 200
    assert len(answer.json["recommendations"]) == 5
    queued = client.post("/recommend", json={"playlist_id": 1})
    assert queued.status_code == 503
    assert queued.json["error"].startswith("database unavailable")


def test_broken_pooled_connection_is_discarded(make_app, demo_dsn: str) -> None:
    parts = parse_dsn(demo_dsn)
    proxy = TcpProxy(parts.get("host", "127.0.0.1"), int(parts.get("port", 5432))).start()
    client = make_app(dsn=psycopg2.extensions.make_dsn(demo_dsn, port=proxy.port)).test_client()
    assert client.get("/ready").status_code == 200
    proxy.cut()
    assert client.get("/ready").status_code == 503
    proxy.restore()
    for _ in range(5):
        assert client.get("/ready").status_code == 200
        assert client.post("/recommend", json={"playlist_id": 1}).status_code == 202
    proxy.cut()


def test_metrics_count_requests_and_show_queue_and_model(client) -> None:
    client.post("/recommend", json={"playlist_id": 1})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'b4mr_http_requests_total{method="POST",route="/recommend",status="202"}' in text
    assert "b4mr_http_request_seconds_bucket" in text
    assert 'b4mr_queue_depth{status="queued"} 1.0' in text
    assert "b4mr_model_info{model_version=" in text


# -- validation and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/recommendations", {}, "song_ids"),
    ("/recommendations", [], "body"),
    ("/recommendations", {"song_ids": []}, "song_ids"),
    ("/recommendations", {"song_ids": "1,2"}, "song_ids"),
    ("/recommendations", {"song_ids": list(range(501))}, "song_ids"),
    ("/recommendations", {"song_ids": [1, True]}, "song_ids[1]"),
    ("/recommendations", {"song_ids": [1.5]}, "song_ids[0]"),
    ("/recommendations", {"song_ids": ["7"]}, "song_ids[0]"),
    ("/recommendations", {"song_ids": [-1]}, "song_ids[0]"),
    ("/recommendations", {"song_ids": [2**63]}, "song_ids[0]"),
    ("/recommendations", {"song_ids": [1], "k": 0}, "k"),
    ("/recommendations", {"song_ids": [1], "k": 101}, "k"),
    ("/recommendations", {"song_ids": [1], "k": True}, "k"),
    ("/recommendations", {"song_ids": [1], "k": "10"}, "k"),
    ("/recommendations", {"song_ids": [1], "exclude_seen": 1}, "exclude_seen"),
    ("/recommendations", {"song_ids": [1], "extra": 1}, "extra"),
    ("/recommend", {}, "playlist_id"),
    ("/recommend", {"playlist_id": None}, "playlist_id"),
    ("/recommend", {"playlist_id": False}, "playlist_id"),
    ("/recommend", {"playlist_id": 3.25}, "playlist_id"),
    ("/recommend", {"playlist_id": 2**63}, "playlist_id"),
    ("/recommend", {"playlist_id": 1, "k": 1e9}, "k"),
])
def test_invalid_fields_are_400_naming_the_field(client, path: str, body, field: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400
    assert response.json["error"].startswith(f"{field}:")


def test_errors_are_json_without_tracebacks(client) -> None:
    cases = [
        (client.post("/recommendations", data="{not json", content_type="application/json"),
         400),
        (client.post("/recommendations", data="{}", content_type="text/plain"), 415),
        (client.post("/recommendations", data="[" + "1," * 40_000 + "1]",
                     content_type="application/json"), 413),
        (client.get("/no/such/route"), 404),
        (client.delete("/health"), 405),
        (client.get("/jobs/999999"), 404),
        (client.get(f"/jobs/{2**70}"), 404),
        (client.get("/jobs/0001"), 404),
        (client.get("/jobs/%D9%A1"), 404),
        (client.post("/recommendations", data="[" * 990 + "]" * 990,
                     content_type="application/json"), 400),
        (client.get("/playlists/1/recommendations"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status
        assert response.is_json
        assert set(response.json) == {"error"}
        assert "Traceback" not in response.get_data(as_text=True)


def test_bearer_token_guards_everything_but_probes(make_app) -> None:
    client = make_app(api_token="s3cret-token").test_client()
    body = {"song_ids": [1]}
    assert client.post("/recommendations", json=body).status_code == 401
    wrong = client.post("/recommendations", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json == {"error": "missing or invalid bearer token"}
    right = client.post("/recommendations", json=body,
                        headers={"Authorization": "Bearer s3cret-token"})
    assert right.status_code == 200
    assert client.get("/metrics").status_code == 401
    for public in ("/health", "/ready", "/openapi.json"):
        assert client.get(public).status_code == 200


def test_openapi_document_is_generated_from_the_settings(make_app) -> None:
    document = make_app(api_token="s3cret-token", max_song_ids=7).test_client().get(
        "/openapi.json").json
    schemas = document["components"]["schemas"]
    songs = schemas["SongsRequest"]["properties"]
    assert (songs["song_ids"]["minItems"], songs["song_ids"]["maxItems"]) == (1, 7)
    assert songs["k"]["maximum"] == MAX_K
    assert schemas["SongRecommendation"]["properties"]["rank"]["maximum"] == MAX_K
    assert schemas["RecommendRequest"]["additionalProperties"] is False
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in document["paths"].items():
        for operation in item.values():
            public = path in ("/health", "/ready", "/openapi.json")
            assert operation.get("security") == (None if public else [{"bearer": []}]), path
            errors = [status for status in operation["responses"] if status >= "400"]
            for status in errors:
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert "securitySchemes" not in make_app().test_client().get("/openapi.json").json[
        "components"]


def test_song_list_limit_follows_max_song_ids(make_app) -> None:
    client = make_app(max_song_ids=3).test_client()
    response = client.post("/recommendations", json={"song_ids": [1, 2, 3, 4]})
    assert response.status_code == 400
    assert response.json == {"error": "song_ids: at most 3 songs"}
    assert client.post("/recommendations", json={"song_ids": [1, 2, 3]}).status_code == 200


# -- ids and results ----------------------------------------------------------------------------


def test_sync_ids_round_trip_to_catalog_songs(client, demo_dsn: str) -> None:
    catalog = {row[0] for row in execute(demo_dsn, "SELECT song_id FROM songs")}
    for playlist_id in demo_playlist_ids(demo_dsn, 5):
        songs = playlist_songs(demo_dsn, playlist_id)
        answer = client.post("/recommendations", json={"song_ids": songs, "k": 20}).json
        ids = [item["song_id"] for item in answer["recommendations"]]
        assert len(ids) == 20
        assert len(set(ids)) == 20
        assert set(ids) <= catalog
        assert not set(ids) & set(songs)
        assert [item["rank"] for item in answer["recommendations"]] == list(range(1, 21))
        assert all(item["song"] for item in answer["recommendations"])
        scores = [item["score"] for item in answer["recommendations"]]
        assert scores == sorted(scores, reverse=True)
    answer = client.post("/recommendations", json={"song_ids": [songs[0], 5], "k": 3,
                                                   "exclude_seen": False}).json
    assert answer["unknown_song_ids"] == [5]
    assert {item["song_id"] for item in answer["recommendations"]} <= catalog


def test_queue_result_equals_sync_answer(make_app, demo_dsn: str) -> None:
    app = make_app()
    client = app.test_client()
    playlists = demo_playlist_ids(demo_dsn, 6)
    jobs = {}
    for playlist_id in playlists:
        response = client.post("/recommend", json={"playlist_id": playlist_id, "k": 7})
        assert response.status_code == 202
        assert response.json["status"] == "queued"
        assert response.headers["Location"] == f"/jobs/{response.json['job_id']}"
        jobs[playlist_id] = response.json["job_id"]
    app.extensions[EXTENSION].start_workers()
    for playlist_id, job_id in jobs.items():
        job = wait_until(lambda job_id=job_id: (lambda j: j if j["status"] == "done" else None)(
            client.get(f"/jobs/{job_id}").json), timeout=30, message="job done")
        assert job["attempts"] == 1
        stored = client.get(f"/playlists/{playlist_id}/recommendations").json
        songs = playlist_songs(demo_dsn, playlist_id)
        direct = client.post("/recommendations", json={"song_ids": songs, "k": 7}).json
        assert stored["model_version"] == direct["model_version"]
        assert [item["song_id"] for item in stored["recommendations"]] == \
            [item["song_id"] for item in direct["recommendations"]]
        for kept, fresh in zip(stored["recommendations"], direct["recommendations"],
                               strict=True):
            assert kept["score"] == pytest.approx(fresh["score"], rel=1e-5, abs=1e-5)
    first = playlists[0]
    again = client.post("/recommend", json={"playlist_id": first, "k": 3}).json
    wait_until(lambda: client.get(f"/jobs/{again['job_id']}").json["status"] == "done",
               timeout=30, message="second job done")
    ranks = [item["rank"] for item in client.get(f"/playlists/{first}/recommendations").json[
        "recommendations"]]
    assert ranks == [1, 2, 3]


def test_unknown_playlist_is_404_and_leaves_no_job(client, demo_dsn: str) -> None:
    response = client.post("/recommend", json={"playlist_id": 987654321})
    assert response.status_code == 404
    assert response.json == {"error": "playlist_id: playlist 987654321 not found"}
    assert job_rows(demo_dsn) == {}
    assert client.get("/playlists/987654321/recommendations").status_code == 404


def test_workers_load_the_model_before_claiming_jobs(make_app, demo_dsn: str) -> None:
    app = make_app(model=None)
    service = app.extensions[EXTENSION]
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    client = app.test_client()
    job_id = client.post("/recommend", json={"playlist_id": playlist_id}).json["job_id"]
    assert service.recommender is None, "enqueueing needs no model"
    service.start_workers()
    job = wait_until(lambda: (lambda j: j if j["status"] == "done" else None)(
        client.get(f"/jobs/{job_id}").json), timeout=30, message="job done")
    assert job["attempts"] == 1
    stored = client.get(f"/playlists/{playlist_id}/recommendations").json
    assert stored["model_version"] == service.recommender.model_version
    assert all(item["song"] for item in stored["recommendations"])


# -- queue semantics ----------------------------------------------------------------------------


def test_concurrent_identical_requests_share_one_job(make_app, demo_dsn: str) -> None:
    app = make_app()
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    answers: list[tuple[int, int]] = []
    start = threading.Barrier(16)

    def ask() -> None:
        client = app.test_client()
        start.wait()
        response = client.post("/recommend", json={"playlist_id": playlist_id})
        answers.append((response.status_code, response.json["job_id"]))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for status, _ in answers} == {202}
    assert len({job_id for _, job_id in answers}) == 1
    assert len(job_rows(demo_dsn)) == 1


def test_failures_retry_with_backoff_then_succeed(make_app, demo_dsn: str, recommender) -> None:
    app = make_app(model=FlakyRecommender(recommender, failures=2),
                   retry_base_seconds=0.4, max_attempts=5)
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    job_id = app.test_client().post("/recommend", json={"playlist_id": playlist_id}).json[
        "job_id"]
    workers = app.extensions[EXTENSION].workers
    assert workers.process_batch("test-worker") == 1
    status, attempts, last_error, _ = job_rows(demo_dsn)[job_id]
    assert (status, attempts) == ("queued", 1)
    assert "injected model failure" in last_error
    assert workers.process_batch("test-worker") == 0, "retried before its backoff elapsed"
    wait_until(lambda: workers.process_batch("test-worker"), timeout=5, message="retry 1")
    assert job_rows(demo_dsn)[job_id][:2] == ("queued", 2)
    wait_until(lambda: workers.process_batch("test-worker"), timeout=5, message="retry 2")
    assert job_rows(demo_dsn)[job_id][:2] == ("done", 3)
    assert execute(demo_dsn, "SELECT count(*) FROM recommendations WHERE playlist_id = %s",
                   (playlist_id,))[0][0] == 10


def test_failures_end_as_failed_after_max_attempts(make_app, demo_dsn: str, recommender) -> None:
    app = make_app(model=FlakyRecommender(recommender, failures=99),
                   retry_base_seconds=0.01, max_attempts=3)
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    client = app.test_client()
    job_id = client.post("/recommend", json={"playlist_id": playlist_id}).json["job_id"]
    app.extensions[EXTENSION].start_workers()
    job = wait_until(lambda: (lambda j: j if j["status"] == "failed" else None)(
        client.get(f"/jobs/{job_id}").json), timeout=30, message="job failed")
    assert job["attempts"] == 3
    assert "injected model failure" in job["last_error"]
    again = client.post("/recommend", json={"playlist_id": playlist_id}).json
    assert again["job_id"] != job_id, "a finished job must not block a new request"


def test_expired_lease_of_a_dead_worker_is_reclaimed(make_app, demo_dsn: str) -> None:
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    job_id = execute(demo_dsn, "SELECT request_recommendations(%s)", (playlist_id,))[0][0]
    execute(demo_dsn, "UPDATE recommendation_jobs SET status = 'running', attempts = 1, "
                      "worker = 'dead-host:1:0', lease_expires_at = now() - interval '1 second' "
                      "WHERE job_id = %s", (job_id,))
    app = make_app()
    app.extensions[EXTENSION].start_workers()
    wait_until(lambda: job_rows(demo_dsn)[job_id][0] == "done", timeout=30,
               message="reclaimed job done")
    _, attempts, last_error, _ = job_rows(demo_dsn)[job_id]
    assert attempts == 2
    assert "lease expired" in last_error
    assert execute(demo_dsn, "SELECT count(*) FROM job_done_log WHERE job_id = %s",
                   (job_id,))[0][0] == 1


def test_graceful_stop_leaves_no_job_running(make_app, demo_dsn: str) -> None:
    app = make_app(job_batch_size=8)
    for playlist_id in demo_playlist_ids(demo_dsn, 150):
        execute(demo_dsn, "SELECT request_recommendations(%s)", (playlist_id,))
    service = app.extensions[EXTENSION]
    service.start_workers()
    wait_until(lambda: execute(demo_dsn, "SELECT count(*) FROM recommendation_jobs "
                                         "WHERE status = 'done'")[0][0] > 0,
               timeout=30, message="first job done")
    assert service.stop_workers(20)
    statuses = {row[0] for row in job_rows(demo_dsn).values()}
    assert statuses <= {"queued", "done"}
    service.start_workers()
    wait_until(lambda: {row[0] for row in job_rows(demo_dsn).values()} == {"done"},
               timeout=60, message="queue drained after restart")
    assert execute(demo_dsn, "SELECT count(*), count(DISTINCT job_id) FROM job_done_log")[0] \
        == (150, 150)


# -- SQL path -----------------------------------------------------------------------------------


def test_sql_function_enqueues_idempotently_and_notifies(app, demo_dsn: str) -> None:
    listener = psycopg2.connect(demo_dsn)
    listener.autocommit = True
    try:
        with listener.cursor() as cursor:
            cursor.execute("LISTEN recommendation_jobs")
        playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
        job_id = execute(demo_dsn, "SELECT request_recommendations(%s)", (playlist_id,))[0][0]
        assert select.select([listener], [], [], 5)[0], "no NOTIFY arrived"
        listener.poll()
        assert [note.payload for note in listener.notifies] == [str(job_id)]
        same = execute(demo_dsn, "SELECT request_recommendations(playlist_id => %s, k => 25)",
                       (playlist_id,))[0][0]
        assert same == job_id
        assert job_rows(demo_dsn)[job_id][0] == "queued"
        assert execute(demo_dsn, "SELECT k FROM recommendation_jobs WHERE job_id = %s",
                       (job_id,))[0][0] == 25, "the queued job takes the new k"
        with pytest.raises(psycopg2.errors.InvalidParameterValue):
            execute(demo_dsn, "SELECT request_recommendations(%s, 0)", (playlist_id,))
    finally:
        listener.close()


def test_listen_wakes_workers_before_the_poll_interval(make_app, demo_dsn: str) -> None:
    app = make_app(poll_seconds=30)
    service = app.extensions[EXTENSION]
    service.start_workers()
    time.sleep(0.5)
    job_id = execute(demo_dsn, "SELECT request_recommendations(%s)",
                     (demo_playlist_ids(demo_dsn, 1)[0],))[0][0]
    wait_until(lambda: job_rows(demo_dsn)[job_id][0] == "done", timeout=10,
               message="job done via NOTIFY")


def test_refresh_trigger_enqueues_changed_playlists(demo_dsn: str) -> None:
    reset_queue(demo_dsn)
    db.init_database(demo_dsn, refresh_trigger=True)
    try:
        first, second = demo_playlist_ids(demo_dsn, 2)
        song = execute(demo_dsn, "SELECT min(song_id) FROM songs")[0][0]
        execute(demo_dsn, "INSERT INTO playlist_songs (playlist_id, pos, song_id) "
                          "SELECT playlist_id, 10000, %s FROM playlists "
                          "WHERE playlist_id IN (%s, %s)", (song, first, second))
        queued = sorted(row[3] for row in job_rows(demo_dsn).values() if row[0] == "queued")
        assert queued == [first, second]
        execute(demo_dsn, "DELETE FROM playlist_songs WHERE pos = 10000")
        assert len(job_rows(demo_dsn)) == 2, "open jobs are not enqueued twice"
    finally:
        for event in ("insert", "update", "delete"):
            execute(demo_dsn, f"DROP TRIGGER playlist_songs_refresh_{event} ON playlist_songs")


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_init_db_twice_and_score_all(app, demo_dsn: str) -> None:
    runner = app.test_cli_runner()
    for _ in range(2):
        result = runner.invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(args=["score-all", "--k", "5", "--batch-size", "700"])
    assert result.exit_code == 0, result.output
    counts = execute(demo_dsn, "SELECT count(DISTINCT playlist_id), count(*), "
                               "max(rank) FROM recommendations")[0]
    playlists = execute(demo_dsn, "SELECT count(*) FROM playlists")[0][0]
    assert counts == (playlists, 5 * playlists, 5)


def test_cli_prune_jobs_deletes_only_jobs_that_ended_long_ago(app, demo_dsn: str) -> None:
    first, second, third = demo_playlist_ids(demo_dsn, 3)
    jobs = {  # (playlist, status, days since it ended); every job was created 30 days ago
        "done long ago": (first, "done", 10), "failed long ago": (first, "failed", 8),
        "done lately": (second, "done", 1), "failed lately": (second, "failed", 3),
        "done long ago too": (second, "done", 9),
        "queued": (third, "queued", None), "running": (first, "running", None)}
    ids = {name: execute(
        demo_dsn, "INSERT INTO recommendation_jobs (playlist_id, k, status, created_at, "
                  "finished_at) VALUES (%s, 10, %s, now() - interval '30 days', "
                  "now() - make_interval(days => %s)) RETURNING job_id",
        (playlist, status, days))[0][0] for name, (playlist, status, days) in jobs.items()}
    execute(demo_dsn, "INSERT INTO recommendations (playlist_id, rank, song_id, score, "
                      "model_version) SELECT %s, 1, song_id, 0.5, 'm' FROM songs LIMIT 1",
            (first,))
    runner, client = app.test_cli_runner(), app.test_client()

    result = runner.invoke(args=["prune-jobs", "--older-than", "7", "--batch-size", "2"])

    assert result.exit_code == 0, result.output
    assert "Deleted 3 jobs that ended more than 7 days ago." in result.output
    kept = {name for name, job_id in ids.items()
            if client.get(f"/jobs/{job_id}").status_code == 200}
    assert kept == {"done lately", "failed lately", "queued", "running"}
    assert client.get(f"/jobs/{ids['done long ago']}").status_code == 404
    assert client.get(f"/playlists/{first}/recommendations").status_code == 200
    result = runner.invoke(args=["prune-jobs", "--older-than", "0"])
    assert "Deleted 2 jobs" in result.output
    assert sorted(row[0] for row in job_rows(demo_dsn).values()) == ["queued", "running"]


def test_cli_prune_jobs_rejects_a_negative_age_and_says_when_the_database_is_gone(
        make_app, demo_dsn: str) -> None:
    result = make_app().test_cli_runner().invoke(args=["prune-jobs", "--older-than", "-1"])
    assert result.exit_code == 2
    assert "--older-than" in result.output
    dead = psycopg2.extensions.make_dsn(demo_dsn, port=free_port())
    result = make_app(dsn=dead).test_cli_runner().invoke(args=["prune-jobs"])
    assert result.exit_code == 1
    assert "deleted 0 jobs before that; run the command again" in result.output


def test_cli_database_commands_load_no_model_and_first_request_does(
        pg_dsn: str, checkpoint: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from recommender import Recommender

    loads: list[Path] = []
    load = Recommender.from_checkpoint

    def counted_load(path: Path, **options: str) -> Recommender:
        loads.append(path)
        time.sleep(0.2)
        return load(path, **options)

    monkeypatch.setattr(Recommender, "from_checkpoint", staticmethod(counted_load))
    caplog.set_level(logging.INFO, logger="bert4musicrec.service")
    app = create_app(settings_for(pg_dsn, checkpoint))
    try:
        runner = app.test_cli_runner()
        for command in ("init-db", "load-demo"):
            result = runner.invoke(args=[command])
            assert result.exit_code == 0, result.output
        assert loads == []
        assert "catalog names not loaded" not in caplog.text
        assert "cached names" not in caplog.text
        songs = playlist_songs(pg_dsn, demo_playlist_ids(pg_dsn, 1)[0])
        answers: list[tuple[int, dict]] = []
        start = threading.Barrier(8)

        def ask() -> None:
            client = app.test_client()
            start.wait()
            response = client.post("/recommendations", json={"song_ids": songs, "k": 5})
            answers.append((response.status_code, response.json))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in answers] == [200] * 8
        assert all(body == answers[0][1] for _, body in answers)
        assert all(item["song"] for item in answers[0][1]["recommendations"]), \
            "names of the songs loaded after the app was created are served"
        assert loads == [checkpoint]
        assert caplog.text.count("cached names of") == 1
    finally:
        app.extensions[EXTENSION].database.close()


def test_cli_init_db_on_fresh_database_warns_about_nothing(
        pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "missing.pt"
    app = create_app(settings_for(pg_dsn, missing))
    try:
        runner = app.test_cli_runner()
        with caplog.at_level(logging.INFO, logger="bert4musicrec.service"):
            result = runner.invoke(args=["init-db"])
        assert result.exit_code == 0, result.output
        assert [record.getMessage() for record in caplog.records
                if record.levelno >= logging.WARNING] == []
        result = runner.invoke(args=["score-all"])
        assert result.exit_code == 1
        assert f"no checkpoint at MODEL_PATH ({missing})" in result.output
        ready = app.test_client().get("/ready")
        assert ready.status_code == 503
        assert "no checkpoint at MODEL_PATH" in ready.json["error"]
    finally:
        app.extensions[EXTENSION].database.close()


# -- fuzzing from the OpenAPI document -----------------------------------------------------------


# The document the app serves, generated by flask-openapi3 from the routes' pydantic models.
fuzzed = schemathesis.openapi.from_dict(create_app(Settings()).test_client().get(
    "/openapi.json").json)


@fuzzed.parametrize()
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_api_from_openapi(case, app) -> None:
    response = case.call_and_validate(app=app)
    assert response.status_code < 500
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}
