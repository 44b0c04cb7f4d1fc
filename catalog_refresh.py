"""Catalog refresh: extend a service process's recommender with the PostgreSQL catalog songs its
vocabulary lacks (cold_start.extend_recommender), without retraining or a restart.

A refresh reads only the song ids above a watermark (the highest catalog id already read; the
whole table at a process's first refresh), fetches the features and names of those the
vocabulary lacks, extends a copy of the recommender and checks it (old indices unchanged,
every new song known, finite scores) before the service swaps it in whole; on any failure the
old recommender keeps serving. Requests come from the channel ``catalog_songs``: the optional
trigger of sql/catalog_trigger.sql and ``flask refresh-catalog`` notify it, every process's
LISTEN thread (workers.py) hands them to its ``CatalogRefresher``, whose one thread runs them
one at a time, coalescing those that arrive meanwhile, and reports each on
``catalog_refreshed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from psycopg2.extensions import cursor as Cursor

from catalog_names import NameRow
from config import Settings
from db import (
    DATABASE_ERRORS,
    Database,
    connected,
    connection_options,
    deadline,
    fetch_one,
    first_line,
    read_snapshot,
    sql_text,
)

if TYPE_CHECKING:
    from recommender import Recommender

log = logging.getLogger("bert4musicrec.service")

CATALOG_CHANNEL = "catalog_songs"
REPLY_CHANNEL = "catalog_refreshed"
FULL = "full"
# rows fetched per round trip when reading catalog ids and songs
CHUNK_ROWS = 50_000
# a burst of notifications (many single-row inserts) within this long makes one refresh
COALESCE_SECONDS = 0.2
RETRY_SECONDS = 30.0
# `flask refresh-catalog` stops collecting reports once none has come for this long
REPLY_QUIET_SECONDS = 2.0
# the longest playlist of new songs scored to check an extended model before serving it
PROBE_SONGS = 50

CATALOG_SONGS = Gauge("b4mr_catalog_songs", "Songs the model of each process can recommend.",
                      multiprocess_mode="liveall")
LAST_REFRESH = Gauge("b4mr_catalog_last_refresh_timestamp_seconds",
                     "Unix time of each process's last successful catalog refresh.",
                     multiprocess_mode="liveall")
REFRESHES = Counter("b4mr_catalog_refreshes_total",
                    "Catalog refreshes by outcome: extended, unchanged, failed.", ["outcome"])
REFRESH_SECONDS = Histogram("b4mr_catalog_refresh_seconds",
                            "Time to read the catalog, extend the model and check it.",
                            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                     120.0))


class RefreshError(RuntimeError):
    """An extended recommender that must not be served; the old one keeps serving."""


@dataclass(frozen=True)
class Extension:
    """One refresh's result: the recommender to serve (the given one when the catalog held no
    new song), the names of the songs it gained, and the highest catalog song id read."""

    recommender: Any
    names: list[NameRow]
    added: int
    watermark: int | None


def extendable(scorer: object) -> TypeGuard[Recommender]:
    """True for a recommender.Recommender (test doubles cannot be extended)."""
    from recommender import Recommender

    return isinstance(scorer, Recommender)


# -- reading the catalog ------------------------------------------------------------------------


def catalog_song_ids(cursor: Cursor, after: int | None) -> np.ndarray:
    """Sorted ids of the catalog songs above ``after`` (all for None), streamed in chunks
    through a server-side cursor inside ``cursor``'s transaction."""
    chunks = [np.empty(0, dtype=np.int64)]
    with cursor.connection.cursor(name="b4mr_catalog_ids") as ids:
        ids.itersize = CHUNK_ROWS
        ids.execute(sql_text("catalog_song_ids"), {"after": -2**63 if after is None else after})
        while rows := ids.fetchmany(CHUNK_ROWS):
            chunks.append(np.fromiter((row[0] for row in rows), np.int64, len(rows)))
    return np.concatenate(chunks)


def catalog_songs(cursor: Cursor, song_ids: np.ndarray) -> list[tuple[Any, ...]]:
    """Raw features (songs.sql's columns) then song, artist and album name of the given
    catalog songs, by id."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(song_ids), CHUNK_ROWS):
        chunk = [int(song) for song in song_ids[start:start + CHUNK_ROWS]]
        cursor.execute(sql_text("catalog_songs"), {"song_ids": chunk})
        rows.extend(tuple(row) for row in cursor.fetchall())
    return rows


def catalog_size(cursor: Cursor) -> tuple[int, int | None]:
    """Number of catalog songs and the highest song id (None when there is none)."""
    cursor.execute(sql_text("catalog_size"))
    count, highest = fetch_one(cursor)
    return int(count), None if highest is None else int(highest)


def notify(cursor: Cursor, channel: str, payload: str) -> None:
    """NOTIFY ``channel`` with ``payload``, delivered when the transaction commits."""
    cursor.execute(sql_text("notify"), {"channel": channel, "payload": payload})


def listen(cursor: Cursor) -> None:
    """LISTEN to catalog refresh requests on this (autocommit) connection."""
    cursor.execute(sql_text("catalog_listen"))


def listen_replies(cursor: Cursor) -> None:
    """LISTEN to the service processes' reports of their refreshes."""
    cursor.execute(sql_text("catalog_replies_listen"))


