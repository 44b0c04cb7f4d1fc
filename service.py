"""The state of one service process: the model and the catalog's names, each loaded once on
first need, the database pool and the queue workers built on them.

Under gunicorn the model and the names are loaded once in the master before it forks
(``preload_model``), so every worker serves the same pages of the scoring matrix, the index and
the names, shared copy-on-write; the database pool and the queue workers are still built in each
worker after the fork. Without a preload (``flask run``, the CLI), or where the master could not
read the names, each process loads what it lacks itself on first need.

The served model is replaced whole by a catalog refresh (``refresh_catalog``, run by
catalog_refresh.CatalogRefresher): every request and job batch reads it once.

Kept apart from flask_app.py so that the routes read as HTTP only and this state reads as one
object with its locks; it runs no SQL itself (db.py, jobs.py and catalog_refresh.py do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from prometheus_client import Gauge

import catalog_refresh
import jobs
import workers
from catalog_names import CatalogNames, NameRow
from config import Settings
from db import (
    Database,
    DatabaseUnavailable,
    catalog_names,
    connected,
    connection_options,
    deadline,
    first_line,
    install_wait_deadlines,
    one_line,
    remove_wait_deadlines,
)
from jobs import JobState, StoredRanking
from workers import QUEUE_DEPTH, QueueWorkers, Scorer

log = logging.getLogger("bert4musicrec.service")

CATALOG_RETRY_SECONDS = 30.0
# The synchronous path waits for names that are still loading at most this long after the load
# began (so only the first requests of a process may wait, never on a hung database for long).
NAMES_WAIT_SECONDS = 2.0
MODEL_INFO = Gauge("b4mr_model_info", "1 for the model version this process serves.",
                   ["model_version"], multiprocess_mode="max")


class ModelUnavailable(RuntimeError):
    """No model is loaded, so nothing can be scored."""


@dataclass(frozen=True)
class PreloadedModel:
    """The outcome of loading the model in the gunicorn master: the recommender or the reason
    there is none, for the checkpoint and index mode it was loaded with, by process ``pid``,
    the highest catalog song id its vocabulary was extended to (None: not read), and the
    catalog's names (None: not read there, so each worker reads them)."""

    model_path: Path
    index: str
    recommender: Scorer | None
    error: str | None
    pid: int
    threads: int
    catalog_watermark: int | None
    names: CatalogNames | None


_preloaded: PreloadedModel | None = None


def load_recommender(settings: Settings) -> tuple[Scorer | None, str | None]:
    """The recommender of the checkpoint at MODEL_PATH (weights_only, through the Recommender),
    or None and the reason it could not be loaded (logged); never raises."""
    path = settings.model_path
    if not path.is_file():
        error = f"model not loaded: no checkpoint at MODEL_PATH ({path})"
        log.warning(error)
        return None, error
    try:
        from recommender import Recommender

        return Recommender.from_checkpoint(path, index=settings.recommender_index), None
    except Exception as failure:
        from checkpoint import CheckpointError

        error = f"model not loaded: {one_line(failure)}"
        log.error("%s", error, exc_info=not isinstance(failure, CheckpointError))
        return None, error


def read_names(settings: Settings) -> CatalogNames:
    """Song, artist and album names from CATALOG_DIR, else from the database (on a connection
    of its own, within DB_CATALOG_TIMEOUT_SECONDS); raises when they cannot be read."""
    if settings.catalog_dir is not None:
        from preprocessing import read_catalog_names

        frame = read_catalog_names(settings.catalog_dir)
        return CatalogNames(zip(frame.index, frame["song"], frame["artist"], frame["album"],
                                strict=True))
    seconds = settings.db_catalog_timeout_seconds
    with deadline(seconds):
        options = connection_options(settings.database_url, settings, seconds)
        with connected(settings.database_url, **options) as connection:
            return CatalogNames(catalog_names(connection))


