"""Issue 15's findings on the service's surface, each reproduced against real PostgreSQL and the
real app (in-process, or gunicorn and the flask CLI as processes): deep JSON (F4), metric labels
and the guarded /metrics (F11), path ids (F13), gunicorn and the CLI refusing bad settings (F14;
the settings themselves in test_config.py), prune-jobs ages (F15), and the enqueue of unknown
playlists, SQL/HTTP bounds, re-enqueue with another k and the /ready details (F16)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from psycopg2 import errors
from psycopg2.extensions import make_dsn
from service_support import (
    REPO_ROOT,
    demo_playlist_ids,
    execute,
    free_port,
    reset_queue,
)

import flask_app
from api_models import MAX_JSON_DEPTH, json_depth
from config import MAX_K, Settings
from db import BIGINT_MAX
from flask_app import create_app

TOKEN = "s3cret-token"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}
PATH_PATTERN = "^(0|[1-9][0-9]{0,18})$"


@pytest.fixture
def make_app(demo_dsn: str, checkpoint: Path):
    """Apps on an empty queue (job ids restart at 1); their pools are closed afterwards."""
    apps = []
    reset_queue(demo_dsn)

    def build(**changes):
        settings = replace(Settings(), **{"database_url": demo_dsn, "model_path": checkpoint,
                                          "db_connect_timeout": 2, **changes})
        app = create_app(settings)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions[flask_app.EXTENSION_KEY].stop_workers(10)
        app.extensions[flask_app.EXTENSION_KEY].database.close()


def job_count(dsn: str) -> int:
    """Rows in the job table."""
    return execute(dsn, "SELECT count(*) FROM recommendation_jobs")[0][0]


def post_routes(app) -> list[str]:
    """Every route of the generated document that takes a JSON body."""
    document = app.test_client().get("/openapi.json").json
    return [path for path, item in document["paths"].items() if "post" in item]


# -- F4: deep JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    "[" * 990 + "]" * 990,
    '{"song_ids": [1], "playlist_id": 1, "x": ' + "[" * 990 + "]" * 990 + "}",
    '{"a": ' * 600 + "1" + "}" * 600,
    "[" * 60_000,
])
def test_deep_json_is_400_with_a_reason_on_every_json_route(make_app, body: str) -> None:
    app = make_app()
    client = app.test_client()
    for path in post_routes(app):
        started = time.perf_counter()
        response = client.post(path, data=body, content_type="application/json")
        assert time.perf_counter() - started < 1.0
        assert response.status_code == 400, (path, response.get_data(as_text=True)[:200])
        assert response.json == {"error": f"body: JSON nested deeper than {MAX_JSON_DEPTH} "
                                          "levels"}
    assert job_count(app.extensions[flask_app.EXTENSION_KEY].settings.database_url) == 0


def test_nesting_is_counted_outside_strings_only(make_app) -> None:
    assert json_depth(b'{"a": "[[[{{", "b": [[1, {"c": "\\"]]["}]]}') == 4
    assert json_depth(b"[]") == 1
    assert json_depth(b"1") == 0
    bracketed = '"' + "[" * 500 + '"'
    response = make_app().test_client().post("/recommendations", data='{"song_ids": [1], '
                                             f'"note": {bracketed}}}',
                                             content_type="application/json")
    assert response.status_code == 400
    assert response.json == {"error": "note: unknown field"}


# -- F11: metric labels and the guarded /metrics -------------------------------------------------


def metric_lines(client) -> int:
    """Lines of the /metrics text."""
    return len(client.get("/metrics", headers=AUTHORIZED).get_data(as_text=True).splitlines())


def test_made_up_methods_and_paths_add_no_metric_series(make_app) -> None:
    client = make_app(api_token=TOKEN).test_client()
    client.open("/health", method="BREW", headers=AUTHORIZED)
    client.get("/no/such/route", headers=AUTHORIZED)
    metric_lines(client)  # the first scrape adds the series of /metrics itself
    before = metric_lines(client)
    for number in range(300):
        assert client.open("/health", method=f"M{number}", headers=AUTHORIZED).status_code == 405
        assert client.get(f"/made/up/{number}", headers=AUTHORIZED).status_code == 404
    assert metric_lines(client) == before
    text = client.get("/metrics", headers=AUTHORIZED).get_data(as_text=True)
    assert 'method="other",route="unmatched",status="405"' in text
    assert 'method="GET",route="unmatched",status="404"' in text


def test_metrics_need_the_token_unless_metrics_public(make_app) -> None:
    guarded = make_app(api_token=TOKEN).test_client()
    assert guarded.get("/metrics").status_code == 401
    assert guarded.get("/metrics", headers=AUTHORIZED).status_code == 200
    open_metrics = make_app(api_token=TOKEN, metrics_public=True).test_client()
    assert open_metrics.get("/metrics").status_code == 200
    assert open_metrics.post("/recommendations", json={"song_ids": [1]}).status_code == 401
    document = open_metrics.get("/openapi.json").json
    assert document["paths"]["/metrics"]["get"].get("security") is None
    assert document["paths"]["/jobs/{job_id}"]["get"]["security"] == [{"bearer": []}]
    assert Settings.from_env({"METRICS_PUBLIC": "true"}).metrics_public is True
    assert Settings.from_env({}).metrics_public is False


# -- F13: path ids ------------------------------------------------------------------------------


def other_spellings(number: int) -> list[str]:
    """Ways to write ``number`` that are not its plain ASCII decimal form (percent-encoded)."""
    digits = str(number)
    arabic = "".join(chr(0x0660 + int(digit)) for digit in digits)
    fullwidth = "".join(chr(0xFF10 + int(digit)) for digit in digits)
    return [_percent(arabic), _percent(fullwidth), f"000{digits}", f"0{digits}", f"+{digits}",
            f"{digits}.0", f"%20{digits}", f"{digits}_0"]


def _percent(text: str) -> str:
    """Every byte of the UTF-8 text percent-encoded."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


