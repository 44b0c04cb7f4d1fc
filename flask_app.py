"""Recommendation service: HTTP API, durable job queue workers and Flask CLI commands.

The database host enqueues a playlist (``POST /recommend`` or ``SELECT
request_recommendations(42)``); the job row is committed before anyone is told it was
accepted. Worker threads in every service process claim jobs with ``FOR UPDATE SKIP
LOCKED``, score the playlist and store the top-k together with the job's new state in one
transaction. ``POST /recommendations`` answers a list of song ids directly, without the
database.

Run it with ``make serve`` (gunicorn, see gunicorn.conf.py) or ``flask --app flask_app run``;
the CLI commands are ``init-db``, ``load-demo``, ``worker`` and ``score-all``.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg2
import psycopg2.errors
import psycopg2.pool
from dotenv import load_dotenv
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.cli import with_appcontext
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from werkzeug.exceptions import HTTPException

import preprocessing
from config import DEMO_DATA_DIR, REPO_ROOT, RUNS_DIR

if TYPE_CHECKING:
    from train import Recommendation, Recommender

log = logging.getLogger("bert4musicrec.service")

API_VERSION = "1.0.0"
EXTENSION_KEY = "bert4musicrec"
NOTIFY_CHANNEL = "recommendation_jobs"
BIGINT_MAX = 2**63 - 1
MAX_K = 100
DATABASE_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
PUBLIC_ENDPOINTS = frozenset({"api.health", "api.ready", "api.openapi"})
CATALOG_RETRY_SECONDS = 30.0

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Service settings; each field is read from the environment variable of its upper-case name."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    model_path: Path = RUNS_DIR / "demo" / "best.pt"
    catalog_dir: Path | None = None
    api_token: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    threads: int = 4
    job_threads: int = 2
    job_batch_size: int = 64
    max_attempts: int = 5
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    pool_size: int = 10
    db_connect_timeout: int = 3
    max_content_length: int = 64 * 1024
    max_song_ids: int = 500
    torch_threads: int = 0
    shutdown_seconds: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default: the process environment plus a ``.env`` file)."""
        if environ is None:
            load_dotenv(REPO_ROOT / ".env")
            environ = os.environ
        defaults = cls()
        values = {}
        for item in fields(cls):
            name = item.name.upper()
            if name in environ:
                values[item.name] = _parse_setting(name, getattr(defaults, item.name),
                                                   environ[name])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        at_least_one = ("port", "workers", "threads", "job_threads", "job_batch_size",
                        "max_attempts", "pool_size", "db_connect_timeout", "max_content_length",
                        "max_song_ids")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.upper()}: must be at least 1")
        positive = ("lease_seconds", "poll_seconds", "retry_base_seconds", "retry_max_seconds",
                    "shutdown_seconds")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.upper()}: must be positive")
        if self.port > 65535:
            raise ValueError("PORT: must be at most 65535")
        if self.torch_threads < 0:
            raise ValueError("TORCH_THREADS: must not be negative (0 keeps torch's default)")
        if self.pool_size < self.job_threads + 1:
            raise ValueError("POOL_SIZE: must exceed JOB_THREADS so requests still get a "
                             "connection while every worker holds one")


