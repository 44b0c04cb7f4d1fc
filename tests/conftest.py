"""Shared fixtures: a real PostgreSQL server and a fresh database per test module."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from config import default_database_url  # noqa: E402

HOW_TO_PROVIDE = (
    "The database tests need PostgreSQL 15+. Start one on 127.0.0.1:5432 with trust auth "
    "(e.g. `pg_ctlcluster 15 main start`) or point DATABASE_URL at a server where this user "
    "may CREATE DATABASE."
)


def _answers(dsn: str) -> bool:
    """True when a server accepts a connection at ``dsn``."""
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


def _free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path | None:
    """Folder of the local PostgreSQL server binaries, newest version first."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return candidates[0].parent if candidates else None


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the postgres user when we are root, since initdb refuses root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


def _start_throwaway_cluster() -> tuple[str, Path, Path]:
    """initdb + pg_ctl start in a temp folder; returns (dsn, bin folder, data folder)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.fail(f"No PostgreSQL answers and no local binaries were found. {HOW_TO_PROVIDE}")
    root = Path(tempfile.mkdtemp(prefix="b4mr-pg-"))
    data_dir = root / "data"
    port = _free_port()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    try:
        subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust",
                                     "-U", "postgres", "--no-sync"]),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-w", "-l",
                                     str(root / "log"), "-o",
                                     f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                                     "start"]),
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        pytest.fail(f"Could not start a throwaway PostgreSQL: {error} {detail.decode()[-500:]}"
                    f"\n{HOW_TO_PROVIDE}")
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", bin_dir, data_dir


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of a PostgreSQL server for the whole run: DATABASE_URL, else a throwaway cluster."""
    dsn = default_database_url()
    if _answers(dsn):
        yield dsn
        return
    dsn, bin_dir, data_dir = _start_throwaway_cluster()
    try:
        yield dsn
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast",
                                     "stop"]), capture_output=True)
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def create_database(server_dsn: str) -> str:
    """Create an empty database with a unique name and return its DSN."""
    name = f"b4mr_test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(server_dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    connection.close()
    return make_dsn(server_dsn, dbname=name)


def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop a database made by ``create_database``, disconnecting whoever still uses it."""
    name = parse_dsn(dsn)["dbname"]
    connection = psycopg2.connect(server_dsn)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
    connection.close()


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    dsn = create_database(pg_server)
    try:
        yield dsn
    finally:
        drop_database(pg_server, dsn)


@pytest.fixture(scope="module")
def module_pg_dsn(pg_server: str) -> Iterator[str]:
    """A fresh, empty database shared by the tests of one module, dropped afterwards."""
    dsn = create_database(pg_server)
    try:
        yield dsn
    finally:
        drop_database(pg_server, dsn)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-epoch tiny model of the service tests, trained once per run on the demo data."""
    from service_support import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.getbasetemp() / "service-model")


@pytest.fixture(scope="module")
def demo_dsn(module_pg_dsn: str) -> str:
    """A database of one test module holding the schema, the service function and the demo
    tables."""
    from service_support import prepare_database

    prepare_database(module_pg_dsn)
    return module_pg_dsn