def preload_model(settings: Settings) -> None:
    """Load the model and the catalog names in this process for every service built in its
    forked children.

    Meant for the gunicorn master, before it forks. Torch (and faiss through it) runs on one
    thread during the load, so no OpenMP thread pool exists yet to be lost in the fork; each
    worker sets its thread count back in ``after_fork``. The objects made so far are moved
    out of the garbage collector's reach (``gc.freeze``) so that collections in the workers
    do not write to, and so copy, the pages they share. The vocabulary is extended here with
    the catalog songs the checkpoint lacks (catalog_refresh.py), and the names are read after
    that, so the workers share both. A failed model load is remembered with its reason, which
    the workers then report on /ready; names that cannot be read are left to each worker.
    """
    global _preloaded
    import torch

    threads = _preloaded.threads if _preloaded is not None else torch.get_num_threads()
    torch.set_num_threads(1)
    _preloaded = None
    started = time.perf_counter()
    recommender, error = load_recommender(settings)
    watermark = None
    names = None
    if recommender is not None:
        log.info("loaded model %s in %.1f s before forking the workers (pid %d)",
                 recommender.model_version, time.perf_counter() - started, os.getpid())
        install_wait_deadlines()
        try:
            readable = True
            if catalog_refresh.extendable(recommender):
                recommender, watermark = catalog_refresh.extend_at_start(recommender, settings)
                # a catalog that could not be read (or is empty) is not waited for twice
                readable = watermark is not None
            if readable:
                names = _preload_names(settings)
        finally:
            remove_wait_deadlines()
    _preloaded = PreloadedModel(settings.model_path, settings.recommender_index, recommender,
                                error, os.getpid(), threads, watermark, names)
    gc.collect()
    release_free_memory()
    gc.freeze()


def _preload_names(settings: Settings) -> CatalogNames | None:
    """The catalog names read in the master, or None (logged) when they could not be read."""
    started = time.perf_counter()
    try:
        names = read_names(settings)
    except Exception as error:
        log.warning("catalog names not read before the fork (%s); each worker reads them",
                    first_line(error))
        return None
    log.info("cached names of %d songs in %.1f s before forking the workers", len(names),
             time.perf_counter() - started)
    return names


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing on
    other C libraries): the transient tables of a load or a catalog extension would otherwise
    stay in the process's private memory (~100 MB per worker at 116k songs)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    trim(0)


def after_fork() -> None:
    """In a worker forked from a master that preloaded the model: torch's thread count back to
    what it was before the load (TORCH_THREADS, when set, is applied later by create_app)."""
    if _preloaded is not None:
        import torch

        torch.set_num_threads(_preloaded.threads)


@dataclass(frozen=True)
class RankedSong:
    """One recommended song: rank, catalog id, score and names (None when unknown)."""

    rank: int
    song_id: int
    score: float
    song: str | None
    artist: str | None
    album: str | None


@dataclass(frozen=True)
class SongsAnswer:
    """The synchronous answer for a list of song ids."""

    model_version: str
    recommendations: list[RankedSong]
    unknown_song_ids: list[int]


@dataclass(frozen=True)
class StoredAnswer:
    """A playlist's stored top-k with names."""

    playlist_id: int
    model_version: str
    created_at: Any
    recommendations: list[RankedSong]


