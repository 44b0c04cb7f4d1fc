"""The queue's workers: threads in every service process that claim due jobs, score them with
the model and store the outcome, one LISTEN thread that wakes them on NOTIFY and reclaims expired
leases, their backoff while the database is away, and the queue's Prometheus metrics.

The statements they run are jobs.py's; turning a model answer into a storable ranking (refusing
NaN scores or an empty answer) is here, shared with the service's synchronous path and the CLI.
Nothing here knows about HTTP or Flask.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import psycopg2
from prometheus_client import Counter, Gauge, Histogram
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from catalog_refresh import CATALOG_CHANNEL
from catalog_refresh import listen as listen_catalog
from config import Settings
from db import (
    DATABASE_ERRORS,
    Backoff,
    Database,
    DatabaseUnavailable,
    connect,
    deadline,
    first_line,
    read_playlists,
)
from jobs import (
    ClaimedJob,
    Failure,
    Ranked,
    claim,
    complete,
    fail,
    listen,
    reclaim,
    release,
    store_rankings,
)

log = logging.getLogger("bert4musicrec.service")

T = TypeVar("T")

JOB_OUTCOMES = Counter("b4mr_job_outcomes_total",
                       "Job outcomes: done, retry, failed, lost_lease, released, reclaimed.",
                       ["outcome"])
JOB_BATCH_SECONDS = Histogram("b4mr_job_batch_seconds",
                              "Time to score and store one claimed batch of jobs.")
QUEUE_DEPTH = Gauge("b4mr_queue_depth", "Open jobs by status, read when /metrics is scraped.",
                    ["status"], multiprocess_mode="mostrecent")


class Result(Protocol):
    """One playlist's answer from the model (recommender.Recommendation)."""

    song_ids: list[int]
    scores: list[float]
    unknown_song_ids: list[int]


class Scorer(Protocol):
    """What the queue needs of a model: recommender.Recommender, or a test double."""

    model_version: str

    def recommend(self, playlists: Sequence[Sequence[int]], k: int = ...,
                  exclude_seen: bool = ...) -> Sequence[Result]:
        """Top-k catalog song ids for each playlist."""
        ...


# -- scoring ------------------------------------------------------------------------------------


class UnusableAnswer(ValueError):
    """A model answer that must not be served or stored: non-finite scores, or no songs."""


def ranked(playlist_id: int, result: Result, candidates: int | None = None) -> Ranked:
    """A model answer as a ranking; UnusableAnswer when a score is NaN or infinite, or when
    it holds no song although ``candidates`` (songs it could recommend; unknown: some) > 0."""
    scores = [float(score) for score in result.scores]
    if not all(math.isfinite(score) for score in scores):
        raise UnusableAnswer("the model gave NaN or infinite scores: its answer cannot be used")
    if not result.song_ids and (candidates is None or candidates > 0):
        raise UnusableAnswer("the model answered no songs although the catalog has songs to "
                             "recommend")
    return Ranked(playlist_id, [int(song) for song in result.song_ids], scores)


def candidate_count(scorer: Scorer, playlist: Sequence[int], exclude_seen: bool) -> int | None:
    """How many songs ``scorer`` could recommend after ``playlist`` (None when it does not
    say how many songs it knows, as test doubles may not)."""
    n_songs = getattr(scorer, "n_songs", None)
    if not isinstance(n_songs, int):
        return None
    return n_songs - len(set(playlist)) if exclude_seen else n_songs


def default_exclude_seen(scorer: Scorer) -> bool:
    """Whether ``scorer`` leaves seen songs out unless told: its checkpoint's decision
    (Recommender.exclude_seen), or True for a scorer that does not say, as test doubles may not."""
    value = getattr(scorer, "exclude_seen", True)
    return value if isinstance(value, bool) else True