def test_path_ids_are_ascii_digits_without_leading_zeros(make_app, demo_dsn: str) -> None:
    app = make_app(api_token=TOKEN)
    client = app.test_client()
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    job_id = execute(demo_dsn, "SELECT request_recommendations(%s)", (playlist_id,))[0][0]
    assert job_id == 1
    execute(demo_dsn, "INSERT INTO recommendations (playlist_id, rank, song_id, score, "
                      "model_version) SELECT %s, 1, min(song_id), 0.5, 'm' FROM songs",
            (playlist_id,))
    assert client.get(f"/jobs/{job_id}", headers=AUTHORIZED).json["job_id"] == job_id
    stored = f"/playlists/{playlist_id}/recommendations"
    assert client.get(stored, headers=AUTHORIZED).status_code == 200
    for spelling in other_spellings(job_id):
        response = client.get(f"/jobs/{spelling}", headers=AUTHORIZED)
        assert (response.status_code, response.json) == (404, {"error": "not found"}), spelling
    for spelling in other_spellings(playlist_id):
        response = client.get(f"/playlists/{spelling}/recommendations", headers=AUTHORIZED)
        assert (response.status_code, response.json) == (404, {"error": "not found"}), spelling
    too_big = client.get(f"/jobs/{BIGINT_MAX + 1}", headers=AUTHORIZED)
    assert too_big.status_code == 404
    document = client.get("/openapi.json").json
    for path, name in (("/jobs/{job_id}", "job_id"),
                       ("/playlists/{playlist_id}/recommendations", "playlist_id")):
        (parameter,) = document["paths"][path]["get"]["parameters"]
        assert parameter["name"] == name
        assert parameter["schema"]["pattern"] == PATH_PATTERN
        assert parameter["schema"]["maximum"] == BIGINT_MAX


# -- F14: settings that must refuse to start -----------------------------------------------------