def _parse_setting(name: str, default: Any, raw: str) -> Any:
    """Convert one environment value to the type of the setting's default."""
    text = raw.strip()
    try:
        if name == "CATALOG_DIR":
            return _repo_path(text) if text else None
        if isinstance(default, Path):
            return _repo_path(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        raise ValueError(f"{name}: expected {type(default).__name__}, got {raw!r}") from None
    return text


def _repo_path(text: str) -> Path:
    """An absolute path; relative ones are relative to the repository."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


# ---------------------------------------------------------------------------------------------
# SQL files and the database
# ---------------------------------------------------------------------------------------------

_SQL_CACHE: dict[str, str] = {}


def sql_text(name: str) -> str:
    """Text of ``sql/<name>.sql``, read once."""
    if name not in _SQL_CACHE:
        _SQL_CACHE[name] = preprocessing.read_sql(name)
    return _SQL_CACHE[name]


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached (or the connection pool is exhausted)."""


class ModelUnavailable(RuntimeError):
    """No model is loaded, so nothing can be scored."""


def connection_options(connect_timeout: int) -> dict[str, Any]:
    """libpq options of every service connection: bounded connect time, TCP keepalives."""
    return {
        "connect_timeout": connect_timeout,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "application_name": "bert4musicrec",
    }


class LazyConnectionPool(psycopg2.pool.ThreadedConnectionPool):
    """ThreadedConnectionPool that opens connections on demand and keeps them for reuse.

    With minconn 0 psycopg2 would close every returned connection, and with minconn > 0 its
    constructor connects at once (and fails while the database is down); so it starts at 0
    and then keeps up to maxconn idle connections.
    """

    def __init__(self, maxconn: int, dsn: str, **options: Any) -> None:
        """Connect nothing yet."""
        super().__init__(0, maxconn, dsn, **options)
        self.minconn = maxconn


class Database:
    """A thread-safe connection pool that discards broken connections instead of reusing them."""

    def __init__(self, dsn: str, size: int, connect_timeout: int) -> None:
        """Remember the settings; nothing connects until the first use."""
        self.dsn = dsn
        self.size = size
        self.connect_timeout = connect_timeout
        self._pool: LazyConnectionPool | None = None
        self._pool_pid = 0
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()

    def _current_pool(self) -> LazyConnectionPool:
        """The pool of this process; a forked child never reuses its parent's sockets."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = LazyConnectionPool(self.size, self.dsn,
                                                **connection_options(self.connect_timeout))
                self._pool_pid = os.getpid()
            return self._pool

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Borrow a connection; it goes back rolled back, or closed when it is broken."""
        if not self._slots.acquire(timeout=max(10.0, self.connect_timeout)):
            raise DatabaseUnavailable("connection pool exhausted")
        try:
            pool = self._current_pool()
            try:
                connection = pool.getconn()
            except (psycopg2.Error, psycopg2.pool.PoolError) as error:
                raise DatabaseUnavailable(_first_line(error)) from error
            broken = False
            try:
                yield connection
            except BaseException as error:
                broken = isinstance(error, DATABASE_ERRORS)
                if not broken and not connection.closed:
                    try:
                        connection.rollback()
                    except psycopg2.Error:
                        broken = True
                raise
            finally:
                pool.putconn(connection, close=broken or bool(connection.closed))
        finally:
            self._slots.release()

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed when the block ends without error."""
        with self.connection() as connection:
            with connection.cursor() as cursor:
                yield cursor
            connection.commit()

    def run(self, work: Callable[[Any], T], retries: int = 1) -> T:
        """Run ``work(cursor)`` in a transaction; retry on a fresh connection if one broke."""
        for attempt in range(retries + 1):
            try:
                with self.transaction() as cursor:
                    return work(cursor)
            except DATABASE_ERRORS as error:
                if attempt == retries:
                    raise DatabaseUnavailable(_first_line(error)) from error
        raise AssertionError("unreachable")

    def check(self) -> str | None:
        """None when the database answers and holds the service schema, else the reason."""
        try:
            present = self.run(_schema_present)
        except DatabaseUnavailable as error:
            return f"database unreachable: {error}"
        if not present:
            return "database schema missing: run `flask --app flask_app init-db`"
        return None

    def close(self) -> None:
        """Close every pooled connection of this process."""
        with self._lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.closeall()
            self._pool = None


def _schema_present(cursor: Any) -> bool:
    """True when the job table and the enqueue function exist."""
    cursor.execute("SELECT to_regclass('recommendation_jobs') IS NOT NULL "
                   "AND to_regprocedure('request_recommendations(bigint, integer)') IS NOT NULL")
    return bool(cursor.fetchone()[0])


def _first_line(error: BaseException) -> str:
    """First line of an error message, for logs and JSON reasons (never a traceback)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def init_database(dsn: str, refresh_trigger: bool = False) -> None:
    """Create the tables (sql/schema.sql) and the service's function (sql/service.sql)."""
    connection = preprocessing.connect(dsn)
    try:
        preprocessing.create_schema(connection)
        with connection.cursor() as cursor:
            cursor.execute(sql_text("service"))
            if refresh_trigger:
                cursor.execute(sql_text("refresh_trigger"))
        connection.commit()
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------
# Metrics (multiprocess-safe when PROMETHEUS_MULTIPROC_DIR is set, as gunicorn.conf.py does)
# ---------------------------------------------------------------------------------------------

REQUESTS = Counter("b4mr_http_requests_total", "HTTP requests by route, method and status.",
                   ["route", "method", "status"])
LATENCY = Histogram("b4mr_http_request_seconds", "HTTP request latency by route.", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                             2.5, 5.0))
JOB_OUTCOMES = Counter("b4mr_job_outcomes_total",
                       "Job outcomes: done, retry, failed, lost_lease, released, reclaimed.",
                       ["outcome"])
JOB_BATCH_SECONDS = Histogram("b4mr_job_batch_seconds",
                              "Time to score and store one claimed batch of jobs.")
QUEUE_DEPTH = Gauge("b4mr_queue_depth", "Open jobs by status, read when /metrics is scraped.",
                    ["status"], multiprocess_mode="mostrecent")
MODEL_INFO = Gauge("b4mr_model_info", "1 for the model version this process serves.",
                   ["model_version"], multiprocess_mode="max")


def metrics_payload() -> bytes:
    """All processes' metrics in the Prometheus text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(DEFAULT_REGISTRY)


# ---------------------------------------------------------------------------------------------
# Scoring and storing results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds; (job_id, attempts) is its fencing token."""

    job_id: int
    playlist_id: int
    k: int
    attempts: int


@dataclass(frozen=True)
class Ranked:
    """Top-k catalog song ids with scores for one playlist."""

    playlist_id: int
    song_ids: list[int]
    scores: list[float]


def ranked(playlist_id: int, result: Recommendation) -> Ranked:
    """Keep the finite-scored songs of a model answer, in rank order."""
    pairs = [(int(song), float(score)) for song, score in zip(result.song_ids, result.scores,
                                                              strict=True)
             if math.isfinite(float(score))]
    return Ranked(playlist_id, [song for song, _ in pairs], [score for _, score in pairs])


def write_rankings(cursor: Any, rankings: Sequence[Ranked], model_version: str) -> None:
    """Replace the stored top-k of these playlists (ranks beyond the new length are deleted)."""
    if not rankings:
        return
    cursor.execute(sql_text("recommendations_trim"), {
        "playlist_ids": [item.playlist_id for item in rankings],
        "counts": [len(item.song_ids) for item in rankings],
    })
    playlist_ids, ranks, song_ids, scores = [], [], [], []
    for item in rankings:
        for rank, (song_id, score) in enumerate(zip(item.song_ids, item.scores, strict=True),
                                                start=1):
            playlist_ids.append(item.playlist_id)
            ranks.append(rank)
            song_ids.append(song_id)
            scores.append(score)
    if playlist_ids:
        cursor.execute(sql_text("recommendations_store"), {
            "playlist_ids": playlist_ids, "ranks": ranks, "song_ids": song_ids,
            "scores": scores, "model_version": model_version,
        })


def score_playlists(recommender: Recommender, playlists: Sequence[tuple[int, list[int]]],
                    k: int, exclude_seen: bool = True) -> list[Ranked]:
    """Score several playlists in one model call."""
    results = recommender.recommend([songs for _, songs in playlists], k=k,
                                    exclude_seen=exclude_seen)
    return [ranked(playlist_id, result)
            for (playlist_id, _), result in zip(playlists, results, strict=True)]


# ---------------------------------------------------------------------------------------------
# Queue workers
# ---------------------------------------------------------------------------------------------