def score_playlists(scorer: Scorer, playlists: Sequence[tuple[int, list[int]]], k: int,
                    exclude_seen: bool | None = None) -> list[Ranked]:
    """Score several playlists in one model call; UnusableAnswer if any answer is unusable.
    ``exclude_seen`` None: the scorer's default."""
    exclude = default_exclude_seen(scorer) if exclude_seen is None else exclude_seen
    results = scorer.recommend([songs for _, songs in playlists], k=k, exclude_seen=exclude)
    return [ranked(playlist_id, result, candidate_count(scorer, songs, exclude))
            for (playlist_id, songs), result in zip(playlists, results, strict=True)]


# -- worker threads -----------------------------------------------------------------------------


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


Finished = list[tuple[ClaimedJob, Ranked]]


class QueueWorkers:
    """A bounded pool of threads that claim, score and store jobs, plus one LISTEN thread."""

    def __init__(self, settings: Settings, database: Database, scorer: Scorer,
                 on_catalog: Callable[[str], None] | None = None) -> None:
        """Prepare the threads; ``start`` launches them. ``recommender`` may be replaced while
        they run (a catalog refresh): each batch scores and stores with the one it read first.
        ``on_catalog`` gets the payload of each catalog refresh request (catalog_refresh.py)."""
        self.settings = settings
        self.database = database
        self.recommender = scorer
        self.on_catalog = on_catalog
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
                self._threads.append(threading.Thread(
                    target=self._work, args=(f"{identity}:{index}",),
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
        settings = self.settings
        claimed = self.database.run(
            lambda cursor: claim(cursor, name, settings.lease_seconds, settings.job_batch_size))
        if not claimed:
            return 0
        started = time.monotonic()
        deadline = started + 0.9 * settings.lease_seconds
        if self._stopping.is_set():
            self._release(claimed)
            return len(claimed)
        ids = [job.playlist_id for job in claimed]
        playlists = self._until(deadline, lambda: self.database.run(
            lambda cursor: read_playlists(cursor, ids)))
        if playlists is None:
            return len(claimed)
        scorer = self.recommender
        finished, failures = self._score(scorer, claimed, playlists)
        self._until(deadline, lambda: self._store(scorer, finished, failures))
        JOB_BATCH_SECONDS.observe(time.monotonic() - started)
        return len(claimed)

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

    def _score(self, scorer: Scorer, claimed: list[ClaimedJob], playlists: dict[int, list[int]],
               ) -> tuple[Finished, list[Failure]]:
        """Score every job whose playlist exists, one model call per distinct k."""
        finished: Finished = []
        failures = [Failure(job, "playlist not found", permanent=True)
                    for job in claimed if job.playlist_id not in playlists]
        by_k: dict[int, list[ClaimedJob]] = {}
        for job in claimed:
            if job.playlist_id in playlists:
                by_k.setdefault(job.k, []).append(job)
        exclude = default_exclude_seen(scorer)
        for k, group in by_k.items():
            try:
                results = scorer.recommend(
                    [playlists[job.playlist_id] for job in group], k=k, exclude_seen=exclude)
            except Exception as error:
                log.exception("model failed on a batch of %d jobs", len(group))
                reason = f"model error: {type(error).__name__}: {first_line(error)}"
                failures.extend(Failure(job, reason, permanent=False) for job in group)
                continue
            for job, result in zip(group, results, strict=True):
                songs = playlists[job.playlist_id]
                try:
                    finished.append((job, ranked(job.playlist_id, result, candidate_count(
                        scorer, songs, exclude))))
                except UnusableAnswer as error:
                    # the same model gives the same answer again: fail now, keep what is stored
                    log.error("job %d (playlist %d) failed: %s", job.job_id, job.playlist_id,
                              error)
                    failures.append(Failure(job, f"model error: {error}", permanent=True))
        return finished, failures

    def _store(self, scorer: Scorer, finished: Finished, failures: list[Failure]) -> None:
        """Store results (as ``scorer``'s) and failures in one transaction; job by job if a
        row is refused."""
        def write(items: Finished, failed: list[Failure], retries: int = 0) -> dict[str, int]:
            return self.database.run(
                lambda cursor: self._write(cursor, scorer.model_version, items, failed), retries)

        try:
            outcomes = write(finished, failures)
        except (psycopg2.IntegrityError, psycopg2.DataError):
            log.exception("storing a batch failed; storing its jobs one by one")
            outcomes = {}
            for item in finished:
                try:
                    single = write([item], [])
                except (psycopg2.IntegrityError, psycopg2.DataError) as error:
                    reason = f"storing the result failed: {first_line(error)}"
                    single = write([], [Failure(item[0], reason, permanent=False)], retries=1)
                _merge(outcomes, single)
            if failures:
                _merge(outcomes, write([], failures, retries=1))
        for outcome, count in outcomes.items():
            JOB_OUTCOMES.labels(outcome).inc(count)

    def _write(self, cursor: Cursor, model_version: str, finished: Finished,
               failures: list[Failure]) -> dict[str, int]:
        """Mark owned jobs done with their results, record failures; return outcome counts."""
        outcomes: dict[str, int] = {}
        if finished:
            owned = complete(cursor, [job for job, _ in finished])
            store_rankings(cursor, [ranking for job, ranking in finished if job.job_id in owned],
                           model_version)
            outcomes["done"] = len(owned)
            outcomes["lost_lease"] = len(finished) - len(owned)
        if failures:
            for status in fail(cursor, failures, self.settings).values():
                key = "failed" if status == "failed" else "retry"
                outcomes[key] = outcomes.get(key, 0) + 1
        return outcomes

    def _release(self, claimed: list[ClaimedJob]) -> None:
        """Give claimed jobs back to the queue without counting the attempt (shutdown)."""
        try:
            JOB_OUTCOMES.labels("released").inc(
                self.database.run(lambda cursor: release(cursor, claimed)))
        except DatabaseUnavailable as error:
            log.warning("could not release %d jobs (%s); their leases will expire",
                        len(claimed), error)

    def _listen(self) -> None:
        """Wake workers on NOTIFY and reclaim expired leases; reconnect with backoff."""
        backoff = Backoff()
        while not self._stopping.is_set():
            connection = None
            try:
                with deadline(self.database.timeout):
                    connection = connect(self.database.dsn, **self.database.options)
                    connection.autocommit = True
                    with connection.cursor() as cursor:
                        listen(cursor)
                        if self.on_catalog is not None:
                            listen_catalog(cursor)
                backoff.reset()
                self._wake.notify()
                if self.on_catalog is not None:
                    self.on_catalog("")  # catch up on requests sent while not listening
                self._listen_on(connection)
            except DATABASE_ERRORS as error:
                log.warning("LISTEN connection lost (%s); reconnecting", first_line(error))
                self._stopping.wait(backoff.next())
            except Exception:
                log.exception("LISTEN thread error; reconnecting")
                self._stopping.wait(backoff.next())
            finally:
                if connection is not None:
                    connection.close()

    def _listen_on(self, connection: Connection) -> None:
        """Wait for notifications on one connection; reclaim expired leases meanwhile."""
        while not self._stopping.is_set():
            with deadline(self.database.timeout), connection.cursor() as cursor:
                reclaimed = reclaim(cursor, self.settings.max_attempts)
            if reclaimed:
                log.warning("reclaimed %d jobs whose lease expired", len(reclaimed))
                JOB_OUTCOMES.labels("reclaimed").inc(len(reclaimed))
                self._wake.notify()
            # notifications that came in with the reclaim's answer are read already, so the
            # socket is not readable for them: handle them before waiting
            if not connection.notifies and select.select(
                    [connection], [], [], min(self.settings.poll_seconds, 0.5))[0]:
                connection.poll()
            if connection.notifies:
                catalog = [note.payload for note in connection.notifies
                           if note.channel == CATALOG_CHANNEL]
                connection.notifies.clear()
                self._wake.notify()
                for payload in catalog:
                    if self.on_catalog is not None:
                        self.on_catalog(payload)


def _merge(total: dict[str, int], part: dict[str, int]) -> None:
    """Add outcome counts into ``total``."""
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
