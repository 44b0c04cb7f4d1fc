"""Catalog refresh cost: how long a service process takes to read the catalog and extend its
model (catalog_refresh.extend_from_database) at the demo size and at the `full` vocabulary
(116,293 songs), and what a refresh in the gunicorn workers does to their shared memory.

Per size (a random-weight checkpoint and a throwaway database on DATABASE_URL's server, as
bench_service.py builds them): the first read of a process (every catalog id, nothing new),
an incremental read with nothing new, an incremental read after 1 and after 1,000 songs were
inserted, and a full re-read with those 1,000 new; each the median of ``--repeats`` runs, in
one process, on its CPU threads. Then gunicorn with two workers: PSS of the master and the
workers (/proc/PID/smaps_rollup) at ready and after ``flask refresh-catalog`` added one song
(it waits up to 300 s for every worker's report, so the refresh has ended when PSS is read).

    python benchmarks/bench_catalog_refresh.py [--sizes demo,full] [--repeats 3]

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench_service import (  # noqa: E402
    SIZES,
    Server,
    ThrowawayDatabase,
    demo_encoders,
    random_checkpoint,
    write_catalog,
)

import db  # noqa: E402
from catalog_refresh import extend_from_database  # noqa: E402
from config import DEMO_DATA_DIR, Settings, default_database_url  # noqa: E402
from recommender import Recommender  # noqa: E402

FIRST_NEW_ID = 90_000_000
COPY_FEATURES = ("album_id, artist_id, explicit, danceability, energy, key, loudness, mode, "
                 "speechiness, acousticness, instrumentalness, liveness, valence, tempo, "
                 "duration_ms, time_signature, disc_number, track_number")


def insert_songs(database: ThrowawayDatabase, first: int, count: int) -> None:
    """Insert ``count`` new songs from id ``first`` on, copying catalog songs' album, artist
    and features, in one statement."""
    database.query(f"INSERT INTO songs (song_id, name, {COPY_FEATURES}) "
                   f"SELECT %(first)s + n, 'New ' || n, {COPY_FEATURES} FROM "
                   "(SELECT row_number() OVER (ORDER BY song_id) - 1 AS n, * FROM songs "
                   "WHERE song_id < %(first)s LIMIT %(count)s) AS picked",
                   {"first": first, "count": count})


def timed(recommender: Recommender, settings: Settings, after: int | None, repeats: int
          ) -> dict[str, Any]:
    """Median and spread of ``repeats`` refreshes from ``after`` (each from the same model)."""
    seconds, added = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        extension = extend_from_database(recommender, settings, after)
        seconds.append(time.perf_counter() - started)
        added = extension.added
    return {"added": added, "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3)}


def refresh_times(model_path: Path, database: ThrowawayDatabase, repeats: int
                  ) -> dict[str, Any]:
    """The refresh cases of one size, in this process."""
    settings = replace(Settings.from_env({}), database_url=database.dsn, model_path=model_path)
    recommender = Recommender.from_checkpoint(model_path)
    watermark = int(recommender.encoders.song_ids.max())
    times = {"first_read_nothing_new": timed(recommender, settings, None, repeats),
             "incremental_nothing_new": timed(recommender, settings, watermark, repeats)}
    insert_songs(database, FIRST_NEW_ID, 1)
    times["incremental_1_new"] = timed(recommender, settings, watermark, repeats)
    insert_songs(database, FIRST_NEW_ID + 1, 999)
    times["incremental_1000_new"] = timed(recommender, settings, watermark, repeats)
    times["full_reread_1000_new"] = timed(recommender, settings, None, repeats)
    database.query("DELETE FROM songs WHERE song_id >= %s", (FIRST_NEW_ID,))
    return {"songs": recommender.n_songs, **times}


def shared_memory(model_path: Path, database: ThrowawayDatabase, work: Path) -> dict[str, Any]:
    """PSS of gunicorn's processes at ready and after one refresh that adds a song."""
    env = {"DATABASE_URL": database.dsn, "MODEL_PATH": str(model_path), "WORKERS": "2",
           "THREADS": "4", "JOB_THREADS": "1", "TORCH_THREADS": "1", "API_TOKEN": "",
           "CATALOG_DIR": "", "LOG_LEVEL": "warning"}
    server = Server(env, work / "gunicorn.log")
    try:
        time.sleep(3)
        before = server.memory_mb()
        insert_songs(database, FIRST_NEW_ID, 1)
        report = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "flask_app", "refresh-catalog", "--wait",
             "300"],
            cwd=REPO_ROOT, env={name: value for name, value in {**os.environ, **env}.items()
                                if name != "PROMETHEUS_MULTIPROC_DIR"},
            capture_output=True, text=True, timeout=360, check=True).stdout
        time.sleep(1)
        after = server.memory_mb()
    finally:
        server.stop()
        database.query("DELETE FROM songs WHERE song_id >= %s", (FIRST_NEW_ID,))
    return {"before": before, "after_refresh": after, "cli": report.strip().splitlines()}


def run_size(size: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The checkpoint and database of one size, then both measurements."""
    if size == "demo":
        data_dir, fitted, preset = DEMO_DATA_DIR, demo_encoders(work), "demo"
    else:
        data_dir, fitted = write_catalog(work / "catalog", SIZES[size])
        preset = "full"
    model_path = random_checkpoint(fitted, preset, work)
    database = ThrowawayDatabase(args.database_url)
    try:
        db.init_database(database.dsn)
        with db.connected(database.dsn) as connection:
            db.load_csv_tables(connection, data_dir)
        database.query("ANALYZE")
        return {"preset": preset, "refresh": refresh_times(model_path, database, args.repeats),
                "memory": shared_memory(model_path, database, work)}
    finally:
        database.drop()


def main(argv: list[str] | None = None) -> int:
    """Run the sizes asked for and print the JSON result last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", default=default_database_url())
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": os.cpu_count(),
                                           "torch_threads": torch.get_num_threads()}}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"b4mr-catalog-{size}-") as folder:
            results[size] = run_size(size, args, Path(folder))
            print(f"{size}: {json.dumps(results[size])}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