class WakeUp:
    """A counter that workers wait on; LISTEN notifications and reclaims bump it."""

    def __init__(self) -> None:
        """Start at generation 0."""
        self._condition = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        """The current generation; pass it to ``wait`` to not miss a wake-up in between."""
        with self._condition:
            return self._generation

    def notify(self) -> None:
        """Wake every waiting worker."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Sleep until the generation moves past ``seen`` or ``timeout`` seconds pass."""
        with self._condition:
            self._condition.wait_for(lambda: self._generation != seen, timeout)


class Backoff:
    """Exponential delays with jitter for reconnecting: 0.1 s doubling up to ``ceiling``."""

    def __init__(self, ceiling: float = 5.0) -> None:
        """Start at the smallest delay."""
        self.ceiling = ceiling
        self._delay = 0.1

    def next(self) -> float:
        """The next delay to sleep."""
        delay = self._delay
        self._delay = min(self.ceiling, self._delay * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """Back to the smallest delay after a success."""
        self._delay = 0.1


@dataclass(frozen=True)
class Failure:
    """A job that could not be scored, with the reason stored in ``last_error``."""

    job: ClaimedJob
    reason: str
    permanent: bool


class QueueWorkers:
    """A bounded pool of threads that claim, score and store jobs, plus one LISTEN thread."""

    def __init__(self, settings: Settings, database: Database, recommender: Recommender) -> None:
        """Prepare the threads; ``start`` launches them."""
        self.settings = settings
        self.database = database
        self.recommender = recommender
        self._stopping = threading.Event()
        self._wake = WakeUp()
        self._threads: list[threading.Thread] = []
        self._started_pid = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """True while this process's worker threads run."""
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        """Start the worker threads in this process (a no-op if they already run here)."""
        with self._lock:
            if self._started_pid == os.getpid() and self.running:
                return
            self._stopping.clear()
            self._started_pid = os.getpid()
            identity = f"{socket.gethostname()}:{os.getpid()}"
            self._threads = [threading.Thread(target=self._listen, name="b4mr-listen",
                                              daemon=True)]
            for index in range(self.settings.job_threads):
                name = f"{identity}:{index}"
                self._threads.append(threading.Thread(target=self._work, args=(name,),
                                                      name=f"b4mr-worker-{index}", daemon=True))
            for thread in self._threads:
                thread.start()
        log.info("started %d queue worker threads", self.settings.job_threads)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop claiming, finish the batches in hand, and wait; True when every thread ended."""
        self._stopping.set()
        self._wake.notify()
        deadline = time.monotonic() + (self.settings.shutdown_seconds if timeout is None
                                       else timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stopped = not self.running
        if not stopped:
            log.warning("queue workers still busy at shutdown; their leases will expire")
        return stopped

    # -- worker threads ------------------------------------------------------------------------

    def _work(self, name: str) -> None:
        """Claim and process batches until stopped; back off while the database is away."""
        backoff = Backoff()
        while not self._stopping.is_set():
            seen = self._wake.generation
            try:
                handled = self.process_batch(name)
                backoff.reset()
            except DatabaseUnavailable as error:
                log.warning("worker %s: database unavailable (%s); retrying", name, error)
                self._stopping.wait(backoff.next())
                continue
            except Exception:
                log.exception("worker %s: unexpected error; retrying", name)
                self._stopping.wait(backoff.next())
                continue
            if handled == 0:
                self._wake.wait(seen, self.settings.poll_seconds)

    def process_batch(self, name: str) -> int:
        """Claim up to a batch of due jobs, score them and store the outcome; return the count."""
        claimed = self.database.run(lambda cursor: self._claim(cursor, name))
        if not claimed:
            return 0
        started = time.monotonic()
        deadline = started + 0.9 * self.settings.lease_seconds
        if self._stopping.is_set():
            self._release(claimed)
            return len(claimed)
        playlists = self._until(deadline, lambda: self.database.run(
            lambda cursor: _read_playlists(cursor, [job.playlist_id for job in claimed])))
        if playlists is None:
            return len(claimed)
        finished, failures = self._score(claimed, playlists)
        self._until(deadline, lambda: self._store(finished, failures))
        JOB_BATCH_SECONDS.observe(time.monotonic() - started)
        return len(claimed)

    def _claim(self, cursor: Any, name: str) -> list[ClaimedJob]:
        """Run the claim query for this worker."""
        cursor.execute(sql_text("jobs_claim"), {
            "worker": name, "lease_seconds": self.settings.lease_seconds,
            "batch_size": self.settings.job_batch_size,
        })
        return [ClaimedJob(*row) for row in cursor.fetchall()]

    def _until(self, deadline: float, action: Callable[[], T]) -> T | None:
        """Retry a database action with backoff until it succeeds, the lease runs out or stop."""
        backoff = Backoff()
        while True:
            try:
                return action()
            except DatabaseUnavailable as error:
                if self._stopping.is_set() or time.monotonic() >= deadline:
                    log.warning("giving up on a claimed batch (%s); its lease will expire",
                                error)
                    return None
                log.warning("database unavailable while holding jobs (%s); retrying", error)
                time.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))

    def _score(self, claimed: list[ClaimedJob], playlists: dict[int, list[int]],
               ) -> tuple[list[tuple[ClaimedJob, Ranked]], list[Failure]]:
        """Score every job whose playlist exists, one model call per distinct k."""
        finished: list[tuple[ClaimedJob, Ranked]] = []
        failures = [Failure(job, "playlist not found", permanent=True)
                    for job in claimed if job.playlist_id not in playlists]
        by_k: dict[int, list[ClaimedJob]] = {}
        for job in claimed:
            if job.playlist_id in playlists:
                by_k.setdefault(job.k, []).append(job)
        for k, jobs in by_k.items():
            try:
                rankings = score_playlists(
                    self.recommender, [(job.playlist_id, playlists[job.playlist_id])
                                       for job in jobs], k=k)
            except Exception as error:
                log.exception("model failed on a batch of %d jobs", len(jobs))
                reason = f"model error: {type(error).__name__}: {_first_line(error)}"
                failures.extend(Failure(job, reason, permanent=False) for job in jobs)
                continue
            finished.extend(zip(jobs, rankings, strict=True))
        return finished, failures

    def _store(self, finished: list[tuple[ClaimedJob, Ranked]], failures: list[Failure]) -> None:
        """Store results and failures in one transaction; job by job if a row is refused."""
        try:
            outcomes = self.database.run(
                lambda cursor: self._write(cursor, finished, failures), retries=0)
        except (psycopg2.IntegrityError, psycopg2.DataError):
            log.exception("storing a batch failed; storing its jobs one by one")
            outcomes = {}
            for job, ranking in finished:
                try:
                    single = self.database.run(
                        lambda cursor, item=(job, ranking): self._write(cursor, [item], []),
                        retries=0)
                except (psycopg2.IntegrityError, psycopg2.DataError) as error:
                    reason = f"storing the result failed: {_first_line(error)}"
                    single = self.database.run(lambda cursor, failure=Failure(
                        job, reason, permanent=False): self._write(cursor, [], [failure]))
                _merge(outcomes, single)
            if failures:
                _merge(outcomes, self.database.run(
                    lambda cursor: self._write(cursor, [], failures)))
        for outcome, count in outcomes.items():
            JOB_OUTCOMES.labels(outcome).inc(count)

    def _write(self, cursor: Any, finished: list[tuple[ClaimedJob, Ranked]],
               failures: list[Failure]) -> dict[str, int]:
        """Mark owned jobs done with their results, record failures; return outcome counts."""
        outcomes: dict[str, int] = {}
        if finished:
            cursor.execute(sql_text("jobs_complete"), {
                "job_ids": [job.job_id for job, _ in finished],
                "attempts": [job.attempts for job, _ in finished],
            })
            owned = {row[0] for row in cursor.fetchall()}
            write_rankings(cursor, [ranking for job, ranking in finished if job.job_id in owned],
                           self.recommender.model_version)
            outcomes["done"] = len(owned)
            outcomes["lost_lease"] = len(finished) - len(owned)
        if failures:
            cursor.execute(sql_text("jobs_fail"), {
                "job_ids": [failure.job.job_id for failure in failures],
                "attempts": [failure.job.attempts for failure in failures],
                "reasons": [failure.reason for failure in failures],
                "permanent": [failure.permanent for failure in failures],
                "max_attempts": self.settings.max_attempts,
                "retry_base_seconds": self.settings.retry_base_seconds,
                "retry_max_seconds": self.settings.retry_max_seconds,
            })
            for _, status in cursor.fetchall():
                key = "failed" if status == "failed" else "retry"
                outcomes[key] = outcomes.get(key, 0) + 1
        return outcomes

    def _release(self, claimed: list[ClaimedJob]) -> None:
        """Give claimed jobs back to the queue without counting the attempt (shutdown)."""
        def work(cursor: Any) -> int:
            cursor.execute(sql_text("jobs_release"), {
                "job_ids": [job.job_id for job in claimed],
                "attempts": [job.attempts for job in claimed],
            })
            return cursor.rowcount

        try:
            JOB_OUTCOMES.labels("released").inc(self.database.run(work))
        except DatabaseUnavailable as error:
            log.warning("could not release %d jobs (%s); their leases will expire",
                        len(claimed), error)

    # -- LISTEN thread -------------------------------------------------------------------------

    def _listen(self) -> None:
        """Wake workers on NOTIFY and reclaim expired leases; reconnect with backoff."""
        backoff = Backoff()
        while not self._stopping.is_set():
            connection = None
            try:
                connection = psycopg2.connect(
                    self.database.dsn, **connection_options(self.settings.db_connect_timeout))
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
                backoff.reset()
                self._wake.notify()
                self._listen_on(connection)
            except DATABASE_ERRORS as error:
                log.warning("LISTEN connection lost (%s); reconnecting", _first_line(error))
                self._stopping.wait(backoff.next())
            except Exception:
                log.exception("LISTEN thread error; reconnecting")
                self._stopping.wait(backoff.next())
            finally:
                if connection is not None:
                    connection.close()

    def _listen_on(self, connection: Any) -> None:
        """Wait for notifications on one connection; reclaim expired leases meanwhile."""
        while not self._stopping.is_set():
            with connection.cursor() as cursor:
                cursor.execute(sql_text("jobs_reclaim"),
                               {"max_attempts": self.settings.max_attempts})
                reclaimed = cursor.fetchall()
            if reclaimed:
                log.warning("reclaimed %d jobs whose lease expired", len(reclaimed))
                JOB_OUTCOMES.labels("reclaimed").inc(len(reclaimed))
                self._wake.notify()
            readable, _, _ = select.select([connection], [], [],
                                           min(self.settings.poll_seconds, 0.5))
            if readable:
                connection.poll()
                if connection.notifies:
                    connection.notifies.clear()
                    self._wake.notify()


def _read_playlists(cursor: Any, playlist_ids: list[int]) -> dict[int, list[int]]:
    """Songs of the given playlists, in order; missing playlists are absent."""
    cursor.execute(sql_text("service_playlists"), {"playlist_ids": playlist_ids})
    return {playlist_id: list(song_ids) for playlist_id, song_ids in cursor.fetchall()}


def _merge(total: dict[str, int], part: dict[str, int]) -> None:
    """Add outcome counts into ``total``."""
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


# ---------------------------------------------------------------------------------------------
# The service object of one process
# ---------------------------------------------------------------------------------------------


class RecommendationService:
    """Model, catalog names, database pool and queue workers of one service process.

    The model and the catalog names load on first need (a request, /ready, the queue workers'
    start or a CLI command that scores), once per process, so that commands which only touch
    the database (``init-db``, ``load-demo``) neither pay for them nor log about them.
    """

    def __init__(self, settings: Settings, recommender: Recommender | None = None) -> None:
        """Remember the settings and a given recommender; load nothing yet."""
        self.settings = settings
        self.database = Database(settings.database_url, settings.pool_size,
                                 settings.db_connect_timeout)
        self.recommender: Recommender | None = None
        self.model_error: str | None = None
        self.workers: QueueWorkers | None = None
        self.catalog: dict[int, tuple[str | None, str | None, str | None]] = {}
        self._catalog_attempted = 0.0
        self._catalog_tried = False
        self._model_lock = threading.Lock()
        self._catalog_lock = threading.Lock()
        self._model_tried = False
        if recommender is not None:
            self._serve(recommender)
            self._model_tried = True

    def load(self) -> None:
        """Load the model and the catalog names now unless done before, so no request waits."""
        self._ensure_model()
        self._ensure_catalog()

    def _ensure_model(self) -> None:
        """Load the checkpoint on first need, once; other threads wait for that one load."""
        if self._model_tried:
            return
        with self._model_lock:
            if self._model_tried:
                return
            recommender = self._load_model()
            if recommender is not None:
                self._serve(recommender)
            self._model_tried = True

    def _serve(self, recommender: Recommender) -> None:
        """Serve ``recommender``: set the version gauge and build the queue workers on it."""
        MODEL_INFO.labels(recommender.model_version).set(1)
        self.workers = QueueWorkers(self.settings, self.database, recommender)
        self.recommender = recommender

    def _load_model(self) -> Recommender | None:
        """Load the checkpoint at MODEL_PATH (weights_only, through the Recommender)."""
        path = self.settings.model_path
        if not path.is_file():
            self.model_error = f"model not loaded: no checkpoint at MODEL_PATH ({path})"
            log.warning(self.model_error)
            return None
        try:
            from train import Recommender

            return Recommender.from_checkpoint(path)
        except Exception as error:
            self.model_error = f"model not loaded: {_first_line(error)}"
            log.exception("loading %s failed", path)
            return None

    def _ensure_catalog(self, retry_after: float | None = None) -> None:
        """Load the names on first need; retry an empty database read ``retry_after`` s old."""
        if not self._catalog_due(retry_after):
            return
        with self._catalog_lock:
            if self._catalog_due(retry_after):
                self._load_catalog()
                self._catalog_tried = True

    def _catalog_due(self, retry_after: float | None) -> bool:
        """True until the first load ended, or when an empty database read may be retried."""
        if not self._catalog_tried:
            return True
        return (retry_after is not None and not self.catalog
                and self.settings.catalog_dir is None
                and time.monotonic() - self._catalog_attempted > retry_after)

    def _load_catalog(self) -> None:
        """Cache song, artist and album names from CATALOG_DIR, else from the database."""
        self._catalog_attempted = time.monotonic()
        try:
            if self.settings.catalog_dir is not None:
                frame = preprocessing.read_catalog_names(self.settings.catalog_dir)
            else:
                with self.database.connection() as connection:
                    frame = preprocessing.read_catalog_names(connection)
                    connection.rollback()
        except Exception as error:
            log.warning("catalog names not loaded (%s); answers carry ids only",
                        _first_line(error))
            return
        self.catalog = {
            int(song_id): (_text(song), _text(artist), _text(album))
            for song_id, song, artist, album in zip(frame.index, frame["song"], frame["artist"],
                                                    frame["album"], strict=True)
        }
        log.info("cached names of %d songs", len(self.catalog))

    def require_model(self) -> Recommender:
        """The recommender (loaded on first need), or ModelUnavailable with the reason."""
        self._ensure_model()
        if self.recommender is None:
            raise ModelUnavailable(self.model_error or "model not loaded")
        return self.recommender

    def readiness(self) -> str | None:
        """None when ready to serve both paths, else the reason; loads what is not loaded."""
        self._ensure_model()
        if self.recommender is None:
            return self.model_error or "model not loaded"
        reason = self.database.check()
        if reason is None:
            self._ensure_catalog(retry_after=CATALOG_RETRY_SECONDS)
        return reason

    def names(self, song_id: int) -> dict[str, str | None]:
        """Song, artist and album names of a catalog song (None when unknown)."""
        self._ensure_catalog()
        song, artist, album = self.catalog.get(song_id, (None, None, None))
        return {"song": song, "artist": artist, "album": album}

    def recommend_songs(self, song_ids: list[int], k: int, exclude_seen: bool) -> dict[str, Any]:
        """The synchronous answer for a list of catalog song ids."""
        model = self.require_model()
        result = model.recommend([song_ids], k=k, exclude_seen=exclude_seen)[0]
        ranking = ranked(0, result)
        return {
            "model_version": model.model_version,
            "recommendations": self._ranked_rows(ranking.song_ids, ranking.scores),
            "unknown_song_ids": [int(song) for song in result.unknown_song_ids],
        }

    def _ranked_rows(self, song_ids: Sequence[int], scores: Sequence[float],
                     ) -> list[dict[str, Any]]:
        """Rank, id, score and names of each recommended song."""
        return [{"rank": rank, "song_id": int(song_id), "score": float(score),
                 **self.names(int(song_id))}
                for rank, (song_id, score) in enumerate(zip(song_ids, scores, strict=True),
                                                        start=1)]

    def enqueue(self, playlist_id: int, k: int) -> dict[str, Any]:
        """Commit a job (or find the playlist's open one) and return its state."""
        def work(cursor: Any) -> dict[str, Any]:
            cursor.execute(sql_text("jobs_enqueue"), {"playlist_id": playlist_id, "k": k})
            job_id = cursor.fetchone()[0]
            return _job_row(cursor, job_id)

        return self.database.run(work)

    def job(self, job_id: int) -> dict[str, Any] | None:
        """One job's state, or None."""
        return self.database.run(lambda cursor: _job_row(cursor, job_id))

    def stored_recommendations(self, playlist_id: int) -> dict[str, Any] | None:
        """The stored top-k of a playlist, or None when there is none."""
        def work(cursor: Any) -> list[tuple]:
            cursor.execute(sql_text("recommendations_read"), {"playlist_id": playlist_id})
            return cursor.fetchall()

        rows = self.database.run(work)
        if not rows:
            return None
        return {
            "playlist_id": playlist_id,
            "model_version": rows[0][3],
            "created_at": max(row[4] for row in rows).isoformat(),
            "recommendations": self._ranked_rows([row[1] for row in rows],
                                                 [row[2] for row in rows]),
        }

    def update_queue_gauge(self) -> None:
        """Refresh the queue depth gauge from the database (skipped when it is away)."""
        def work(cursor: Any) -> dict[str, int]:
            cursor.execute(sql_text("jobs_depth"))
            return dict(cursor.fetchall())

        try:
            depth = self.database.run(work, retries=0)
        except (DatabaseUnavailable, psycopg2.Error):
            return
        for status in ("queued", "running"):
            QUEUE_DEPTH.labels(status).set(depth.get(status, 0))

    def start_workers(self) -> None:
        """Load the model and names, then start this process's workers (none without a model)."""
        self.load()
        if self.workers is None:
            log.warning("queue workers not started: %s", self.model_error)
            return
        self.workers.start()

    def stop_workers(self, timeout: float | None = None) -> bool:
        """Stop this process's queue workers; True when they all ended in time."""
        return True if self.workers is None else self.workers.stop(timeout)


def _text(value: Any) -> str | None:
    """A name as text, None for missing values (empty, or NaN from pandas)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _job_row(cursor: Any, job_id: int) -> dict[str, Any] | None:
    """A job row as a JSON-ready dict."""
    cursor.execute(sql_text("jobs_get"), {"job_id": job_id})
    row = cursor.fetchone()
    if row is None:
        return None
    names = [column.name for column in cursor.description]
    job = dict(zip(names, row, strict=True))
    for key in ("run_after", "created_at", "updated_at", "finished_at"):
        if job[key] is not None:
            job[key] = job[key].isoformat()
    return job


# ---------------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        """Remember the status and the message."""
        super().__init__(message)
        self.status = status
        self.message = message


api = Blueprint("api", __name__)


def service() -> RecommendationService:
    """The service object of the current app."""
    return current_app.extensions[EXTENSION_KEY]


def _integer(value: Any, field: str, low: int, high: int) -> int:
    """An integral JSON number in [low, high]; bools and fractions are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{field}: expected an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ApiError(400, f"{field}: expected an integer")
        value = int(value)
    if not low <= value <= high:
        raise ApiError(400, f"{field}: must be between {low} and {high}")
    return value


def _json_body(allowed: set[str], required: set[str]) -> dict[str, Any]:
    """The request's JSON object, with unknown and missing fields refused by name."""
    if not request.is_json:
        raise ApiError(415, "body: expected Content-Type application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object")
    for name in sorted(body):
        if name not in allowed:
            raise ApiError(400, f"{name}: unknown field")
    for name in sorted(required):
        if name not in body:
            raise ApiError(400, f"{name}: required")
    return body


def _k(body: dict[str, Any]) -> int:
    """The ``k`` field, default 10."""
    return _integer(body.get("k", 10), "k", 1, MAX_K)


@api.get("/health")
def health() -> Response:
    """The process is alive."""
    return jsonify(status="ok")


@api.get("/ready")
def ready() -> tuple[Response, int] | Response:
    """The model is loaded and the database answers; 503 with the reason otherwise."""
    current = service()
    reason = current.readiness()
    if reason is not None:
        return jsonify(error=reason), 503
    return jsonify(status="ready", model_version=current.require_model().model_version)


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of every process of this service."""
    service().update_queue_gauge()
    return Response(metrics_payload(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


@api.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of this API."""
    return jsonify(openapi_document(service().settings))


@api.post("/recommend")
def recommend_playlist() -> tuple[Response, int, dict[str, str]]:
    """Enqueue a playlist; 202 once the job row is committed."""
    body = _json_body({"playlist_id", "k"}, {"playlist_id"})
    playlist_id = _integer(body["playlist_id"], "playlist_id", 0, BIGINT_MAX)
    job = service().enqueue(playlist_id, _k(body))
    accepted = {"job_id": job["job_id"], "status": job["status"],
                "playlist_id": job["playlist_id"], "k": job["k"]}
    return jsonify(accepted), 202, {"Location": f"/jobs/{job['job_id']}"}


@api.get("/jobs/<int:job_id>")
def get_job(job_id: int) -> Response:
    """A job's state."""
    job = service().job(job_id) if job_id <= BIGINT_MAX else None
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return jsonify(job)


@api.get("/playlists/<int:playlist_id>/recommendations")
def get_recommendations(playlist_id: int) -> Response:
    """The stored top-k of a playlist; 404 when none is stored."""
    stored = service().stored_recommendations(playlist_id) if playlist_id <= BIGINT_MAX else None
    if stored is None:
        raise ApiError(404, f"no recommendations stored for playlist {playlist_id}")
    return jsonify(stored)


@api.post("/recommendations")
def recommend_songs() -> Response:
    """Top-k for a list of catalog song ids, computed now, without the database."""
    current = service()
    body = _json_body({"song_ids", "k", "exclude_seen"}, {"song_ids"})
    song_ids = body["song_ids"]
    limit = current.settings.max_song_ids
    if not isinstance(song_ids, list) or not song_ids:
        raise ApiError(400, "song_ids: expected a non-empty list of integers")
    if len(song_ids) > limit:
        raise ApiError(400, f"song_ids: at most {limit} songs")
    ids = [_integer(value, f"song_ids[{index}]", 0, BIGINT_MAX)
           for index, value in enumerate(song_ids)]
    exclude_seen = body.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise ApiError(400, "exclude_seen: expected true or false")
    return jsonify(current.recommend_songs(ids, _k(body), exclude_seen))


def _start_timer() -> None:
    """Remember when the request started, for the latency histogram."""
    g.started = time.perf_counter()


def _authorize() -> tuple[Response, int, dict[str, str]] | None:
    """Refuse requests without the bearer token when API_TOKEN is set."""
    token = current_app.extensions[EXTENSION_KEY].settings.api_token
    if not token or request.endpoint in PUBLIC_ENDPOINTS:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                          token.encode()):
        return None
    return (jsonify(error="missing or invalid bearer token"), 401,
            {"WWW-Authenticate": "Bearer"})


def _observe(response: Response) -> Response:
    """Count the request and its latency per route."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    started = g.get("started")
    if started is not None:
        LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


def _api_error(error: ApiError) -> tuple[Response, int]:
    """JSON body for an ApiError."""
    return jsonify(error=error.message), error.status


def _http_error(error: HTTPException) -> Response:
    """JSON body for werkzeug's HTTP errors (404, 405, 413, ...), keeping their headers."""
    response = error.get_response()
    response.set_data(jsonify(error=(error.name or "error").lower()).get_data())
    response.content_type = "application/json"
    return response


def _unavailable(error: Exception) -> tuple[Response, int]:
    """503 for a missing model or database."""
    if isinstance(error, DatabaseUnavailable):
        return jsonify(error=f"database unavailable: {error}"), 503
    return jsonify(error=str(error)), 503


def _database_error(error: psycopg2.Error) -> tuple[Response, int]:
    """503 when the schema is missing, 500 (logged, no details) for other database errors."""
    if isinstance(error, (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedFunction)):
        return jsonify(error="database schema missing: run `flask --app flask_app init-db`"), 503
    log.exception("database error")
    return jsonify(error="internal server error"), 500


def _unexpected(error: Exception) -> tuple[Response, int]:
    """500 without details; the traceback goes to the log only."""
    log.exception("unhandled error")
    return jsonify(error="internal server error"), 500


# ---------------------------------------------------------------------------------------------
# OpenAPI document
# ---------------------------------------------------------------------------------------------


def _error_response(description: str) -> dict[str, Any]:
    """An OpenAPI response whose body is the error object."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    """An OpenAPI JSON response referring to a component schema."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    """An OpenAPI 3.0 nullable schema."""
    return {"type": kind, "nullable": True, **extra}


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The hand-written OpenAPI 3.0 description of every route under these settings."""
    integer_id = {"type": "integer", "minimum": 0, "maximum": BIGINT_MAX}
    k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
    common = {
        "400": _error_response("A field is invalid; the message names it."),
        "401": _error_response("Missing or wrong bearer token (when API_TOKEN is set)."),
        "413": _error_response("Body larger than MAX_CONTENT_LENGTH."),
        "415": _error_response("Body is not application/json."),
    }
    unavailable = _error_response("Model not loaded or database unreachable.")
    song = {
        "type": "object",
        "required": ["rank", "song_id", "score", "song", "artist", "album"],
        "properties": {
            "rank": {"type": "integer", "minimum": 1, "maximum": MAX_K},
            "song_id": {"type": "integer"},
            "score": {"type": "number"},
            "song": _nullable("string"),
            "artist": _nullable("string"),
            "album": _nullable("string"),
        },
    }
    job_status = {"type": "string", "enum": ["queued", "running", "done", "failed"]}
    schemas = {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"}}},
        "Ready": {"type": "object", "required": ["status", "model_version"],
                  "properties": {"status": {"type": "string"},
                                 "model_version": {"type": "string"}}},
        "RecommendRequest": {
            "type": "object", "required": ["playlist_id"], "additionalProperties": False,
            "properties": {"playlist_id": integer_id, "k": k},
        },
        "JobAccepted": {
            "type": "object", "required": ["job_id", "status", "playlist_id", "k"],
            "properties": {"job_id": {"type": "integer"}, "status": job_status,
                           "playlist_id": {"type": "integer"}, "k": {"type": "integer"}},
        },
        "Job": {
            "type": "object",
            "required": ["job_id", "playlist_id", "k", "status", "attempts", "last_error",
                         "run_after", "created_at", "updated_at", "finished_at"],
            "properties": {
                "job_id": {"type": "integer"}, "playlist_id": {"type": "integer"},
                "k": {"type": "integer"}, "status": job_status,
                "attempts": {"type": "integer", "minimum": 0},
                "last_error": _nullable("string"),
                "run_after": {"type": "string", "format": "date-time"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "finished_at": _nullable("string", format="date-time"),
            },
        },
        "SongRecommendation": song,
        "StoredRecommendations": {
            "type": "object",
            "required": ["playlist_id", "model_version", "created_at", "recommendations"],
            "properties": {
                "playlist_id": {"type": "integer"}, "model_version": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"},
                "recommendations": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/SongRecommendation"}},
            },
        },
        "SongsRequest": {
            "type": "object", "required": ["song_ids"], "additionalProperties": False,
            "properties": {
                "song_ids": {"type": "array", "minItems": 1, "maxItems": settings.max_song_ids,
                             "items": integer_id},
                "k": k,
                "exclude_seen": {"type": "boolean", "default": True},
            },
        },
        "SongsResponse": {
            "type": "object", "required": ["model_version", "recommendations", "unknown_song_ids"],
            "properties": {
                "model_version": {"type": "string"},
                "recommendations": {"type": "array",
                                    "items": {"$ref": "#/components/schemas/SongRecommendation"}},
                "unknown_song_ids": {"type": "array", "items": {"type": "integer"}},
            },
        },
    }

    def body(schema: str) -> dict[str, Any]:
        reference = {"$ref": f"#/components/schemas/{schema}"}
        return {"required": True, "content": {"application/json": {"schema": reference}}}

    def path_id(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": integer_id}]

    paths = {
        "/health": {"get": {"summary": "Process is alive", "operationId": "health",
                            "responses": {"200": _json_response("Alive.", "Health")}}},
        "/ready": {"get": {"summary": "Model loaded and database reachable",
                           "operationId": "ready",
                           "responses": {"200": _json_response("Ready.", "Ready"),
                                         "503": _error_response("Not ready; the reason.")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text format.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          "401": common["401"]}}},
        "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                  "responses": {"200": {"description": "OpenAPI 3.0 document.",
                                                        "content": {"application/json": {
                                                            "schema": {"type": "object"}}}}}}},
        "/recommend": {"post": {
            "summary": "Enqueue recommendations for a stored playlist (asynchronous)",
            "description": "202 once the job is committed. A playlist with a queued or running "
                           "job gets that job back. An unknown playlist ends as a failed job "
                           "with last_error 'playlist not found'.",
            "operationId": "enqueue", "requestBody": body("RecommendRequest"),
            "responses": {"202": _json_response("Accepted; poll /jobs/{job_id}.", "JobAccepted"),
                          **common, "503": unavailable}}},
        "/jobs/{job_id}": {"get": {
            "summary": "State of a job", "operationId": "getJob",
            "parameters": path_id("job_id"),
            "responses": {"200": _json_response("The job.", "Job"),
                          "401": common["401"], "404": _error_response("No such job."),
                          "503": unavailable}}},
        "/playlists/{playlist_id}/recommendations": {"get": {
            "summary": "Stored recommendations of a playlist", "operationId": "getStored",
            "parameters": path_id("playlist_id"),
            "responses": {"200": _json_response("The stored top-k.", "StoredRecommendations"),
                          "401": common["401"],
                          "404": _error_response("None stored for this playlist."),
                          "503": unavailable}}},
        "/recommendations": {"post": {
            "summary": "Top-k for a list of song ids, now (synchronous, no database)",
            "operationId": "recommendSongs", "requestBody": body("SongsRequest"),
            "responses": {"200": _json_response("Recommendations.", "SongsResponse"),
                          **common, "503": unavailable}}},
    }
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "Bert4MusicRec", "version": API_VERSION,
                 "description": "Playlist continuation with BERT4Rec. Errors are always JSON "
                                "{\"error\": reason}."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if settings.api_token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
        for public in ("/health", "/ready", "/openapi.json"):
            document["paths"][public]["get"]["security"] = []
    return document


