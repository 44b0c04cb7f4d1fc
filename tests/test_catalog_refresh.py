"""Catalog refresh in a running service against a real PostgreSQL: songs inserted into `songs`
become inputs and recommendations after one refresh (CLI, trigger or start), without a restart,
the old model serving whole until the new one is checked, and serving on when a refresh fails."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from psycopg2.extensions import make_dsn, parse_dsn
from service_support import (
    REPO_ROOT,
    ServiceProcess,
    TcpProxy,
    execute,
    reset_queue,
    settings_for,
    wait_until,
)

import catalog_refresh
import db
import flask_app
from flask_app import create_app
from service import RecommendationService

EXTENSION = flask_app.EXTENSION_KEY
FEATURES = ("album_id, artist_id, explicit, danceability, energy, key, loudness, mode, "
            "speechiness, acousticness, instrumentalness, liveness, valence, tempo, duration_ms, "
            "time_signature, disc_number, track_number")
# new song ids: above the demo catalog's (1000020..1250454), a block per test
NEW_IDS = iter(range(9_000_000, 10_000_000, 100))


@pytest.fixture
def make_app(demo_dsn: str, checkpoint: Path):
    """Build apps on the demo database (each loads the tiny checkpoint itself); their workers,
    refreshers and pools are stopped afterwards, and the songs a test added removed."""
    apps = []
    reset_queue(demo_dsn)

    def build(dsn: str | None = None, **changes):
        app = create_app(settings_for(dsn or demo_dsn, checkpoint, **changes))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions[EXTENSION].stop_workers(10)
        app.extensions[EXTENSION].database.close()
    execute(demo_dsn, "DROP TRIGGER IF EXISTS songs_catalog_insert ON songs")
    execute(demo_dsn, "TRUNCATE recommendation_jobs, recommendations")
    execute(demo_dsn, "DELETE FROM playlist_songs WHERE song_id >= 9000000")
    execute(demo_dsn, "DELETE FROM playlists WHERE playlist_id >= 9000000")
    execute(demo_dsn, "DELETE FROM songs WHERE song_id >= 9000000")


def biggest_album(dsn: str) -> list[int]:
    """The song ids of the demo album with the most songs."""
    return execute(dsn, "SELECT array_agg(song_id ORDER BY song_id) FROM songs "
                        "GROUP BY album_id ORDER BY count(*) DESC, album_id LIMIT 1")[0][0]


def add_songs(dsn: str, like: int, count: int = 1, nulls: bool = False) -> list[int]:
    """Insert ``count`` new songs in one statement, on the album and artist of song ``like``
    with its features (NULL features with ``nulls``); their ids."""
    first = next(NEW_IDS)
    features = re.sub(r"explicit.*", "NULL, " * 15 + "NULL", FEATURES) if nulls else FEATURES
    execute(dsn, f"INSERT INTO songs (song_id, name, {FEATURES}) "
                 f"SELECT %(first)s + n, 'New Release ' || n, {features} "
                 "FROM songs, generate_series(0, %(count)s - 1) AS n WHERE song_id = %(like)s",
            {"first": first, "count": count, "like": like})
    return list(range(first, first + count))


def answer(client, song_ids: list[int], k: int = 100) -> dict:
    """The synchronous answer for ``song_ids``, asserted well-formed."""
    response = client.post("/recommendations", json={"song_ids": song_ids, "k": k})
    assert response.status_code == 200, response.json
    body = response.json
    ranked = body["recommendations"]
    assert [item["rank"] for item in ranked] == list(range(1, k + 1))
    assert all(math.isfinite(item["score"]) and item["song"] for item in ranked), ranked[:3]
    return body


def refreshes(outcome: str) -> float:
    """This process's count of catalog refreshes with ``outcome``."""
    return catalog_refresh.REFRESHES.labels(outcome)._value.get()


def served(app) -> RecommendationService:
    """The service object of ``app``."""
    return app.extensions[EXTENSION]


def started(app) -> RecommendationService:
    """The service object of ``app``, its workers started and its first refresh done."""
    service = served(app)
    service.start_workers()
    wait_until(lambda: service.refresher.watermark, timeout=30, message="the first refresh")
    return service


