"""PostgreSQL plumbing shared by preprocessing.py and the service: the one SQL loader,
connections and the lazy pool, transactions with retry, schema install, COPY loads of the CSV
tables, and reading the catalog's names and playlists (the queue's statements are in jobs.py).

Every statement lives in ``sql/<name>.sql`` and is run with parameters; the only composed SQL
is the table names of a CSV load, quoted with ``psycopg2.sql.Identifier``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import random
import selectors
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.pool
from psycopg2 import sql
from psycopg2.extensions import (
    POLL_OK,
    POLL_READ,
    POLL_WRITE,
    TRANSACTION_STATUS_IDLE,
    get_wait_callback,
    parse_dsn,
    set_wait_callback,
)
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from config import SQL_DIR, Settings
from preprocessing_utils import RAW_FEATURE_FIELDS, DataError

BIGINT_MAX = 2**63 - 1
DATABASE_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
SCHEMA_MISSING = "database schema missing: run `flask --app flask_app init-db`"
# rows of the catalog names fetched per round trip of their server-side cursor
CATALOG_NAMES_ITERSIZE = 50_000

# Tables in foreign-key order, with the columns each CSV file must have.
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "artists": ("artist_id", "name", "genre"),
    "albums": ("album_id", "name", "artist_id", "release_year"),
    "songs": ("song_id", "name", "album_id", "artist_id", *RAW_FEATURE_FIELDS),
    "playlists": ("playlist_id", "name"),
    "playlist_songs": ("playlist_id", "pos", "song_id"),
}

T = TypeVar("T")


@functools.cache
def sql_text(name: str) -> str:
    """Text of ``sql/<name>.sql``, read once: the single home of every statement the code runs."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached (or the connection pool is exhausted)."""


def first_line(error: BaseException) -> str:
    """First line of an error message, for logs and JSON reasons (never a traceback)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """A database error's message and context on one line, for command-line messages."""
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, without its password, for messages."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparsable DSN>"
    return (f"{parts.get('user', '')}@{parts.get('host', 'localhost')}:"
            f"{parts.get('port', '5432')}/{parts.get('dbname', '')}")


def connection_options(dsn: str, settings: Settings,
                       statement_seconds: float | None = None) -> dict[str, Any]:
    """libpq options of every service connection: bounded connect time, TCP keepalives and
    ``tcp_user_timeout`` (a dead peer is noticed), and a server-side ``statement_timeout``
    (DB_STATEMENT_TIMEOUT_SECONDS unless ``statement_seconds``) added to the DSN's options."""
    seconds = settings.db_statement_timeout_seconds if statement_seconds is None \
        else statement_seconds
    try:
        given = parse_dsn(dsn).get("options", "")
    except psycopg2.ProgrammingError:
        given = ""
    return {
        "connect_timeout": settings.db_connect_timeout,
        "keepalives": 1,
        "keepalives_idle": settings.db_keepalives_idle,
        "keepalives_interval": settings.db_keepalives_interval,
        "keepalives_count": settings.db_keepalives_count,
        "tcp_user_timeout": max(1, round(settings.db_tcp_user_timeout_seconds * 1000)),
        "options": f"{given} -c statement_timeout={max(1, round(seconds * 1000))}".strip(),
        "application_name": "bert4musicrec",
    }


# -- client-side deadlines ----------------------------------------------------------------------
#
# A frozen server (or a network that drops packets) leaves a socket open and silent; neither
# statement_timeout (the server must run to enforce it) nor keepalives (the kernel still ACKs)
# end the wait. So long-running service processes install a psycopg2 wait callback that polls
# each connection against this thread's deadline. psycopg2 refuses COPY while any wait callback
# is installed, which is why CLI commands do not install it and ``blocking_waits`` lifts it.

