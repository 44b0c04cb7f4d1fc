"""The state of one service process: the model and the catalog's names, each loaded once on
first need, the database pool and the queue workers built on them.

Kept apart from flask_app.py so that the routes read as HTTP only and this state reads as one
object with its locks; it runs no SQL itself (db.py and jobs.py do).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
from prometheus_client import Gauge

import jobs
from config import Settings
from db import Database, DatabaseUnavailable, catalog_names, first_line
from jobs import QUEUE_DEPTH, JobState, QueueWorkers, Scorer, StoredRanking

log = logging.getLogger("bert4musicrec.service")

CATALOG_RETRY_SECONDS = 30.0
MODEL_INFO = Gauge("b4mr_model_info", "1 for the model version this process serves.",
                   ["model_version"], multiprocess_mode="max")

Names = tuple[str | None, str | None, str | None]


class ModelUnavailable(RuntimeError):
    """No model is loaded, so nothing can be scored."""


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
        self.database = Database(settings.database_url, settings.pool_size,
                                 settings.db_connect_timeout)
        self.recommender: Scorer | None = None
        self.model_error: str | None = None
        self.workers: QueueWorkers | None = None
        self.catalog: dict[int, Names] = {}
        self._catalog_attempted = 0.0
        self._catalog_tried = False
        self._model_lock = threading.Lock()
        self._catalog_lock = threading.Lock()
        self._model_tried = False
        if recommender is not None:
            self._serve(recommender)
            self._model_tried = True

    # -- model ----------------------------------------------------------------------------------

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

    def _serve(self, recommender: Scorer) -> None:
        """Serve ``recommender``: set the version gauge and build the queue workers on it."""
        MODEL_INFO.labels(recommender.model_version).set(1)
        self.workers = QueueWorkers(self.settings, self.database, recommender)
        self.recommender = recommender

    def _load_model(self) -> Scorer | None:
        """Load the checkpoint at MODEL_PATH (weights_only, through the Recommender)."""
        path = self.settings.model_path
        if not path.is_file():
            self.model_error = f"model not loaded: no checkpoint at MODEL_PATH ({path})"
            log.warning(self.model_error)
            return None
        try:
            from recommender import Recommender

            return Recommender.from_checkpoint(path, index=self.settings.recommender_index)
        except Exception as error:
            self.model_error = f"model not loaded: {first_line(error)}"
            log.exception("loading %s failed", path)
            return None

    def require_model(self) -> Scorer:
        """The recommender (loaded on first need), or ModelUnavailable with the reason."""
        self._ensure_model()
        if self.recommender is None:
            raise ModelUnavailable(self.model_error or "model not loaded")
        return self.recommender

    # -- catalog names --------------------------------------------------------------------------

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
                from preprocessing import read_catalog_names

                frame = read_catalog_names(self.settings.catalog_dir)
                rows = list(zip(frame.index, frame["song"], frame["artist"], frame["album"],
                                strict=True))
            else:
                with self.database.connection() as connection:
                    rows = catalog_names(connection)
        except Exception as error:
            log.warning("catalog names not loaded (%s); answers carry ids only",
                        first_line(error))
            return
        self.catalog = {int(song_id): (_text(song), _text(artist), _text(album))
                        for song_id, song, artist, album in rows}
        log.info("cached names of %d songs", len(self.catalog))

    def ranked_songs(self, song_ids: Sequence[int], scores: Sequence[float]) -> list[RankedSong]:
        """Rank, id, score and names of each recommended song."""
        self._ensure_catalog()
        return [RankedSong(rank, int(song_id), float(score),
                           *self.catalog.get(int(song_id), (None, None, None)))
                for rank, (song_id, score) in enumerate(zip(song_ids, scores, strict=True),
                                                        start=1)]

    # -- answers --------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when ready to serve both paths, else the reason; loads what is not loaded."""
        self._ensure_model()
        if self.recommender is None:
            return self.model_error or "model not loaded"
        reason = self.database.check()
        if reason is None:
            self._ensure_catalog(retry_after=CATALOG_RETRY_SECONDS)
        return reason

    def recommend_songs(self, song_ids: list[int], k: int, exclude_seen: bool) -> SongsAnswer:
        """The synchronous answer for a list of catalog song ids (no database)."""
        model = self.require_model()
        result = model.recommend([song_ids], k=k, exclude_seen=exclude_seen)[0]
        ranking = jobs.ranked(0, result)
        return SongsAnswer(model.model_version, self.ranked_songs(ranking.song_ids,
                                                                  ranking.scores),
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
                            self.ranked_songs(stored.song_ids, stored.scores))

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
    """A name as text, None for missing values (None, empty, or NaN from pandas)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)