# ---------------------------------------------------------------------------------------------
# CLI commands
# ---------------------------------------------------------------------------------------------


def _model_for_cli(current: RecommendationService) -> Recommender:
    """The loaded model, or a clean CLI error saying why there is none."""
    try:
        return current.require_model()
    except ModelUnavailable as error:
        raise click.ClickException(str(error)) from None


@click.command("init-db")
@with_appcontext
@click.option("--refresh-trigger", is_flag=True,
              help="Also install sql/refresh_trigger.sql (enqueue on playlist changes).")
def init_db_command(refresh_trigger: bool) -> None:
    """Create the tables and the request_recommendations() function."""
    init_database(service().settings.database_url, refresh_trigger=refresh_trigger)
    click.echo("Initialized the database.")


@click.command("load-demo")
@with_appcontext
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEMO_DATA_DIR, show_default=True, help="Folder of the demo CSV tables.")
def load_demo_command(data_dir: Path) -> None:
    """Create the schema if needed and load the demo CSV tables (idempotent)."""
    dsn = service().settings.database_url
    init_database(dsn)
    connection = preprocessing.connect(dsn)
    try:
        counts = preprocessing.load_csv_tables(connection, data_dir)
        connection.commit()
    finally:
        connection.close()
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
@click.option("--include-seen", is_flag=True, help="Allow songs already in the playlist.")
def score_all_command(k: int, batch_size: int, include_seen: bool) -> None:
    """Store recommendations for every playlist, in batches, with a progress bar."""
    from tqdm import tqdm

    current = service()
    model = _model_for_cli(current)
    database = current.database

    def count(cursor: Any) -> int:
        cursor.execute(sql_text("service_playlists_count"))
        return int(cursor.fetchone()[0])

    def page(cursor: Any, after: int) -> list[tuple[int, list[int]]]:
        cursor.execute(sql_text("service_playlists_page"), {"after": after, "limit": batch_size})
        return [(playlist_id, list(songs)) for playlist_id, songs in cursor.fetchall()]

    after = -1
    with tqdm(total=database.run(count), unit="playlist") as progress:
        while True:
            playlists = database.run(lambda cursor, start=after: page(cursor, start))
            if not playlists:
                break
            rankings = score_playlists(model, playlists, k=k, exclude_seen=not include_seen)
            database.run(lambda cursor, items=rankings: write_rankings(
                cursor, items, model.model_version))
            after = playlists[-1][0]
            progress.update(len(playlists))
    click.echo("Stored recommendations for every playlist.")


