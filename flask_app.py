"""Recommendation service: the app factory, the HTTP API (request and response models declared
once, the OpenAPI document generated from them by flask-openapi3), auth, errors and the Flask CLI.

``POST /recommend`` enqueues a stored playlist (jobs.py does the queue; ``SELECT
request_recommendations(42)`` does the same from SQL); ``POST /recommendations`` answers a list
of song ids directly, without the database. Run it with ``make serve`` (gunicorn, see
gunicorn.conf.py) or ``flask --app flask_app run``; the CLI commands are ``init-db``,
``load-demo``, ``worker``, ``score-all``, ``prune-jobs`` and ``refresh-catalog``.
"""

from __future__ import annotations

import functools
import hmac
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, cast

import click
import psycopg2
import psycopg2.errors
from flask import Response, current_app, g, jsonify, request
from flask.cli import with_appcontext
from flask.json.provider import DefaultJSONProvider
from flask_openapi3 import APIBlueprint, Info, OpenAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel
from werkzeug.exceptions import HTTPException

import catalog_refresh
import db
import jobs
import workers
from api_models import (
    DOCUMENT,
    ENQUEUE_DESCRIPTION,
    ERRORS,
    NOT_FOUND,
    TEXT,
    ApiError,
    ErrorBody,
    Health,
    Job,
    JobAccepted,
    JobPath,
    PlaylistPath,
    Ready,
    RecommendRequest,
    ServiceApp,
    SongsRequest,
    SongsResponse,
    StoredRecommendations,
    api_error,
    http_error,
    require_json_object,
    songs_request,
)
from config import DEMO_DATA_DIR, MAX_K, Settings
from db import DatabaseUnavailable
from service import ModelUnavailable, RecommendationService

log = logging.getLogger("bert4musicrec.service")

API_VERSION = "1.0.0"
EXTENSION_KEY = "bert4musicrec"
PUBLIC_ENDPOINTS = frozenset({"api.health", "api.ready", "api.openapi"})
# Metric labels are bounded: other methods count as "other", unmatched paths as "unmatched".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
MAX_PRUNE_DAYS = 36_500

REQUESTS = Counter("b4mr_http_requests_total", "HTTP requests by route, method and status.",
                   ["route", "method", "status"])
LATENCY = Histogram("b4mr_http_request_seconds", "HTTP request latency by route.", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                             2.5, 5.0))


def service() -> RecommendationService:
    """The service object of the current app."""
    return current_app.extensions[EXTENSION_KEY]


def _json(model: BaseModel, status: int = 200) -> tuple[Response, int]:
    """A response model as a JSON response, fields in declaration order."""
    return jsonify(model.model_dump(mode="json")), status


# -- routes -------------------------------------------------------------------------------------