def test_cli_refresh_makes_a_new_song_of_an_album_an_input_and_a_recommendation(
        make_app, demo_dsn: str) -> None:
    app = make_app()
    service = started(app)
    album = biggest_album(demo_dsn)
    before = service.require_model()
    client = app.test_client()
    [new] = add_songs(demo_dsn, like=album[0])
    assert answer(client, [*album[1:], new])["unknown_song_ids"] == [new]

    result = app.test_cli_runner().invoke(args=["refresh-catalog", "--wait", "20"])
    assert result.exit_code == 0, result.output
    assert "extended: 1 songs added" in result.output, result.output
    after = service.require_model()
    assert after is not before and after.n_songs == before.n_songs + 1
    # every song the model knew keeps its index; the new one is appended
    assert (after.encoders.encode_songs(before.encoders.song_ids)
            == before.encoders.encode_songs(before.encoders.song_ids)).all()
    assert after.encoders.encode_songs([new]).tolist() == [before.encoders.n_song_tokens]

    with_new = answer(client, [*album[1:], new])
    assert with_new["unknown_song_ids"] == []
    top = {item["song_id"]: item for item in answer(client, album, k=10)["recommendations"]}
    assert new in top, "the new song is not in the top-10 of a playlist of its album-mates"
    assert top[new]["song"] == "New Release 0"
    # ... for its album and artist: a playlist of another artist's songs does not get it
    other = execute(demo_dsn, "SELECT array_agg(song_id) FROM (SELECT song_id FROM songs "
                              "WHERE artist_id <> (SELECT artist_id FROM songs WHERE song_id = "
                              "%s) ORDER BY song_id LIMIT 5) AS other", (new,))[0][0]
    assert new not in {item["song_id"] for item in answer(client, other)["recommendations"]}


def test_trigger_refreshes_once_per_statement_and_jobs_use_the_new_model(
        make_app, demo_dsn: str) -> None:
    db.init_database(demo_dsn, catalog_trigger=True)
    app = make_app()
    started(app)
    extended = refreshes("extended")
    album = biggest_album(demo_dsn)
    added = add_songs(demo_dsn, like=album[0], count=3, nulls=True)
    client = app.test_client()
    wait_until(lambda: not answer(client, added)["unknown_song_ids"], timeout=20,
               message="the trigger's refresh")
    assert refreshes("extended") == extended + 1, "one INSERT statement, one refresh"

    # a queued job of a playlist of new songs is scored by the extended model
    execute(demo_dsn, "INSERT INTO playlists VALUES (9000000, 'new releases')")
    execute(demo_dsn, "INSERT INTO playlist_songs SELECT 9000000, n, song_id FROM "
                      "unnest(%s::bigint[]) WITH ORDINALITY AS t(song_id, n)", (added,))
    job = client.post("/recommend", json={"playlist_id": 9000000, "k": 10}).json["job_id"]
    wait_until(lambda: client.get(f"/jobs/{job}").json["status"] == "done", timeout=20,
               message="the job")
    stored = client.get("/playlists/9000000/recommendations").json["recommendations"]
    assert [item["song_id"] for item in stored] == [
        item["song_id"] for item in answer(client, added, k=10)["recommendations"]]


def test_refreshes_under_load_lose_no_request(make_app, demo_dsn: str) -> None:
    db.init_database(demo_dsn, catalog_trigger=True)
    app = make_app()
    service = started(app)
    album = biggest_album(demo_dsn)
    done = threading.Event()

    def ask(index: int) -> list[tuple[int, int]]:
        client, outcomes = app.test_client(), []
        while not done.is_set():
            body = answer(client, album[:1 + index % 5], k=20)
            outcomes.append((len(body["recommendations"]), len(body["unknown_song_ids"])))
        return outcomes

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, index) for index in range(4)]
        for _ in range(3):
            songs = service.require_model().n_songs
            add_songs(demo_dsn, like=album[1], count=2)
            wait_until(lambda expected=songs + 2: service.require_model().n_songs == expected,
                       timeout=20, message="a refresh")
        done.set()
        outcomes = [outcome for future in futures for outcome in future.result()]
    assert len(outcomes) > 0 and set(outcomes) == {(20, 0)}