class RecommendationService:
    """Model, catalog names, database pool and queue workers of one service process.

    The model and the catalog names load on first need (a request, /ready, the queue workers'
    start or a CLI command that scores), once per process, so that commands which only touch
    the database (``init-db``, ``load-demo``) neither pay for them nor log about them.
    """

    def __init__(self, settings: Settings, recommender: Scorer | None = None) -> None:
        """Remember the settings and a given recommender; load nothing yet."""
        self.settings = settings
        self.database = Database(settings)
        self.recommender: Scorer | None = None
        self.model_error: str | None = None
        self.workers: QueueWorkers | None = None
        self.catalog = CatalogNames(())
        self._catalog_started = 0.0
        self._names_wait_until = 0.0
        self._catalog_done: threading.Event | None = None
        self._learned_names: list[NameRow] = []
        self._model_lock = threading.Lock()
        self._catalog_lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._model_tried = False
        self._deadlines_installed = False
        preloaded = _preloaded
        watermark = None
        if recommender is None and preloaded is not None and (
                preloaded.model_path, preloaded.index) == (settings.model_path,
                                                           settings.recommender_index):
            recommender, self.model_error = preloaded.recommender, preloaded.error
            self._model_tried = True
            watermark = preloaded.catalog_watermark
            if preloaded.names is not None:
                self.catalog = preloaded.names
                self._catalog_done = threading.Event()
                self._catalog_done.set()
            if recommender is not None:
                log.info("serving model %s loaded before the fork by process %d (pid %d)",
                         recommender.model_version, preloaded.pid, os.getpid())
        self.refresher = catalog_refresh.CatalogRefresher(self.database, self.refresh_catalog,
                                                          watermark)
        if recommender is not None:
            self._serve(recommender)
            self._model_tried = True

    # -- model ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model now and start loading the catalog names, so no request waits."""
        self._ensure_model()
        self._ensure_catalog()

    def _ensure_model(self) -> None:
        """Load the checkpoint on first need, once; other threads wait for that one load."""
        if self._model_tried:
            return
        with self._model_lock:
            if self._model_tried:
                return
            recommender, self.model_error = load_recommender(self.settings)
            if recommender is not None:
                self._serve(recommender)
            self._model_tried = True

    def _serve(self, recommender: Scorer) -> None:
        """Serve ``recommender``: set the version gauge and build the queue workers on it
        (their LISTEN thread hands catalog notifications to the refresher)."""
        MODEL_INFO.labels(recommender.model_version).set(1)
        on_catalog = None
        if catalog_refresh.extendable(recommender):
            catalog_refresh.CATALOG_SONGS.set(recommender.n_songs)
            on_catalog = self.refresher.request
        self.workers = QueueWorkers(self.settings, self.database, recommender, on_catalog)
        self.recommender = recommender

    def refresh_catalog(self, after: int | None) -> catalog_refresh.Extension:
        """Extend the served recommender with the catalog songs above ``after`` it lacks and
        swap it in: names first, then the one reference every request and batch reads once,
        so each uses the old or the new model whole. Raises (nothing swapped) on failure."""
        with self._swap_lock:
            current = self.require_model()
            if not catalog_refresh.extendable(current):
                raise catalog_refresh.RefreshError("this model cannot be extended")
            extension = catalog_refresh.extend_from_database(current, self.settings, after)
            if extension.recommender is not current:
                with self._catalog_lock:
                    self._learned_names.extend(extension.names)
                    self.catalog = self.catalog.plus(extension.names)
                if self.workers is not None:
                    self.workers.recommender = extension.recommender
                self.recommender = extension.recommender
                MODEL_INFO.labels(current.model_version).set(0)
                MODEL_INFO.labels(extension.recommender.model_version).set(1)
                release_free_memory()
            return extension

    def require_model(self) -> Scorer:
        """The recommender (loaded on first need), or ModelUnavailable with the reason."""
        self._ensure_model()
        if self.recommender is None:
            raise ModelUnavailable(self.model_error or "model not loaded")
        return self.recommender

    # -- catalog names --------------------------------------------------------------------------

    def _ensure_catalog(self, retry_after: float | None = None) -> threading.Event:
        """Start loading the names in the background on first need (again when an empty
        database read is ``retry_after`` s old); the event is set when that load ends."""
        with self._catalog_lock:
            if self._catalog_done is None or self._catalog_due(self._catalog_done, retry_after):
                self._catalog_started = time.monotonic()
                if self._catalog_done is None:
                    self._names_wait_until = self._catalog_started + NAMES_WAIT_SECONDS
                self._catalog_done = threading.Event()
                threading.Thread(target=self._load_catalog, args=(self._catalog_done,),
                                 name="b4mr-catalog", daemon=True).start()
            return self._catalog_done

    def _catalog_due(self, last: threading.Event, retry_after: float | None) -> bool:
        """True when the last load ended empty from the database ``retry_after`` s ago."""
        return (retry_after is not None and last.is_set() and not self.catalog
                and self.settings.catalog_dir is None
                and time.monotonic() - self._catalog_started > retry_after)

    def _load_catalog(self, done: threading.Event) -> None:
        """Cache the catalog's names (``read_names``); set ``done`` at the end."""
        try:
            loaded = read_names(self.settings)
            with self._catalog_lock:
                self.catalog = loaded.plus(self._learned_names)
            log.info("cached names of %d songs", len(self.catalog))
        except Exception as error:
            log.warning("catalog names not loaded (%s); answers carry ids only",
                        first_line(error))
        finally:
            done.set()

    def ranked_songs(self, song_ids: Sequence[int], scores: Sequence[float],
                     wait: float | None) -> list[RankedSong]:
        """Rank, id, score and names of each recommended song; waits up to ``wait`` s for
        names still loading (None: until loaded), else they are None."""
        done = self._ensure_catalog(CATALOG_RETRY_SECONDS)
        if wait is None or wait > 0:
            done.wait(wait)
        catalog = self.catalog
        return [RankedSong(rank, int(song_id), float(score), *catalog.get(int(song_id)))
                for rank, (song_id, score) in enumerate(zip(song_ids, scores, strict=True),
                                                        start=1)]

    # -- answers --------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when ready to serve both paths, else the reason; loads what is not loaded."""
        self._ensure_model()
        if self.recommender is None:
            return self.model_error or "model not loaded"
        reason = self.database.check(self.settings.db_ready_timeout_seconds)
        if reason is None:
            self._ensure_catalog(CATALOG_RETRY_SECONDS)
        return reason

    def recommend_songs(self, song_ids: list[int], k: int,
                        exclude_seen: bool | None = None) -> SongsAnswer:
        """The synchronous answer for a list of catalog song ids (no database); ``exclude_seen``
        None (the client did not say): the model's default, decided from its training data."""
        model = self.require_model()
        exclude = workers.default_exclude_seen(model) if exclude_seen is None else exclude_seen
        try:
            result = model.recommend([song_ids], k=k, exclude_seen=exclude)[0]
            ranking = workers.ranked(0, result, workers.candidate_count(model, song_ids, exclude))
        except Exception as error:
            from recommender import NonFiniteScores

            if not isinstance(error, NonFiniteScores | workers.UnusableAnswer):
                raise
            log.error("synchronous answer refused: %s", error)
            raise ModelUnavailable(f"model cannot answer: {error}") from error
        # names from the database are waited for only by the first requests, and briefly
        self._ensure_catalog(CATALOG_RETRY_SECONDS)
        wait = None if self.settings.catalog_dir is not None else max(
            0.0, self._names_wait_until - time.monotonic())
        return SongsAnswer(model.model_version, self.ranked_songs(ranking.song_ids,
                                                                  ranking.scores, wait),
                           [int(song) for song in result.unknown_song_ids])

    def enqueue(self, playlist_id: int, k: int) -> JobState:
        """Commit a job (or find the playlist's open one) and return its state."""
        def work(cursor: Any) -> JobState:
            state = jobs.get(cursor, jobs.enqueue(cursor, playlist_id, k))
            if state is None:
                raise psycopg2.ProgrammingError("the enqueued job vanished")
            return state

        return self.database.run(work)

    def job(self, job_id: int) -> JobState | None:
        """One job's state, or None."""
        return self.database.run(lambda cursor: jobs.get(cursor, job_id))

    def stored_recommendations(self, playlist_id: int) -> StoredAnswer | None:
        """The stored top-k of a playlist with names, or None when there is none."""
        stored: StoredRanking | None = self.database.run(
            lambda cursor: jobs.stored_ranking(cursor, playlist_id))
        if stored is None:
            return None
        return StoredAnswer(playlist_id, stored.model_version, stored.created_at,
                            self.ranked_songs(stored.song_ids, stored.scores,
                                              self.settings.db_statement_timeout_seconds))

    def update_queue_gauge(self) -> None:
        """Refresh the queue depth gauge from the database (skipped when it is away)."""
        try:
            counts = self.database.run(jobs.depth, retries=0)
        except (DatabaseUnavailable, psycopg2.Error):
            return
        for status, count in counts.items():
            QUEUE_DEPTH.labels(status).set(count)

    # -- workers --------------------------------------------------------------------------------

    def start_workers(self) -> None:
        """Give database waits their deadlines (this is a long-running process), load the
        model, start loading the names, then start the workers (none without a model)."""
        if not self._deadlines_installed:
            install_wait_deadlines()
            self._deadlines_installed = True
        self.load()
        if self.workers is None:
            log.warning("queue workers not started: %s", self.model_error)
            return
        self.workers.start()
        if catalog_refresh.extendable(self.recommender):
            self.refresher.start()

    def stop_workers(self, timeout: float | None = None) -> bool:
        """Stop this process's queue workers and lift the deadlines start_workers installed;
        True when every worker ended in time."""
        stopped = True if self.workers is None else self.workers.stop(timeout)
        self.refresher.stop(self.settings.shutdown_seconds if timeout is None else timeout)
        if self._deadlines_installed:
            remove_wait_deadlines()
            self._deadlines_installed = False
        return stopped

