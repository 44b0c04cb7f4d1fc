"""Service benchmark on loopback: the synchronous endpoint's latency and throughput at 1, 4 and
16 concurrent clients, and the queue path's jobs/s end to end (POST /recommend -> stored
result), with gunicorn as `make serve` runs it, at the demo, the `full` (116,293 songs) and the
Million Playlist (`mpd`, 2,262,292 songs) vocabulary sizes, and the memory of every process.

Each size gets a random-weight checkpoint (speed does not depend on training), a throwaway
database on DATABASE_URL's server with that catalog loaded, and its own gunicorn. The `full` and
`mpd` catalogs are synthetic: albums and artists in the original's proportion (22,152 and
12,561 per 116,293 songs), every song in a playlist, encoders built directly (no preprocessing
run). With an approximate index it is built here and saved beside the checkpoint, so the
service reads it. Memory: RSS and PSS (/proc/PID/smaps_rollup, pages shared between processes
counted in equal parts) of the master and of each worker, and the total PSS.

    python benchmarks/bench_service.py [--sizes demo,full] [--requests 400] [--jobs 1000]
    python benchmarks/bench_service.py --sizes full --soak 60   # 16 clients for 60 s as well
    python benchmarks/bench_service.py --sizes mpd --index approximate
    python benchmarks/bench_service.py --sizes full --score-all  # flask score-all as well

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg2
import torch
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from psycopg2.extensions import make_dsn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import checkpoint  # noqa: E402
import db  # noqa: E402
from config import DEMO_DATA_DIR, DEMO_ENCODERS_DIR, default_database_url, load_config  # noqa: E402
from preprocessing_utils import FIRST_SONG_INDEX, NUMERIC_COLUMNS, Encoders  # noqa: E402
from recommender import Recommender  # noqa: E402

SIZES = {"full": 116_293, "mpd": 2_262_292}
PLAYLIST_LENGTH = 30
SONG_COLUMNS = ("song_id", "name", "album_id", "artist_id", "explicit", "danceability", "energy",
                "key", "loudness", "mode", "speechiness", "acousticness", "instrumentalness",
                "liveness", "valence", "tempo", "duration_ms", "time_signature", "disc_number",
                "track_number")


def write_catalog(folder: Path, n_songs: int, seed: int = 0) -> tuple[Path, Encoders]:
    """Synthetic CSV tables of ``n_songs`` songs (every one in some playlist) and encoders of
    that catalog with random song features."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_albums = max(1, round(n_songs * 22_152 / 116_293))
    n_artists = max(1, round(n_songs * 12_561 / 116_293))
    artist_ids = 5_000 + np.arange(n_artists)
    album_ids = 200_000 + np.arange(n_albums)
    album_artist = rng.choice(artist_ids, n_albums)
    song_ids = 1_000_000 + np.arange(n_songs)
    song_album = rng.choice(album_ids, n_songs)
    pd.DataFrame({"artist_id": artist_ids, "name": [f"Artist {i}" for i in artist_ids],
                  "genre": "synthetic"}).to_csv(folder / "artists.csv", index=False)
    pd.DataFrame({"album_id": album_ids, "name": [f"Album {i}" for i in album_ids],
                  "artist_id": album_artist, "release_year": rng.integers(1960, 2024, n_albums),
                  }).to_csv(folder / "albums.csv", index=False)
    unit = {name: rng.random(n_songs).round(4) for name in (
        "danceability", "energy", "speechiness", "acousticness", "instrumentalness", "liveness",
        "valence")}
    songs = pd.DataFrame({
        "song_id": song_ids, "name": [f"Song {i}" for i in song_ids], "album_id": song_album,
        "artist_id": album_artist[song_album - 200_000], "explicit": rng.integers(0, 2, n_songs),
        **unit, "key": rng.integers(0, 12, n_songs),
        "loudness": (-30 + 28 * rng.random(n_songs)).round(2), "mode": rng.integers(0, 2, n_songs),
        "tempo": (60 + 120 * rng.random(n_songs)).round(3),
        "duration_ms": rng.integers(90_000, 400_000, n_songs),
        "time_signature": rng.choice([3, 4, 5], n_songs), "disc_number": 1,
        "track_number": rng.integers(1, 15, n_songs),
    })
    songs[list(SONG_COLUMNS)].to_csv(folder / "songs.csv", index=False)
    order = rng.permutation(song_ids)
    n_playlists = -(-n_songs // PLAYLIST_LENGTH)
    playlist_of = np.arange(n_songs) // PLAYLIST_LENGTH + 1
    positions = np.arange(n_songs) % PLAYLIST_LENGTH
    pd.DataFrame({"playlist_id": np.arange(1, n_playlists + 1),
                  "name": [f"Playlist {i}" for i in range(1, n_playlists + 1)],
                  }).to_csv(folder / "playlists.csv", index=False)
    pd.DataFrame({"playlist_id": playlist_of, "pos": positions, "song_id": order}).to_csv(
        folder / "playlist_songs.csv", index=False)
    special = np.zeros(FIRST_SONG_INDEX, dtype=np.int64)
    features = rng.normal(size=(n_songs + FIRST_SONG_INDEX, 21)).astype(np.float32)
    features[:FIRST_SONG_INDEX] = 0
    numeric = len(NUMERIC_COLUMNS)
    encoders = Encoders(song_ids, album_ids, artist_ids,
                        np.concatenate([special, song_album - 200_000 + 1]),
                        np.concatenate([special, album_artist[song_album - 200_000] - 5_000 + 1]),
                        features, np.zeros(numeric), np.zeros(numeric), np.ones(numeric), True)
    return folder, encoders


def demo_encoders(work: Path) -> Encoders:
    """The demo data's encoders, as preprocessing.py writes them with the bundled ones."""
    out = work / "prepared"
    subprocess.run([sys.executable, "preprocessing.py", "--source", "csv", "--data",
                    str(DEMO_DATA_DIR), "--out", str(out), "--encoders", str(DEMO_ENCODERS_DIR)],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    return Encoders.load(out / "encoders")


def random_checkpoint(fitted: Encoders, preset: str, work: Path) -> Path:
    """Save an untrained model of ``preset`` over ``fitted``'s catalog as a checkpoint."""
    config = load_config(preset)
    torch.manual_seed(0)
    model = checkpoint.build_model(config, fitted)
    path = work / "random.pt"
    checkpoint.save_checkpoint(path, {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "config": config.to_dict(),
        "encoders": checkpoint.encoders_to_tensors(fitted),
        "encoders_fingerprint": fitted.fingerprint,
        "popularity": torch.ones(fitted.n_song_tokens, dtype=torch.float64),
        "model_version": f"bench-random-{preset}",
    })
    return path


class ThrowawayDatabase:
    """A throwaway database on the server of ``server_dsn``."""

    def __init__(self, server_dsn: str) -> None:
        """Create it."""
        self.server_dsn = server_dsn
        self.name = f"b4mr_bench_{uuid.uuid4().hex[:10]}"
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        self.dsn = make_dsn(server_dsn, dbname=self.name)

    def _admin(self, statement: sql.Composable) -> None:
        """Run a statement on the server's maintenance database, outside a transaction."""
        connection = psycopg2.connect(self.server_dsn)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def query(self, statement: str, parameters: Any = None) -> list[tuple]:
        """Run one statement and commit; rows when it returns any."""
        connection = psycopg2.connect(self.dsn)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def drop(self) -> None:
        """Drop it, disconnecting whoever still uses it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(self.name)))


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """gunicorn with gunicorn.conf.py, as `make serve` starts it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        """Start it and wait until /ready answers 200."""
        self.port = free_port()
        full_env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="b4mr-bench-metrics-")}
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                 "flask_app:create_app()"], cwd=REPO_ROOT, env=full_env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {log_path.read_text()[-2000:]}")
            try:
                if request(self.port, "GET", "/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gunicorn did not become ready in 120 s")

    def worker_rss_mb(self) -> list[float]:
        """Resident memory of each gunicorn worker process (the master's children), in MB."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        sizes = []
        for pid in children.read_text().split():
            status = Path(f"/proc/{pid}/status").read_text()
            kilobytes = next(line.split()[1] for line in status.splitlines()
                             if line.startswith("VmRSS:"))
            sizes.append(round(int(kilobytes) / 1024, 1))
        return sizes

    def memory_mb(self) -> dict[str, Any]:
        """RSS and PSS of the master and of each worker, and the PSS of all of them, in MB."""
        def sizes(pid: int) -> dict[str, float]:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            found = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
            return {"rss_mb": round(found["Rss"] / 1024, 1),
                    "pss_mb": round(found["Pss"] / 1024, 1)}

        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        master, workers = sizes(pid), [sizes(int(child)) for child in children]
        return {"master": master, "workers": workers, "total_pss_mb": round(
            master["pss_mb"] + sum(worker["pss_mb"] for worker in workers), 1)}

    def stop(self) -> None:
        """SIGTERM the process group and wait."""
        os.killpg(self.process.pid, 15)
        self.process.wait(timeout=60)


def request(port: int, method: str, path: str, body: Any = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, Any]:
    """One JSON request (on ``connection`` when given, kept alive)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        if own:
            connection.close()