def test_a_failed_refresh_keeps_the_old_model_serving(make_app, demo_dsn: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import cold_start

    parts = parse_dsn(demo_dsn)
    proxy = TcpProxy(parts.get("host", "127.0.0.1"), int(parts.get("port", 5432))).start()
    app = make_app(dsn=make_dsn(demo_dsn, host="127.0.0.1", port=proxy.port),
                   db_catalog_timeout_seconds=3.0)
    service = started(app)
    model = service.require_model()
    album = biggest_album(demo_dsn)
    [new] = add_songs(demo_dsn, like=album[0])
    client = app.test_client()

    # the database hangs: the refresh gives up at DB_CATALOG_TIMEOUT_SECONDS, nothing changes
    failed = refreshes("failed")
    proxy.freeze()
    service.refresher.request("")
    wait_until(lambda: refreshes("failed") > failed, timeout=20, message="a refresh given up")
    assert service.require_model() is model
    proxy.thaw()

    # the database goes away: the refresh fails, the model in service stays
    failed = refreshes("failed")
    proxy.cut()
    service.refresher.request("")
    wait_until(lambda: refreshes("failed") > failed, timeout=20, message="a failed refresh")
    assert service.require_model() is model
    assert answer(client, [*album, new], k=10)["unknown_song_ids"] == [new]

    # an extension that scores NaN is refused before it serves (the catch-up refresh when the
    # LISTEN connection is back, then the CLI's), and the CLI says so
    real = cold_start.extend_recommender

    def poisoned(recommender, songs):
        extended = real(recommender, songs)
        extended.scoring_matrix = extended.scoring_matrix * float("nan")
        return extended

    monkeypatch.setattr(cold_start, "extend_recommender", poisoned)
    failed = refreshes("failed")
    proxy.restore()
    wait_until(lambda: refreshes("failed") > failed, timeout=20, message="a refused extension")
    result = app.test_cli_runner().invoke(args=["refresh-catalog", "--wait", "20"])
    assert result.exit_code == 1 and "failed, still serving its model" in result.output, \
        result.output
    assert service.require_model() is model
    assert answer(client, [*album, new], k=10)["unknown_song_ids"] == [new]

    monkeypatch.setattr(cold_start, "extend_recommender", real)
    result = app.test_cli_runner().invoke(args=["refresh-catalog", "--wait", "20"])
    assert result.exit_code == 0 and "1 songs added" in result.output, result.output
    assert answer(client, [*album, new], k=10)["unknown_song_ids"] == []
    proxy.cut()


def test_cli_says_when_no_service_process_answers(make_app) -> None:
    app = make_app()
    result = app.test_cli_runner().invoke(args=["refresh-catalog", "--wait", "0.5"])
    assert result.exit_code == 0, result.output
    assert "No service process answered within 0.5 s" in result.output
    assert re.search(r"Catalog: \d+ songs \(highest song_id \d+\)", result.output)


@pytest.mark.slow
def test_gunicorn_workers_share_the_start_extension_and_all_refresh_on_insert(
        demo_dsn: str, checkpoint: Path, tmp_path: Path) -> None:
    reset_queue(demo_dsn)
    db.init_database(demo_dsn, catalog_trigger=True)
    album = biggest_album(demo_dsn)
    [before_start] = add_songs(demo_dsn, like=album[0])
    service = ServiceProcess({
        "DATABASE_URL": demo_dsn, "MODEL_PATH": str(checkpoint), "WORKERS": "2",
        "THREADS": "4", "JOB_THREADS": "1", "TORCH_THREADS": "1", "API_TOKEN": "",
        "CATALOG_DIR": "", "LOG_LEVEL": "info"}, tmp_path / "service.log")
    try:
        service.start()
        wait_until(lambda: metric(service, "b4mr_catalog_refreshes_total",
                                  'outcome="unchanged"') >= 2, timeout=60,
                   message="both workers' first refresh")
        assert "catalog read before the fork: 1 songs added" in service.log_path.read_text()
        done = threading.Event()

        def ask() -> list[tuple[int, int]]:
            outcomes = []
            while not done.is_set():
                status, body = service.request("POST", "/recommendations",
                                               {"song_ids": [*album, before_start], "k": 10})
                outcomes.append((status, len(body["unknown_song_ids"])))
            return outcomes

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask) for _ in range(4)]
            added = add_songs(demo_dsn, like=album[1], count=2)
            wait_until(lambda: metric(service, "b4mr_catalog_refreshes_total",
                                      'outcome="extended"') == 2, timeout=30,
                       message="both workers' refresh after the insert")
            done.set()
            outcomes = [outcome for future in futures for outcome in future.result()]
        assert outcomes and set(outcomes) == {(200, 0)}
        for _ in range(6):
            status, body = service.request("POST", "/recommendations",
                                           {"song_ids": added, "k": 10})
            assert status == 200 and body["unknown_song_ids"] == [], body
        assert metric(service, "b4mr_catalog_songs", "") == 2 * (len(set(
            execute(demo_dsn, "SELECT song_id FROM songs"))))

        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "flask_app", "refresh-catalog"],
            cwd=REPO_ROOT, env={name: value for name, value in service.env.items()
                 if name != "PROMETHEUS_MULTIPROC_DIR"},
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        reports = re.findall(r":(\d+) unchanged: 0 songs added", result.stdout)
        assert len(set(reports)) == 2, result.stdout
    finally:
        service.stop()
        execute(demo_dsn, "DROP TRIGGER IF EXISTS songs_catalog_insert ON songs")
        execute(demo_dsn, "DELETE FROM songs WHERE song_id >= 9000000")


def metric(service: ServiceProcess, name: str, labels: str) -> float:
    """The sum over processes of one sample of /metrics (0 when absent)."""
    status, text = service.request("GET", "/metrics")
    assert status == 200
    pattern = re.compile(rf"^{name}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))