_deadlines = threading.local()
_callback_lock = threading.Lock()
_callback_users = 0


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Every database wait of this thread inside the block ends ``seconds`` from now at the
    latest (an enclosing earlier deadline still holds); expiry raises OperationalError."""
    outer: tuple[float, float] | None = getattr(_deadlines, "limit", None)
    limit = (time.monotonic() + seconds, seconds)
    _deadlines.limit = outer if outer is not None and outer[0] <= limit[0] else limit
    try:
        yield
    finally:
        _deadlines.limit = outer


def _remaining() -> float | None:
    """Seconds left before this thread's deadline, or None without one."""
    limit: tuple[float, float] | None = getattr(_deadlines, "limit", None)
    return None if limit is None else limit[0] - time.monotonic()


def _expired() -> psycopg2.OperationalError:
    """The error of a wait that ran past this thread's deadline."""
    limit: tuple[float, float] = _deadlines.limit
    return psycopg2.OperationalError(f"database did not answer within {limit[1]:g} s")


def wait_with_deadline(connection: Connection) -> None:
    """psycopg2 wait callback: poll ``connection`` until done or this thread's deadline."""
    while True:
        state = connection.poll()
        if state == POLL_OK:
            return
        if state == POLL_READ:
            events = selectors.EVENT_READ
        elif state == POLL_WRITE:
            events = selectors.EVENT_WRITE
        else:
            raise psycopg2.OperationalError(f"unexpected connection poll state {state}")
        timeout = _remaining()
        if timeout is not None and timeout <= 0:
            raise _expired()
        with selectors.DefaultSelector() as selector:
            selector.register(connection.fileno(), events)
            if not selector.select(timeout) and timeout is not None:
                raise _expired()


def install_wait_deadlines() -> None:
    """Make every database wait of this process honour ``deadline`` (until a matching
    ``remove_wait_deadlines``); for the long-running service and worker processes only."""
    global _callback_users
    with _callback_lock:
        _callback_users += 1
        set_wait_callback(wait_with_deadline)


def remove_wait_deadlines() -> None:
    """Undo one ``install_wait_deadlines``; the callback goes when the last user stops."""
    global _callback_users
    with _callback_lock:
        _callback_users = max(0, _callback_users - 1)
        if _callback_users == 0:
            set_wait_callback(None)


@contextmanager
def blocking_waits() -> Iterator[None]:
    """Lift the wait callback for the block (psycopg2 refuses COPY while one is installed)."""
    with _callback_lock:
        previous = get_wait_callback()
        set_wait_callback(None)
        try:
            yield
        finally:
            set_wait_callback(previous)


def connect(dsn: str, **options: Any) -> Connection:
    """Open a psycopg2 connection (not autocommit) to ``dsn`` with libpq ``options``."""
    return psycopg2.connect(dsn, **options)