# -- extending ----------------------------------------------------------------------------------


def extend_from_database(recommender: Recommender, settings: Settings,
                         after: int | None) -> Extension:
    """Read the catalog songs above ``after`` that ``recommender`` lacks (one snapshot, on a
    connection of its own, within DB_CATALOG_TIMEOUT_SECONDS) and extend it with them."""
    from cold_start import extend_recommender
    from preprocessing import songs_frame

    seconds = settings.db_catalog_timeout_seconds
    with deadline(seconds):
        options = connection_options(settings.database_url, settings, seconds)
        with connected(settings.database_url, **options) as connection, \
                read_snapshot(connection), connection.cursor() as cursor:
            ids = catalog_song_ids(cursor, after)
            missing = ids[~np.isin(ids, recommender.encoders.song_ids)]
            rows = catalog_songs(cursor, missing) if len(missing) else []
    watermark = int(ids[-1]) if len(ids) else after
    if not rows:
        return Extension(recommender, [], 0, watermark)
    width = len(rows[0]) - 3
    songs = songs_frame([[row[column] for row in rows] for column in range(width)])
    extended = extend_recommender(recommender, songs)
    check_extension(recommender, extended, songs["song_id"].to_numpy())
    names = [(row[0], *row[width:]) for row in rows]
    return Extension(extended, names, extended.n_songs - recommender.n_songs, watermark)


def check_extension(old: Recommender, new: Recommender, song_ids: np.ndarray) -> None:
    """RefreshError unless ``new`` keeps every index of ``old``, knows every song of
    ``song_ids`` and scores a playlist of them with finite scores."""
    kept = new.encoders.song_ids[:old.n_songs]
    if not np.array_equal(kept, old.encoders.song_ids):
        raise RefreshError("the extended vocabulary moved existing songs")
    lacking = song_ids[~np.isin(song_ids, new.encoders.song_ids)]
    if len(lacking):
        raise RefreshError(f"the extended vocabulary lacks {len(lacking)} new songs "
                           f"(ids {lacking[:5].tolist()})")
    probe = [int(song) for song in song_ids[-PROBE_SONGS:]]
    answer = new.recommend([probe], k=10, exclude_seen=True)[0]
    if not answer.song_ids or not all(math.isfinite(score) for score in answer.scores):
        raise RefreshError("the extended model gives no finite scores for the new songs")


def extend_at_start(recommender: Recommender, settings: Settings
                    ) -> tuple[Recommender, int | None]:
    """The recommender extended with every catalog song it lacks and the watermark, for the
    gunicorn master before the fork; on failure (logged) the same recommender and None.
    Either way its tables end up in a TableReserve, so that a worker's later refresh appends
    rows in place instead of copying what the workers share (table_reserve.py)."""
    from cold_start import prepare_for_extensions, with_reserve

    prepare_for_extensions()
    started = time.perf_counter()
    try:
        extension = extend_from_database(recommender, settings, None)
    except Exception as error:
        log.warning("catalog not read before the fork (%s); each worker tries on its own",
                    first_line(error), exc_info=not isinstance(error, DATABASE_ERRORS))
        return with_reserve(recommender), None
    log.info("catalog read before the fork: %d songs added, %d served, in %.2f s",
             extension.added, extension.recommender.n_songs, time.perf_counter() - started)
    extended = extension.recommender
    return (extended if extended.reserve is not None else with_reserve(extended),
            extension.watermark)


# -- the refresh thread -------------------------------------------------------------------------


@dataclass
class Request:
    """What the pending notifications ask for: a full read, or from which song id on."""

    full: bool = False
    lowest: int | None = None

    def merge(self, other: Request) -> None:
        """Ask for what either request asks for."""
        self.full |= other.full
        if other.lowest is not None:
            self.lowest = other.lowest if self.lowest is None else min(self.lowest,
                                                                        other.lowest)


def parse_request(payload: str) -> Request:
    """A notification's payload: ``full``, a lowest new song id, or empty (from the
    watermark); anything else is read as ``full``."""
    text = payload.strip()
    if not text:
        return Request()
    try:
        return Request(lowest=int(text))
    except ValueError:
        return Request(full=True)


Refresh = Callable[[int | None], Extension]


