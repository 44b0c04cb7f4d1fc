"""How generation and preprocessing grow with the number of playlists, up to the full size.

    python benchmarks/bench_scale.py                          # CSV at 1/8, 1/4, 1/2, 1 x full
    python benchmarks/bench_scale.py --fractions 0.125,0.25 \
        --database postgresql://postgres@127.0.0.1:5432/postgres   # and PostgreSQL

Each step runs as its own child process (``demo data/generate.py``, ``preprocessing.py``) and
is measured by ``os.wait4``: wall time and that child's own peak RSS (``RUSAGE_CHILDREN``
would report the largest child so far, hiding a smaller later step). The catalog stays the
full one (116,293 songs); only the playlists scale, so rows grow with the fraction. With
``--database`` (a server DSN) every fraction is also generated into a throwaway database with
COPY and preprocessed from it, then the database is dropped. Training, evaluation and
``score-all`` are not measured here yet. Prints a table and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

REPO = Path(__file__).resolve().parents[1]
FULL_PLAYLISTS = 305_000
GENERATOR = REPO / "demo data" / "generate.py"


def run_step(command: list[str]) -> tuple[float, int, dict[str, Any]]:
    """Run one child to completion; its seconds, own peak RSS (MB) and its JSON last line."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): "
                               f"{stderr.read()[-2000:]}")
        last = stdout.read().strip().splitlines()[-1]
    return seconds, round(usage.ru_maxrss / 1024), json.loads(last)


def throwaway_database(server_dsn: str, name: str) -> str:
    """Create database ``name`` on the server (dropping a leftover one); its DSN."""
    drop_database(server_dsn, name)
    _run_outside_transaction(server_dsn, sql.SQL("CREATE DATABASE {}").format(
        sql.Identifier(name)))
    return make_dsn(server_dsn, dbname=name)


def drop_database(server_dsn: str, name: str) -> None:
    """Drop a throwaway database if it exists."""
    _run_outside_transaction(server_dsn, sql.SQL("DROP DATABASE IF EXISTS {}").format(
        sql.Identifier(name)))


def _run_outside_transaction(server_dsn: str, statement: sql.Composed) -> None:
    """Run one statement under autocommit (CREATE/DROP DATABASE refuse a transaction)."""
    connection = psycopg2.connect(server_dsn)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


def measure(fraction: float, work: Path, server_dsn: str | None) -> list[dict[str, Any]]:
    """Generate and preprocess at ``fraction`` x the full size; one record per step."""
    playlists = round(FULL_PLAYLISTS * fraction)
    python = sys.executable
    tables, output = work / f"tables_{playlists}", work / f"pp_{playlists}"
    shutil.rmtree(tables, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    steps: list[tuple[str, list[str]]] = [
        ("generate csv", [python, str(GENERATOR), "--scale", "full", "--playlists",
                          str(playlists), "--out", str(tables)]),
        ("preprocess csv", [python, "preprocessing.py", "--source", "csv", "--data", str(tables),
                            "--out", str(output)]),
    ]
    name = f"b4mr_bench_scale_{playlists}"
    if server_dsn is not None:
        dsn = throwaway_database(server_dsn, name)
        steps += [
            ("generate postgres", [python, str(GENERATOR), "--scale", "full", "--playlists",
                                   str(playlists), "--database", dsn]),
            ("preprocess postgres", [python, "preprocessing.py", "--source", "postgres",
                                     "--dsn", dsn, "--out", f"{output}_pg"]),
        ]
    records: list[dict[str, Any]] = []
    rows = 0
    try:
        for step, command in steps:
            seconds, peak, summary = run_step(command)
            rows = int(summary["rows"]["playlist_songs"]) if "rows" in summary else rows
            records.append({"step": step, "fraction": fraction, "playlists": playlists,
                            "rows": rows, "seconds": round(seconds, 2),
                            "rows_per_s": round(rows / seconds), "peak_rss_mb": peak})
    finally:
        if server_dsn is not None:
            drop_database(server_dsn, name)
        shutil.rmtree(tables, ignore_errors=True)
    return records


def main() -> None:
    """Parse the options, measure every fraction, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1",
                        help="sizes as fractions of the full 305,000 playlists")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_scale",
                        help="folder for the generated tables (removed after each size)")
    parser.add_argument("--database", metavar="SERVER_DSN", default=None,
                        help="also generate into and preprocess from PostgreSQL")
    args = parser.parse_args()
    if args.database is not None:
        parse_dsn(args.database)
    args.work.mkdir(parents=True, exist_ok=True)
    records = []
    print(f"{'step':<20} {'fraction':>8} {'rows':>11} {'seconds':>8} {'rows/s':>10} "
          f"{'peak MB':>8}", flush=True)
    for fraction in (float(value) for value in args.fractions.split(",")):
        for record in measure(fraction, args.work, args.database):
            records.append(record)
            print(f"{record['step']:<20} {fraction:>8g} {record['rows']:>11,} "
                  f"{record['seconds']:>8.1f} {record['rows_per_s']:>10,} "
                  f"{record['peak_rss_mb']:>8}", flush=True)
    print(json.dumps({"benchmark": "scale", "records": records}))


if __name__ == "__main__":
    main()