@contextmanager
def read_snapshot(connection: Connection) -> Iterator[None]:
    """One REPEATABLE READ snapshot for a multi-query read, ended afterwards if we began it."""
    autocommit = connection.autocommit
    if autocommit:
        connection.autocommit = False
    began = connection.get_transaction_status() == TRANSACTION_STATUS_IDLE
    try:
        if began:
            with connection.cursor() as cursor:
                cursor.execute(sql_text("snapshot_begin"))
        yield
    finally:
        if began:
            connection.rollback()
        if autocommit:
            connection.autocommit = True


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
    """A thread-safe connection pool that discards broken connections instead of reusing them.

    Every borrow has a deadline (``timeout``, default DB_STATEMENT_TIMEOUT_SECONDS) covering the
    wait for a pool slot, the connect, the statements and the commit; where the wait callback
    is installed (``install_wait_deadlines``) a silent database raises at that deadline.
    """

    def __init__(self, settings: Settings) -> None:
        """Remember the settings; nothing connects until the first use."""
        self.dsn = settings.database_url
        self.size = settings.pool_size
        self.timeout = settings.db_statement_timeout_seconds
        self.options = connection_options(self.dsn, settings)
        self._pool: LazyConnectionPool | None = None
        self._pool_pid = 0
        self._slots = threading.BoundedSemaphore(self.size)
        self._lock = threading.Lock()

    def _current_pool(self) -> LazyConnectionPool:
        """The pool of this process; a forked child never reuses its parent's sockets."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = LazyConnectionPool(self.size, self.dsn, **self.options)
                self._pool_pid = os.getpid()
            return self._pool

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Connection]:
        """Borrow a connection within ``timeout`` s; it goes back rolled back, or closed when
        it is broken (a wait past the deadline breaks it)."""
        with deadline(self.timeout if timeout is None else timeout):
            remaining = _remaining() or 0.0
            if remaining <= 0:
                raise DatabaseUnavailable(first_line(_expired()))
            if not self._slots.acquire(timeout=remaining):
                raise DatabaseUnavailable("connection pool exhausted")
            try:
                pool = self._current_pool()
                try:
                    connection = pool.getconn()
                except (psycopg2.Error, psycopg2.pool.PoolError) as error:
                    raise DatabaseUnavailable(first_line(error)) from error
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
    def transaction(self, timeout: float | None = None) -> Iterator[Cursor]:
        """A cursor inside one transaction, committed when the block ends without error."""
        with self.connection(timeout) as connection:
            with connection.cursor() as cursor:
                yield cursor
            connection.commit()

    def run(self, work: Callable[[Cursor], T], retries: int = 1,
            timeout: float | None = None) -> T:
        """Run ``work(cursor)`` in a transaction; retry on a fresh connection if one broke,
        all attempts within one deadline of ``timeout`` s."""
        with deadline(self.timeout if timeout is None else timeout):
            for attempt in range(retries + 1):
                try:
                    with self.transaction() as cursor:
                        return work(cursor)
                except DATABASE_ERRORS as error:
                    if attempt == retries:
                        raise DatabaseUnavailable(first_line(error)) from error
        raise AssertionError("unreachable")

    def check(self, timeout: float) -> str | None:
        """None when the database answers within ``timeout`` s and holds the service schema,
        else the reason."""
        try:
            present = self.run(schema_present, timeout=timeout)
        except DatabaseUnavailable as error:
            return f"database unreachable: {error}"
        return None if present else SCHEMA_MISSING

    def close(self) -> None:
        """Close every pooled connection of this process."""
        with self._lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.closeall()
            self._pool = None


def fetch_one(cursor: Cursor) -> tuple[Any, ...]:
    """The one row the statement just run returns."""
    row = cursor.fetchone()
    if row is None:
        raise psycopg2.ProgrammingError("the statement returned no row")
    return tuple(row)


def schema_present(cursor: Cursor) -> bool:
    """True when the job table and the enqueue function exist."""
    cursor.execute(sql_text("schema_present"))
    return bool(fetch_one(cursor)[0])


def create_schema(connection: Connection) -> None:
    """Create the tables and indexes of sql/schema.sql; running it again changes nothing."""
    with connection, connection.cursor() as cursor:
        cursor.execute(sql_text("schema"))


def init_database(dsn: str, refresh_trigger: bool = False, catalog_trigger: bool = False
                  ) -> None:
    """Create the tables (sql/schema.sql) and the service's function (sql/service.sql), and
    the optional triggers asked for."""
    connection = connect(dsn)
    try:
        create_schema(connection)
        with connection.cursor() as cursor:
            cursor.execute(sql_text("service"))
            if refresh_trigger:
                cursor.execute(sql_text("refresh_trigger"))
            if catalog_trigger:
                cursor.execute(sql_text("catalog_trigger"))
        connection.commit()
    finally:
        connection.close()


def catalog_names(connection: Connection
                  ) -> Iterator[tuple[int, str | None, str | None, str | None]]:
    """(song_id, song, artist, album) of every catalog song, by id, from one snapshot, read
    through a server-side cursor ``CATALOG_NAMES_ITERSIZE`` rows at a time (a 2.26M-song
    catalog is never held as one list of rows)."""
    with read_snapshot(connection), connection.cursor(name="b4mr_catalog_names") as cursor:
        cursor.itersize = CATALOG_NAMES_ITERSIZE
        cursor.execute(sql_text("catalog_names"))
        for song_id, song, artist, album in cursor:
            yield int(song_id), song, artist, album


def read_playlists(cursor: Cursor, playlist_ids: Sequence[int]) -> dict[int, list[int]]:
    """Songs of the given playlists, in order; missing playlists are absent."""
    cursor.execute(sql_text("service_playlists"), {"playlist_ids": list(playlist_ids)})
    return {playlist_id: list(song_ids) for playlist_id, song_ids in cursor.fetchall()}


def count_playlists(cursor: Cursor) -> int:
    """Number of playlists."""
    cursor.execute(sql_text("service_playlists_count"))
    return int(fetch_one(cursor)[0])


def playlists_page(cursor: Cursor, after: int, limit: int) -> list[tuple[int, list[int]]]:
    """Up to ``limit`` playlists with ids above ``after``, with their songs, by id."""
    cursor.execute(sql_text("service_playlists_page"), {"after": after, "limit": limit})
    return [(playlist_id, list(songs)) for playlist_id, songs in cursor.fetchall()]


def _csv_header(path: Path) -> list[str]:
    """Column names on the first line of a CSV file, as COPY ... HEADER skips it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8-sig", newline="") as file:
        header = next(csv.reader(file), None)
    if not header:
        raise DataError(f"{path}: empty file (expected a header line)")
    return [column.strip() for column in header]