@pytest.mark.parametrize(("environ", "named"), [
    ({"HOST": "0.0.0.0", "API_TOKEN": ""}, "HOST"),
    ({"API_TOKEN": "    "}, "API_TOKEN"),
])
def test_gunicorn_and_the_cli_refuse_to_start(demo_dsn: str, checkpoint: Path, tmp_path: Path,
                                              environ: dict[str, str], named: str) -> None:
    env = {**os.environ, "DATABASE_URL": demo_dsn, "MODEL_PATH": str(checkpoint),
           "PORT": str(free_port()), "WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
           "HOST": "127.0.0.1", "ALLOW_UNAUTHENTICATED_REMOTE": "false", **environ}
    commands = ([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                 "flask_app:create_app()"],
                [sys.executable, "-m", "flask", "--app", "flask_app", "init-db"])
    for command in commands:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            pytest.fail(f"{command[2]} started with {environ}")
        assert process.returncode != 0, output.decode()[-2000:]
        assert f"{named}: " in output.decode(), output.decode()[-2000:]


# -- F15: prune-jobs ages -----------------------------------------------------------------------


@pytest.mark.parametrize("age", ["inf", "-inf", "1e308", "nan", "-1", "36501", "soon"])
def test_prune_jobs_refuses_absurd_ages_as_a_usage_error(make_app, age: str) -> None:
    result = make_app().test_cli_runner().invoke(args=["prune-jobs", "--older-than", age])
    assert result.exit_code == 2, result.output
    assert "'--older-than'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_prune_jobs_accepts_the_largest_age(make_app) -> None:
    result = make_app().test_cli_runner().invoke(args=["prune-jobs", "--older-than", "36500"])
    assert result.exit_code == 0, result.output
    assert "Deleted 0 jobs that ended more than 36500 days ago." in result.output


# -- F16: enqueue -------------------------------------------------------------------------------


def test_unknown_playlist_is_refused_over_http_and_sql(make_app, demo_dsn: str) -> None:
    client = make_app().test_client()
    unknown = 987654321
    response = client.post("/recommend", json={"playlist_id": unknown})
    assert response.status_code == 404
    assert response.json == {"error": f"playlist_id: playlist {unknown} not found"}
    with pytest.raises(errors.NoDataFound, match=f"playlist {unknown} not found"):
        execute(demo_dsn, "SELECT request_recommendations(%s)", (unknown,))
    assert job_count(demo_dsn) == 0
    document = client.get("/openapi.json").json
    assert "404" in document["paths"]["/recommend"]["post"]["responses"]


def sql_accepts(dsn: str, playlist_id: int, k: int) -> bool:
    """True when request_recommendations(playlist_id, k) makes or finds a job."""
    try:
        execute(dsn, "SELECT request_recommendations(%s::bigint, %s::integer)", (playlist_id, k))
    except (errors.InvalidParameterValue, errors.NoDataFound):
        return False
    return True


def test_sql_function_refuses_exactly_what_http_refuses(make_app, demo_dsn: str) -> None:
    client = make_app().test_client()
    execute(demo_dsn, "INSERT INTO playlists (playlist_id) VALUES (0), (%s), (-1) "
                      "ON CONFLICT DO NOTHING", (BIGINT_MAX,))
    known = demo_playlist_ids(demo_dsn, 1)[0]
    ids = (-(2**63) + 1, -1, 0, known, BIGINT_MAX, 987654321)
    for playlist_id in ids:
        for k in (-1, 0, 1, MAX_K, MAX_K + 1):
            status = client.post("/recommend", json={"playlist_id": playlist_id, "k": k})
            http_accepts = status.status_code == 202
            assert status.status_code in (202, 400, 404)
            assert sql_accepts(demo_dsn, playlist_id, k) == http_accepts, (playlist_id, k)
            assert http_accepts == (playlist_id >= 0 and playlist_id != 987654321
                                    and 1 <= k <= MAX_K), (playlist_id, k)
    assert execute(demo_dsn, "SELECT count(*) FROM recommendation_jobs "
                             "WHERE playlist_id < 0")[0][0] == 0