def api_blueprint(settings: Settings) -> APIBlueprint:
    """The routes under these settings (the song-list limit and whether a token guards them)."""
    api = APIBlueprint("api", __name__)
    guarded: list[dict[str, list[Any]]] | None = [{"bearer": []}] if settings.api_token else None
    metrics_security = None if settings.metrics_public else guarded
    api.before_request(require_json_object)

    @api.get("/health", operation_id="health", summary="Process is alive",
             responses={200: Health})
    def health() -> tuple[Response, int]:
        """The process is alive."""
        return _json(Health(status="ok"))

    @api.get("/ready", operation_id="ready", summary="Model loaded and database reachable",
             responses={200: Ready, 503: ErrorBody})
    def ready() -> tuple[Response, int]:
        """Model and database ready; else 503, the reason's details for authorized requests."""
        current = service()
        reason = current.readiness()
        if reason is not None:
            raise ApiError(503, reason if _authorized() else reason.partition(":")[0])
        return _json(Ready(status="ready", model_version=current.require_model().model_version))

    @api.get("/metrics", operation_id="metrics", summary="Prometheus metrics",
             responses={200: TEXT, 401: ErrorBody}, security=metrics_security)
    def metrics() -> Response:
        """Prometheus metrics of every process of this service."""
        service().update_queue_gauge()
        return Response(_metrics_payload(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    @api.get("/openapi.json", operation_id="openapi", summary="This document",
             responses={200: DOCUMENT})
    def openapi() -> Response:
        """The OpenAPI document generated from these routes' models."""
        return jsonify(cast(OpenAPI, current_app).api_doc)

    @api.post("/recommend", operation_id="enqueue",
              summary="Enqueue recommendations for a stored playlist (asynchronous)",
              description=ENQUEUE_DESCRIPTION,
              responses={202: JobAccepted, 404: ErrorBody, **ERRORS}, security=guarded)
    def recommend_playlist(body: RecommendRequest) -> tuple[Response, int, dict[str, str]]:
        """Enqueue a playlist; 202 once the job row is committed, 404 for an unknown one."""
        try:
            job = service().enqueue(body.playlist_id, body.k)
        except jobs.PlaylistNotFound as error:
            raise ApiError(404, f"playlist_id: {error}") from None
        accepted = JobAccepted.model_validate(job, from_attributes=True)
        return *_json(accepted, 202), {"Location": f"/jobs/{job.job_id}"}

    @api.get("/jobs/<id:job_id>", operation_id="getJob", summary="State of a job",
             responses={200: Job, 401: ErrorBody, 404: ErrorBody, 503: ErrorBody},
             security=guarded)
    def get_job(path: JobPath) -> tuple[Response, int]:
        """A job's state."""
        job = service().job(path.job_id)
        if job is None:
            raise ApiError(404, NOT_FOUND["JobPath"].format(**path.model_dump()))
        return _json(Job.model_validate(job, from_attributes=True))

    @api.get("/playlists/<id:playlist_id>/recommendations", operation_id="getStored",
             summary="Stored recommendations of a playlist",
             responses={200: StoredRecommendations, 401: ErrorBody, 404: ErrorBody,
                        503: ErrorBody}, security=guarded)
    def get_recommendations(path: PlaylistPath) -> tuple[Response, int]:
        """The stored top-k of a playlist; 404 when none is stored."""
        stored = service().stored_recommendations(path.playlist_id)
        if stored is None:
            raise ApiError(404, NOT_FOUND["PlaylistPath"].format(**path.model_dump()))
        return _json(StoredRecommendations.model_validate(stored, from_attributes=True))

    def recommend_songs(body: SongsRequest) -> tuple[Response, int]:
        """Top-k for a list of catalog song ids, computed now, without the database."""
        answer = service().recommend_songs(body.song_ids, body.k, body.exclude_seen)
        return _json(SongsResponse.model_validate(answer, from_attributes=True))

    # The body model carries MAX_SONG_IDS, so it is set before flask-openapi3 reads the hints.
    recommend_songs.__annotations__["body"] = songs_request(settings.max_song_ids)
    api.post("/recommendations", operation_id="recommendSongs",
             summary="Top-k for a list of song ids, now (synchronous, no database)",
             responses={200: SongsResponse, **ERRORS}, security=guarded)(recommend_songs)
    return api


def _metrics_payload() -> bytes:
    """All processes' metrics in the Prometheus text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(DEFAULT_REGISTRY)


# -- auth, metrics and errors -------------------------------------------------------------------


def _start_timer() -> None:
    """Remember when the request started, for the latency histogram."""
    g.started = time.perf_counter()


def _authorized() -> bool:
    """True when API_TOKEN is unset or the request carries it as its bearer token."""
    token = service().settings.api_token
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def _authorize() -> tuple[Response, int, dict[str, str]] | None:
    """Refuse requests without API_TOKEN's bearer token (not probes, nor METRICS_PUBLIC)."""
    public = request.endpoint in PUBLIC_ENDPOINTS or (
        request.endpoint == "api.metrics" and service().settings.metrics_public)
    if public or _authorized():
        return None
    return (jsonify(error="missing or invalid bearer token"), 401,
            {"WWW-Authenticate": "Bearer"})


def _observe(response: Response) -> Response:
    """Count the request and its latency per route."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method = request.method if request.method in METHODS else "other"
    REQUESTS.labels(route, method, str(response.status_code)).inc()
    started = g.get("started")
    if started is not None:
        LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


def _unavailable(error: Exception) -> tuple[Response, int]:
    """503 for a missing model or database."""
    if isinstance(error, DatabaseUnavailable):
        return jsonify(error=f"database unavailable: {error}"), 503
    return jsonify(error=str(error)), 503


def _database_error(error: psycopg2.Error) -> tuple[Response, int]:
    """503 when the schema is missing, 500 (logged, no details) for other database errors."""
    if isinstance(error, (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedFunction)):
        return jsonify(error=db.SCHEMA_MISSING), 503
    log.exception("database error")
    return jsonify(error="internal server error"), 500


def _unexpected(error: Exception) -> tuple[Response, int]:
    """500 without details; the traceback goes to the log only."""
    log.exception("unhandled error")
    return jsonify(error="internal server error"), 500


# -- CLI commands -------------------------------------------------------------------------------


def _model_for_cli(current: RecommendationService) -> workers.Scorer:
    """The loaded model, or a clean CLI error saying why there is none."""
    try:
        return current.require_model()
    except ModelUnavailable as error:
        raise click.ClickException(str(error)) from None


@click.command("init-db")
@with_appcontext
@click.option("--refresh-trigger", is_flag=True,
              help="Also install sql/refresh_trigger.sql (enqueue on playlist changes).")
@click.option("--catalog-trigger", is_flag=True,
              help="Also install sql/catalog_trigger.sql (refresh the service's catalog when "
                   "songs are inserted).")
def init_db_command(refresh_trigger: bool, catalog_trigger: bool) -> None:
    """Create the tables and the request_recommendations() function."""
    db.init_database(service().settings.database_url, refresh_trigger=refresh_trigger,
                     catalog_trigger=catalog_trigger)
    click.echo("Initialized the database.")


@click.command("load-demo")
@with_appcontext
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEMO_DATA_DIR, show_default=True, help="Folder of the demo CSV tables.")
def load_demo_command(data_dir: Path) -> None:
    """Create the schema if needed and load the demo CSV tables (idempotent)."""
    dsn = service().settings.database_url
    db.init_database(dsn)
    with db.connected(dsn) as connection:
        counts = db.load_csv_tables(connection, data_dir)
    for table, count in counts.items():
        click.echo(f"{table}: {count} rows")


@click.command("worker")
@with_appcontext
def worker_command() -> None:
    """Run the queue workers without HTTP until SIGTERM or Ctrl-C."""
    current = service()
    _model_for_cli(current)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    current.start_workers()
    click.echo(f"Queue workers running ({current.settings.job_threads} threads); "
               "Ctrl-C to stop.")
    while not stop.wait(1.0):
        pass
    finished = current.stop_workers()
    click.echo("Stopped." if finished else "Stopped; unfinished jobs return after their lease.")


@click.command("score-all")
@with_appcontext
@click.option("--k", type=click.IntRange(1, MAX_K), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=256, show_default=True)
@click.option("--include-seen/--exclude-seen", default=None,
              help="Allow songs already in the playlist, or not (default: the model's "
                   "decision, from its training data).")
def score_all_command(k: int, batch_size: int, include_seen: bool | None) -> None:
    """Store recommendations for every playlist, in batches, with a progress bar."""
    from tqdm import tqdm

    current = service()
    model = _model_for_cli(current)
    database = current.database
    after = -1
    with tqdm(total=database.run(db.count_playlists), unit="playlist") as progress:
        while playlists := database.run(functools.partial(db.playlists_page, after=after,
                                                          limit=batch_size)):
            exclude = None if include_seen is None else not include_seen
            rankings = workers.score_playlists(model, playlists, k=k, exclude_seen=exclude)
            database.run(functools.partial(jobs.store_rankings, rankings=rankings,
                                           model_version=model.model_version))
            after = playlists[-1][0]
            progress.update(len(playlists))
    click.echo("Stored recommendations for every playlist.")


def _not_nan(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """The value unless NaN, which FloatRange lets through (every comparison with it is false)."""
    if math.isnan(value):
        raise click.BadParameter(f"{value} is not a number", ctx, param)
    return value


@click.command("prune-jobs")
@with_appcontext
@click.option("--older-than", "days", type=click.FloatRange(0, MAX_PRUNE_DAYS), default=7.0,
              show_default=True, callback=_not_nan,
              help="Delete jobs that ended more than this many days ago.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=10_000,
              show_default=True, help="Jobs deleted per transaction.")
def prune_jobs_command(days: float, batch_size: int) -> None:
    """Delete done and failed jobs that ended long ago; open jobs and results stay."""
    database = service().database
    prune = functools.partial(jobs.prune, older_than_seconds=days * 86_400, limit=batch_size)
    deleted = 0
    while True:
        try:
            batch = database.run(prune)
        except DatabaseUnavailable as error:
            raise click.ClickException(f"{error} (deleted {deleted} jobs before that; "
                                       "run the command again to go on)") from None
        deleted += batch
        if batch < batch_size:
            break
    click.echo(f"Deleted {deleted} jobs that ended more than {days:g} days ago.")


@click.command("refresh-catalog")
@with_appcontext
@click.option("--full", is_flag=True,
              help="Read the whole songs table, not only the ids above those already read "
                   "(for songs inserted with lower ids while the catalog trigger was off).")
@click.option("--wait", "seconds", type=click.FloatRange(0, 600), default=10.0,
              show_default=True, callback=_not_nan,
              help="How long to wait for the service processes' reports.")
def refresh_catalog_command(full: bool, seconds: float) -> None:
    """Make every running service process add the catalog's new songs to its model."""
    try:
        report = catalog_refresh.request_refresh(service().settings, full, seconds)
    except psycopg2.Error as error:
        raise click.ClickException(f"database unavailable: {db.one_line(error)}") from None
    highest = "none" if report.highest is None else f"{report.highest}"
    click.echo(f"Catalog: {report.songs} songs (highest song_id {highest}). Asked the service to "
               f"refresh {'in full' if full else 'from the songs it has not read'}.")
    for reply in report.replies:
        where = f"{reply.get('host')}:{reply.get('pid')}"
        if reply.get("outcome") == "failed":
            click.echo(f"  {where} failed, still serving its model: {reply.get('error')}")
        else:
            click.echo(f"  {where} {reply.get('outcome')}: {reply.get('added')} songs added, "
                       f"{reply.get('songs')} served, in {reply.get('seconds')} s")
    if not report.replies:
        click.echo(f"No service process answered within {seconds:g} s: none runs on this "
                   "database (each one reads the catalog when it starts).")
    elif any(reply.get("outcome") == "failed" for reply in report.replies):
        raise click.ClickException("a refresh failed (see above; the process retries every "
                                   f"{catalog_refresh.RETRY_SECONDS:g} s)")


# -- application factory ------------------------------------------------------------------------


def create_app(settings: Settings | None = None,
               recommender: workers.Scorer | None = None) -> ServiceApp:
    """Build the Flask app without loading the model; workers start in gunicorn or the CLI."""
    settings = settings or Settings.from_env()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = ServiceApp(
        __name__,
        info=Info(title="Bert4MusicRec", version=API_VERSION,
                  description='Playlist continuation with BERT4Rec. Errors are always JSON '
                              '{"error": reason}.'),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}}
        if settings.api_token else None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    if isinstance(app.json, DefaultJSONProvider):
        app.json.sort_keys = False
    app.extensions[EXTENSION_KEY] = RecommendationService(settings, recommender)
    app.register_api(api_blueprint(settings))
    app.before_request(_start_timer)
    app.before_request(_authorize)
    app.after_request(_observe)
    handlers: dict[Any, Any] = {
        ApiError: api_error, HTTPException: http_error, DatabaseUnavailable: _unavailable,
        ModelUnavailable: _unavailable, psycopg2.Error: _database_error, Exception: _unexpected}
    for kind, handler in handlers.items():
        app.register_error_handler(kind, handler)
    for command in (init_db_command, load_demo_command, worker_command, score_all_command,
                    prune_jobs_command, refresh_catalog_command):
        app.cli.add_command(command)
    return app