class CatalogRefresher:
    """The one thread of a process that runs its catalog refreshes, one at a time.

    ``refresh(after)`` (the service's) extends and swaps; this class decides ``after``, keeps
    the watermark, retries a failure every RETRY_SECONDS, counts outcomes and replies.
    """

    def __init__(self, database: Database, refresh: Refresh, watermark: int | None) -> None:
        """Prepare the thread; ``start`` runs a first refresh from ``watermark`` (None: the
        whole catalog)."""
        self.database = database
        self.watermark = watermark
        self._refresh = refresh
        self._lock = threading.Lock()
        self._pending: Request | None = None
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self, payload: str) -> None:
        """Ask for a refresh (called by the LISTEN thread for each notification)."""
        with self._lock:
            if self._pending is None:
                self._pending = Request()
            self._pending.merge(parse_request(payload))
        self._wanted.set()

    def start(self) -> None:
        """Start the thread with a first refresh (a no-op while it runs in this process)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self.request(FULL if self.watermark is None else "")
        self._thread = threading.Thread(target=self._run, name="b4mr-catalog-refresh",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop after the refresh in hand."""
        self._stopping.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        """Wait for requests and run them; a failed one is tried again after RETRY_SECONDS."""
        failed: Request | None = None
        while not self._stopping.is_set():
            if not self._wanted.wait(None if failed is None else RETRY_SECONDS):
                self.request("")
            if self._stopping.wait(COALESCE_SECONDS):
                return
            with self._lock:
                wanted, self._pending = self._pending or Request(), None
                self._wanted.clear()
            if failed is not None:
                wanted.merge(failed)
            failed = None if self.run_once(wanted) else wanted

    def run_once(self, wanted: Request) -> bool:
        """One refresh for ``wanted``: counted, logged and replied; True when it succeeded."""
        after = None if wanted.full or self.watermark is None else self.watermark
        if after is not None and wanted.lowest is not None:
            after = min(after, wanted.lowest - 1)
        started = time.perf_counter()
        try:
            extension = self._refresh(after)
        except Exception as error:
            REFRESHES.labels("failed").inc()
            log.error("catalog refresh failed, the model in service is unchanged: %s",
                      first_line(error), exc_info=not isinstance(error, DATABASE_ERRORS))
            self._reply({"outcome": "failed", "error": first_line(error)[:500]})
            return False
        seconds = time.perf_counter() - started
        REFRESH_SECONDS.observe(seconds)
        if extension.watermark is not None:
            self.watermark = extension.watermark if self.watermark is None else max(
                self.watermark, extension.watermark)
        outcome = "extended" if extension.added else "unchanged"
        REFRESHES.labels(outcome).inc()
        LAST_REFRESH.set(time.time())
        songs = int(extension.recommender.n_songs)
        CATALOG_SONGS.set(songs)
        log.log(logging.INFO if extension.added else logging.DEBUG,
                "catalog refresh from song id %s: %d songs added, %d served, in %.2f s",
                "the first" if after is None else after + 1, extension.added, songs, seconds)
        self._reply({"outcome": outcome, "added": extension.added, "songs": songs,
                     "seconds": round(seconds, 3)})
        return True

    def _reply(self, report: dict[str, Any]) -> None:
        """Tell ``flask refresh-catalog`` (and any listener) what this process did."""
        payload = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **report})
        try:
            self.database.run(lambda cursor: notify(cursor, REPLY_CHANNEL, payload), retries=0)
        except Exception as error:
            log.warning("catalog refresh report not sent (%s)", first_line(error))


# -- asking the running service -----------------------------------------------------------------


@dataclass(frozen=True)
class RefreshReport:
    """What ``flask refresh-catalog`` saw: the catalog's size and highest id, and the report of
    every service process that answered (``host``, ``pid``, ``outcome``, ...), in order."""

    songs: int
    highest: int | None
    replies: list[dict[str, Any]]


def request_refresh(settings: Settings, full: bool, wait: float,
                    quiet: float = REPLY_QUIET_SECONDS) -> RefreshReport:
    """NOTIFY every service process listening on this database to refresh (``full``: read the
    whole catalog) and collect their reports for up to ``wait`` s, ending early once none has
    come for ``quiet`` s after the last one."""
    options = connection_options(settings.database_url, settings)
    with connected(settings.database_url, **options) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            listen_replies(cursor)
            songs, highest = catalog_size(cursor)
            notify(cursor, CATALOG_CHANNEL, FULL if full else "")
        replies: list[dict[str, Any]] = []
        end = time.monotonic() + wait
        last = None
        while (now := time.monotonic()) < end and (last is None or now - last < quiet):
            limit = end - now if last is None else min(end - now, quiet - (now - last))
            if not select.select([connection], [], [], max(0.0, limit))[0]:
                continue
            connection.poll()
            for note in connection.notifies:
                try:
                    replies.append(json.loads(note.payload))
                except json.JSONDecodeError:
                    continue
                last = time.monotonic()
            connection.notifies.clear()
    return RefreshReport(songs, highest, replies)