def test_a_queued_job_takes_the_new_k_and_a_running_one_says_it_kept_its_own(
        make_app, demo_dsn: str) -> None:
    app = make_app()
    client = app.test_client()
    playlist_id = demo_playlist_ids(demo_dsn, 1)[0]
    first = client.post("/recommend", json={"playlist_id": playlist_id, "k": 5}).json
    again = client.post("/recommend", json={"playlist_id": playlist_id, "k": 12})
    assert again.status_code == 202
    assert again.json == {**first, "k": 12}
    assert client.get(f"/jobs/{first['job_id']}").json["k"] == 12
    assert execute(demo_dsn, "SELECT request_recommendations(%s, 9)",
                   (playlist_id,))[0][0] == first["job_id"]
    assert client.get(f"/jobs/{first['job_id']}").json["k"] == 9
    service = app.extensions[flask_app.EXTENSION_KEY]
    service.load()
    assert service.workers.process_batch("test-worker") == 1
    assert execute(demo_dsn, "SELECT count(*) FROM recommendations WHERE playlist_id = %s",
                   (playlist_id,))[0][0] == 9
    second = client.post("/recommend", json={"playlist_id": playlist_id, "k": 4}).json
    execute(demo_dsn, "UPDATE recommendation_jobs SET status = 'running', attempts = 1, "
                      "worker = 'w', lease_expires_at = now() + interval '1 minute' "
                      "WHERE job_id = %s", (second["job_id"],))
    kept = client.post("/recommend", json={"playlist_id": playlist_id, "k": 30}).json
    assert (kept["job_id"], kept["status"], kept["k"]) == (second["job_id"], "running", 4)
    description = client.get("/openapi.json").json["paths"]["/recommend"]["post"]["description"]
    assert "a queued one takes this request's k, a running one keeps its own" in description


def test_ready_shows_no_address_or_path_unless_authorized(make_app, demo_dsn: str,
                                                          tmp_path: Path) -> None:
    port = free_port()
    dead = make_dsn(demo_dsn, host="127.0.0.1", port=port)
    missing = tmp_path / "missing.pt"
    cases = ((dict(database_url=dead), "database unreachable", str(port)),
             (dict(model_path=missing), "model not loaded", str(missing)))
    for changes, reason, detail in cases:
        client = make_app(api_token=TOKEN, **changes).test_client()
        hidden = client.get("/ready")
        assert (hidden.status_code, hidden.json) == (503, {"error": reason})
        for wrong in ({"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            assert client.get("/ready", headers=wrong).json == {"error": reason}
        shown = client.get("/ready", headers=AUTHORIZED)
        assert shown.status_code == 503
        assert shown.json["error"].startswith(f"{reason}: ")
        assert detail in shown.json["error"]
        without_token = make_app(**changes).test_client().get("/ready").json["error"]
        assert detail in without_token, "without API_TOKEN every request is authorized"


def test_stale_enqueue_of_a_deleted_playlist_still_fails_with_a_reason(
        make_app, demo_dsn: str) -> None:
    execute(demo_dsn, "INSERT INTO playlists (playlist_id) VALUES (555000555) "
                      "ON CONFLICT DO NOTHING")
    app = make_app()
    client = app.test_client()
    job_id = client.post("/recommend", json={"playlist_id": 555000555}).json["job_id"]
    execute(demo_dsn, "DELETE FROM playlists WHERE playlist_id = 555000555")
    service = app.extensions[flask_app.EXTENSION_KEY]
    service.load()
    assert service.workers.process_batch("test-worker") == 1
    job = client.get(f"/jobs/{job_id}").json
    assert (job["status"], job["last_error"], job["attempts"]) == ("failed",
                                                                  "playlist not found", 1)
    with pytest.raises(errors.NoDataFound):
        execute(demo_dsn, "SELECT request_recommendations(555000555)")