@click.command("prune-jobs")
@with_appcontext
@click.option("--older-than", "days", type=click.FloatRange(min=0), default=7.0,
              show_default=True, help="Delete jobs that ended more than this many days ago.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=10_000,
              show_default=True, help="Jobs deleted per transaction.")
def prune_jobs_command(days: float, batch_size: int) -> None:
    """Delete done and failed jobs that ended long ago; open jobs and results stay."""
    database = service().database

    def prune(cursor: Any) -> int:
        cursor.execute(sql_text("jobs_prune"), {"older_than_seconds": days * 86_400,
                                                "limit": batch_size})
        return cursor.rowcount

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


# ---------------------------------------------------------------------------------------------
# Application factory
# ---------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, recommender: Recommender | None = None) -> Flask:
    """Build the Flask app without loading the model; workers start in gunicorn or the CLI."""
    settings = settings or Settings.from_env()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_content_length
    app.json.sort_keys = False
    app.extensions[EXTENSION_KEY] = RecommendationService(settings, recommender)
    app.register_blueprint(api)
    app.before_request(_start_timer)
    app.before_request(_authorize)
    app.after_request(_observe)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(DatabaseUnavailable, _unavailable)
    app.register_error_handler(ModelUnavailable, _unavailable)
    app.register_error_handler(psycopg2.Error, _database_error)
    app.register_error_handler(Exception, _unexpected)
    for command in (init_db_command, load_demo_command, worker_command, score_all_command,
                    prune_jobs_command):
        app.cli.add_command(command)
    return app