def wait_for_names(port: int, body: dict, answers: int = 20, seconds: float = 300) -> float:
    """Seconds until ``answers`` sync answers in a row carry song names: every worker has its
    catalog names cached (loading them competes for the CPU with the requests measured)."""
    started = time.monotonic()
    in_a_row = 0
    while in_a_row < answers:
        if time.monotonic() - started > seconds:
            raise RuntimeError(f"catalog names not loaded in {seconds} s")
        status, answer = request(port, "POST", "/recommendations", body)
        named = status == 200 and answer["recommendations"][0]["song"] is not None
        in_a_row = in_a_row + 1 if named else 0
        if not named:
            time.sleep(0.2)
    return round(time.monotonic() - started, 1)


def bench_sync(port: int, bodies: list[dict], clients: int) -> dict[str, float]:
    """p50/p99 latency and requests/s of POST /recommendations with ``clients`` in parallel."""
    shares = [bodies[index::clients] for index in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()

    def client(share: list[dict]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for body in share:
            started = time.perf_counter()
            status, _ = request(port, "POST", "/recommendations", body, connection)
            mine.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"sync request failed with {status}")
        connection.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * quantiles[98], 2), "requests_per_s": round(len(latencies)
                                                                               / elapsed, 1)}


def soak(server: Server, bodies: list[dict], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` sending sync requests back to back for ``seconds``: errors, rate, latency,
    and the workers' memory before and after (a leak shows as growth)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        mine, index = [], offset
        status: int | str
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status, _ = request(server.port, "POST", "/recommendations",
                                    bodies[index % len(bodies)], connection)
            except (OSError, http.client.HTTPException, ValueError) as error:
                status = type(error).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            mine.append(time.perf_counter() - started)
            if status != 200:
                with lock:
                    errors.append(str(status))
            index += clients
        connection.close()
        with lock:
            latencies.extend(mine)

    rss_start = server.worker_rss_mb()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies),
            "errors": len(errors), "error_kinds": sorted(set(errors)),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * quantiles[98], 2),
            "worker_rss_mb_start": rss_start, "worker_rss_mb_end": server.worker_rss_mb()}


def batch_totals(port: int) -> tuple[float, float]:
    """The queue's claimed batches so far and the seconds spent scoring and storing them, over
    every worker, from /metrics."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    totals = {"b4mr_job_batch_seconds_count": 0.0, "b4mr_job_batch_seconds_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["b4mr_job_batch_seconds_count"], totals["b4mr_job_batch_seconds_sum"]


def bench_async(port: int, database: ThrowawayDatabase, playlist_ids: list[int], k: int
                ) -> dict[str, float]:
    """Jobs/s from the first POST /recommend until every result is stored, and how the queue
    batched them (batches, jobs per batch, seconds per batch to read, score and store)."""
    database.query("TRUNCATE recommendation_jobs, recommendations")
    batches_before, seconds_before = batch_totals(port)

    def enqueue(playlist_id: int) -> None:
        status, body = request(port, "POST", "/recommend", {"playlist_id": playlist_id, "k": k})
        if status != 202:
            raise RuntimeError(f"enqueue failed with {status}: {body}")

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(enqueue, playlist_ids))
    enqueued = time.perf_counter() - started
    deadline = time.monotonic() + 600
    while True:
        done = database.query("SELECT count(*) FILTER (WHERE status = 'done'), "
                              "count(*) FILTER (WHERE status = 'failed') "
                              "FROM recommendation_jobs")[0]
        if done[0] + done[1] == len(playlist_ids):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue not drained in 600 s: {done}")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    stored = database.query("SELECT count(*) FROM recommendations")[0][0]
    batches_after, seconds_after = batch_totals(port)
    batches = batches_after - batches_before
    return {"jobs": len(playlist_ids), "failed": done[1], "stored_rows": stored,
            "enqueue_per_s": round(len(playlist_ids) / enqueued, 1),
            "seconds": round(elapsed, 2), "jobs_per_s": round(len(playlist_ids) / elapsed, 1),
            "batches": int(batches),
            "jobs_per_batch": round(len(playlist_ids) / batches, 1) if batches else None,
            "batch_ms": round(1000 * (seconds_after - seconds_before) / batches, 2)
            if batches else None}


def score_all(env: dict[str, str]) -> dict[str, float]:
    """``flask --app flask_app score-all``: wall seconds (model load included) and the
    playlists/s of its scoring loop (tqdm's final rate)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "flask_app", "score-all"],
                          cwd=REPO_ROOT, env={**os.environ, **env}, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    rates = re.findall(r"([\d.]+)(k?)playlist/s", done.stderr)
    rate = float(rates[-1][0]) * (1000 if rates[-1][1] else 1) if rates else float("nan")
    return {"seconds": round(seconds, 1), "playlists_per_s": rate}


def run_size(size: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the checkpoint and database of one size, serve it, and measure both paths."""
    if size == "demo":
        data_dir, fitted, preset = DEMO_DATA_DIR, demo_encoders(work), "demo"
    else:
        data_dir, fitted = write_catalog(work / "catalog", SIZES[size])
        preset = "full"
    model_path = random_checkpoint(fitted, preset, work)
    del fitted
    # with an approximate index this builds it (on every thread) and saves it for the service
    started = time.perf_counter()
    recommender = Recommender.from_checkpoint(model_path, index=args.index)
    load = {"index": recommender.index_mode, "seconds": round(time.perf_counter() - started, 1)}
    n_songs = recommender.n_songs
    del recommender
    database = ThrowawayDatabase(args.database_url)
    server = None
    scored = None
    try:
        db.init_database(database.dsn)
        with db.connected(database.dsn) as connection:
            db.load_csv_tables(connection, data_dir)
        rows = database.query("SELECT playlist_id, array_agg(song_id ORDER BY pos) "
                              "FROM playlist_songs GROUP BY playlist_id ORDER BY playlist_id")
        rng = np.random.default_rng(1)
        bodies = [{"song_ids": rows[index][1][-args.sequence_length:], "k": 10,
                   "exclude_seen": True}
                  for index in rng.integers(0, len(rows), args.requests)]
        env = {"DATABASE_URL": database.dsn, "MODEL_PATH": str(model_path),
               "RECOMMENDER_INDEX": args.index, "WORKERS": str(args.workers),
               "THREADS": str(args.threads), "JOB_THREADS": str(args.job_threads),
               "JOB_BATCH_SIZE": str(args.job_batch_size),
               "TORCH_THREADS": str(args.torch_threads), "API_TOKEN": "", "CATALOG_DIR": "",
               "LOG_LEVEL": "warning"}
        started = time.perf_counter()
        server = Server(env, work / "gunicorn.log")
        ready_seconds = round(time.perf_counter() - started, 1)
        memory = {"ready_seconds": ready_seconds, "at_ready": server.memory_mb()}
        memory["names_seconds"] = wait_for_names(server.port, bodies[0])
        bench_sync(server.port, bodies[: min(50, len(bodies))], 1)
        memory["with_names"] = server.memory_mb()
        sync = {str(clients): bench_sync(server.port, bodies, clients)
                for clients in args.clients}
        soaked = soak(server, bodies, 16, args.soak) if args.soak else None
        jobs = [row[0] for row in rows[: args.jobs]]
        bench_async(server.port, database, jobs[: min(100, len(jobs))], 10)
        queue = bench_async(server.port, database, jobs, 10)
        memory["after_load"] = server.memory_mb()
        server.stop()
        server = None
        if args.score_all:
            scored = score_all(env)
    finally:
        if server is not None:
            server.stop()
        database.drop()
    result = {"songs": n_songs, "preset": preset, "load": load, "sync": sync, "async": queue,
              "memory": memory}
    if soaked is not None:
        result["soak"] = soaked
    if scored is not None:
        result["score_all"] = scored
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,full", help="comma list of demo, full, mpd")
    parser.add_argument("--index", default="auto", choices=("exact", "approximate", "auto"),
                        help="RECOMMENDER_INDEX of the service")
    parser.add_argument("--score-all", action="store_true",
                        help="also time `flask score-all` over every playlist")
    parser.add_argument("--requests", type=int, default=400, help="sync requests per level")
    parser.add_argument("--clients", default="1,4,16", help="comma list of client counts")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in the async run")
    parser.add_argument("--sequence-length", type=int, default=30,
                        help="songs per sync request")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn processes")
    parser.add_argument("--threads", type=int, default=4, help="HTTP threads per process")
    parser.add_argument("--job-threads", type=int, default=1, help="queue threads per process")
    parser.add_argument("--job-batch-size", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                        help="also run 16 sync clients back to back for SECONDS (0: skip)")
    parser.add_argument("--database-url", default=default_database_url(),
        help="server where a throwaway database is created (needs CREATE DATABASE)")
    args = parser.parse_args(argv)
    args.sizes = [size for size in args.sizes.split(",") if size]
    args.clients = [int(count) for count in args.clients.split(",") if count]
    unknown = set(args.sizes) - {"demo", *SIZES}
    if unknown:
        parser.error(f"--sizes: unknown size {sorted(unknown)[0]!r}")
    if not 0 <= args.soak <= 3600:
        parser.error("--soak must be between 0 and 3600 seconds")
    if not 1 <= args.requests <= 100_000 or not 1 <= args.jobs <= 100_000:
        parser.error("--requests and --jobs must be between 1 and 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one JSON object as the last line."""
    args = parse_args(argv)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"workers": args.workers, "threads": args.threads,
                     "job_threads": args.job_threads, "job_batch_size": args.job_batch_size,
                     "torch_threads": args.torch_threads, "index": args.index,
                     "sequence_length": args.sequence_length},
    }
    with tempfile.TemporaryDirectory(prefix="b4mr-bench-service-") as folder:
        for size in args.sizes:
            work = Path(folder) / size
            work.mkdir()
            results[size] = run_size(size, args, work)
            print(f"{size}: {json.dumps(results[size])}", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