def load_csv_tables(connection: Connection, data_dir: Path) -> dict[str, int]:
    """COPY the five CSV tables into the database in one transaction; rows inserted per table.

    Each file is copied into a temporary table and inserted with ON CONFLICT DO NOTHING, so a
    second load inserts nothing and leaves the same rows. The tables are analyzed in the same
    transaction, so the first queries after a load are planned with their real sizes.
    """
    data_dir = Path(data_dir)
    headers = {}
    for table, columns in CSV_COLUMNS.items():
        path = data_dir / f"{table}.csv"
        header = _csv_header(path)
        missing = [column for column in columns if column not in header]
        extra = [column for column in header if column not in columns]
        if missing or extra:
            problem = (f"missing column {missing[0]!r}" if missing
                       else f"unknown column {extra[0]!r}")
            raise DataError(f"{path.name}: {problem} (expected: {', '.join(columns)})")
        headers[table] = header
    inserted = {}
    with connection, connection.cursor() as cursor:
        for table, header in headers.items():
            names = {"staging": sql.Identifier(f"load_{table}"), "table": sql.Identifier(table),
                     "columns": sql.SQL(", ").join(map(sql.Identifier, header))}
            cursor.execute(sql.SQL(sql_text("load_staging")).format(**names))
            path = data_dir / f"{table}.csv"
            try:
                with path.open(encoding="utf-8-sig", newline="") as file, blocking_waits():
                    cursor.copy_expert(sql.SQL(sql_text("load_copy")).format(**names), file)
                cursor.execute(sql.SQL(sql_text("load_insert")).format(**names))
            except (psycopg2.DataError, psycopg2.IntegrityError) as error:
                raise DataError(f"{path.name}: {one_line(error)}") from None
            inserted[table] = cursor.rowcount
        for table in headers:
            cursor.execute(sql.SQL(sql_text("analyze")).format(table=sql.Identifier(table)))
    return inserted


@contextlib.contextmanager
def connected(dsn: str, **options: Any) -> Iterator[Connection]:
    """A connection to ``dsn`` with libpq ``options`` for one block, closed afterwards."""
    connection = connect(dsn, **options)
    try:
        yield connection
    finally:
        connection.close()
