"""How every step grows with the number of playlists, up to the full size, end to end.

    python benchmarks/bench_scale.py                          # CSV at 1/8, 1/4, 1/2, 1 x full
    python benchmarks/bench_scale.py --fractions 0.125,0.25 \
        --database postgresql://postgres@127.0.0.1:5432/postgres   # and PostgreSQL
    python benchmarks/bench_scale.py --end-to-end --fractions 1 --train-minutes 10 \
        --database postgresql://postgres@127.0.0.1:5432/postgres   # every step, full size
    python benchmarks/bench_scale.py --plot benchmarks/scale.png OUTPUT...  # from saved runs
    python benchmarks/bench_scale.py --scale mpd --fractions 1    # the Million Playlist size

Each step runs as its own child process (``demo data/generate.py``, ``preprocessing.py``,
``train.py``, ``flask``, gunicorn) and is measured by ``os.wait4``: wall time and that child's
own peak RSS (``RUSAGE_CHILDREN`` would report the largest child so far, hiding a smaller later
step), with the 1-minute load average sampled every 5 s while it runs. The catalog stays the
one of ``--scale`` (full: 116,293 songs; mpd: the Million Playlist Dataset's 2,262,292); only
the playlists scale, so rows grow with the fraction. With
``--database`` (a server DSN) every fraction is also generated into a throwaway database with
COPY and preprocessed from it, then the database is dropped.

``--end-to-end`` runs every step at each fraction as a user would, in a throwaway database:
generate into PostgreSQL, preprocess from it, train the ``full`` preset for ``--train-minutes``
(then validation; samples/s and the projected time of one epoch come from metrics.jsonl),
evaluate the best checkpoint on the test split with both baselines, ``flask score-all``
(stopped after ``--score-minutes`` when it has not finished; the playlists it stored by then
give its rate) and one gunicorn worker answering ``--requests`` + 1 sync requests. Children
get one thread each (OMP_NUM_THREADS, ``--threads``, TORCH_THREADS). Prints a table and one
JSON object as the last line; ``--plot`` draws the saved outputs of such runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "demo data" / "generate.py"
sys.path.insert(0, str(REPO))


def generator_module() -> ModuleType:
    """demo data/generate.py as a module (its folder name is no package name), for its sizes."""
    spec = importlib.util.spec_from_file_location("generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# playlists at fraction 1 of each generator scale this benchmark runs, as the generator has them
SCALE_PLAYLISTS = {name: scale.playlists for name, scale in generator_module().SCALES.items()
                   if name in ("full", "mpd")}
FULL_PLAYLISTS = SCALE_PLAYLISTS["full"]


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCH_THREADS": "1"}
LOAD_SAMPLE_SECONDS = 5.0


@dataclass
class Step:
    """What one child process took: wall seconds, its own peak RSS and the load around it."""

    seconds: float
    peak_rss_mb: int
    stdout: str
    stderr: str
    stopped: bool
    load: list[float] = field(default_factory=list)
    result: Any = None

    def summary(self) -> dict[str, Any]:
        """The child's JSON last line."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    def load_average(self) -> dict[str, float]:
        """Mean and largest 1-minute load average sampled while the child ran."""
        return {"load_mean": round(float(np.mean(self.load)), 2),
                "load_max": round(max(self.load), 2)}


def run_child(command: list[str], env: dict[str, str] | None = None,
              limit_seconds: float | None = None,
              while_running: Callable[[subprocess.Popen, threading.Event], Any] | None = None,
              ) -> Step:
    """Run one child to completion, or SIGINT it after ``limit_seconds``; what it took.

    ``while_running(child, ended)`` runs in a thread beside it (a client of a server that it
    ends); its result is ``Step.result``. A child stopped at the limit may exit non-zero; any
    other failure raises.
    """
    load: list[float] = []
    done = threading.Event()

    def sample_load() -> None:
        """Append the 1-minute load average now and every few seconds until the child ends."""
        while True:
            load.append(os.getloadavg()[0])
            if done.wait(LOAD_SAMPLE_SECONDS):
                return

    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, text=True,
                                 env={**os.environ, **(env or {})})
        sampler = threading.Thread(target=sample_load, daemon=True)
        sampler.start()
        results: list[Any] = []
        client = None
        if while_running is not None:
            client = threading.Thread(target=lambda: results.append(while_running(child, done)),
                                      daemon=True)
            client.start()
        timer = None
        if limit_seconds is not None:
            timer = threading.Timer(limit_seconds, child.send_signal, (signal.SIGINT,))
            timer.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        stopped = timer is not None and not timer.is_alive()
        if timer is not None:
            timer.cancel()
        sampler.join()
        if client is not None:
            client.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if child.returncode != 0 and not stopped:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {err[-2000:]}")
    if while_running is not None and not results:
        raise RuntimeError(f"the client of {' '.join(command)} failed: {err[-2000:]}")
    return Step(seconds, round(usage.ru_maxrss / 1024), out, err, stopped, load,
                results[0] if results else None)


def run_step(command: list[str]) -> tuple[float, int, dict[str, Any]]:
    """Run one child to completion; its seconds, own peak RSS (MB) and its JSON last line."""
    step = run_child(command)
    return step.seconds, step.peak_rss_mb, step.summary()


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


def measure(
    fraction: float, work: Path, server_dsn: str | None, scale: str = "full"
) -> list[dict[str, Any]]:
    """Generate and preprocess at ``fraction`` x the ``scale`` size; one record per step."""
    playlists = round(SCALE_PLAYLISTS[scale] * fraction)
    python = sys.executable
    tables, output = work / f"tables_{playlists}", work / f"pp_{playlists}"
    shutil.rmtree(tables, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    steps: list[tuple[str, list[str]]] = [
        ("generate csv", [python, str(GENERATOR), "--scale", scale, "--playlists",
                          str(playlists), "--out", str(tables)]),
        ("preprocess csv", [python, "preprocessing.py", "--source", "csv", "--data", str(tables),
                            "--out", str(output)]),
    ]
    name = f"b4mr_bench_scale_{playlists}"
    if server_dsn is not None:
        dsn = throwaway_database(server_dsn, name)
        steps += [
            ("generate postgres", [python, str(GENERATOR), "--scale", scale, "--playlists",
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
            records.append({"step": step, "scale": scale, "fraction": fraction,
                            "playlists": playlists,
                            "rows": rows, "seconds": round(seconds, 2),
                            "rows_per_s": round(rows / seconds), "peak_rss_mb": peak})
    finally:
        if server_dsn is not None:
            drop_database(server_dsn, name)
        shutil.rmtree(tables, ignore_errors=True)
    return records


def query(dsn: str, statement: str, parameters: tuple[Any, ...] = ()) -> list[tuple]:
    """The rows of one read-only statement."""
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement, parameters)
            return cursor.fetchall()
    finally:
        connection.close()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def post_json(port: int, path: str, body: Any) -> tuple[int, float]:
    """POST one JSON body; the status and the milliseconds until the whole answer was read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.perf_counter()
        connection.request("POST", path, body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status, (time.perf_counter() - started) * 1000
    finally:
        connection.close()


def ready(port: int) -> bool:
    """Whether the service on ``port`` answers /ready with 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/ready")
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        connection.close()


def rss_mb(pid: int) -> float:
    """A process's resident memory now, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = next(line.split()[1] for line in status.splitlines()
                     if line.startswith("VmRSS:"))
    return round(int(kilobytes) / 1024, 1)


def sync_client(port: int, bodies: list[dict[str, Any]], ready_within: float
                ) -> Callable[[subprocess.Popen, threading.Event], dict[str, Any]]:
    """A client that waits for /ready, sends ``bodies`` one at a time and ends the server."""
    def exercise(server: subprocess.Popen, ended: threading.Event) -> dict[str, Any]:
        """Time to ready, the first answer, the rest's p50 and the processes' RSS."""
        try:
            started = time.perf_counter()
            while not ready(port):
                if ended.is_set() or time.perf_counter() - started > ready_within:
                    raise RuntimeError("the service did not become ready")
                time.sleep(0.5)
            ready_seconds = time.perf_counter() - started
            answers = [post_json(port, "/recommendations", body) for body in bodies]
            if any(status != 200 for status, _ in answers):
                raise RuntimeError(f"answers {[status for status, _ in answers]}")
            workers = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            return {"ready_seconds": round(ready_seconds, 1),
                    "first_request_ms": round(answers[0][1], 1),
                    "requests": len(answers) - 1,
                    "p50_ms": round(float(np.median([ms for _, ms in answers[1:]])), 2),
                    "master_rss_mb": rss_mb(server.pid),
                    "worker_rss_mb": [rss_mb(int(pid)) for pid in workers]}
        finally:
            server.send_signal(signal.SIGTERM)
    return exercise


def epoch_samples(data: Path) -> int:
    """Training samples in one epoch of the ``full`` preset on the training file in ``data``."""
    from config import load_config
    from dataset import load_data, split_for

    config = load_config("full")
    _, sequences = load_data(data)
    train = split_for(config, sequences).train
    return int(np.sum(-(-train.lengths // config.data.seq_len)))


def training_figures(run_dir: Path, data: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Steps, samples/s and the projected epoch from the run's metrics and training file.

    The epoch is counted in a spawned process: a child's peak RSS (``os.wait4``) starts from
    its parent's peak at its exec, so this process must never hold the training data.
    """
    from config import load_config

    config = load_config("full")
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        samples_per_epoch = pool.submit(epoch_samples, data).result()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["type"] == "epoch"]
    samples = np.diff([0] + [epoch["step"] for epoch in epochs]) * config.train.batch_size
    train_seconds = sum(count / epoch["samples_per_s"]
                        for count, epoch in zip(samples, epochs, strict=True))
    samples_per_s = float(samples.sum() / train_seconds)
    return {"epochs": len(epochs), "steps": summary["steps"], "samples": int(samples.sum()),
            "samples_per_s": round(samples_per_s, 1), "epoch_samples": samples_per_epoch,
            "epoch_share": round(float(samples.sum()) / samples_per_epoch, 3),
            "projected_epoch_minutes": round(samples_per_epoch / samples_per_s / 60, 1),
            "validation_seconds": round(sum(epoch["seconds"] for epoch in epochs)
                                        - train_seconds, 1),
            "val_ndcg@10": round(float(epochs[-1]["val_ndcg@10"]), 4),
            "stop_reason": summary["stop_reason"]}


def tqdm_rate(stderr: str, unit: str) -> float | None:
    """The last rate tqdm printed, in ``unit``/s (None before its first estimate)."""
    rates = re.findall(rf"([\d.]+)(k?){unit}/s", stderr)
    if not rates:
        return None
    value, thousands = rates[-1]
    return float(value) * (1000 if thousands else 1)


def end_to_end(fraction: float, server_dsn: str, work: Path, train_minutes: float,
               score_minutes: float, requests: int) -> list[dict[str, Any]]:
    """Every step once at ``fraction`` x the full size: generate, preprocess, train, evaluate,
    score-all, serve.

    The training data and run stay in ``work`` (e2e_<playlists>, e2e_<playlists>_run); the
    database is dropped.
    """
    python = sys.executable
    playlists = round(FULL_PLAYLISTS * fraction)
    data, run_dir = work / f"e2e_{playlists}", work / f"e2e_{playlists}_run"
    for folder in (data, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    name = f"b4mr_bench_end_to_end_{playlists}"
    dsn = throwaway_database(server_dsn, name)
    records: list[dict[str, Any]] = []

    def record(step_name: str, step: Step, **figures: Any) -> None:
        """Keep one step's record and print it as a table row."""
        records.append({"step": step_name, "fraction": fraction, "playlists": playlists,
                        "seconds": round(step.seconds, 1),
                        "peak_rss_mb": step.peak_rss_mb, **step.load_average(), **figures})
        shown = ", ".join(f"{key} {value}" for key, value in figures.items())
        print(f"{step_name:<20} {fraction:>8g} {step.seconds:>8.1f} {step.peak_rss_mb:>8} "
              f"{records[-1]['load_mean']:>6} {shown}", flush=True)

    try:
        step = run_child([python, str(GENERATOR), "--scale", "full", "--playlists",
                          str(playlists), "--database", dsn], ONE_THREAD)
        rows = int(step.summary()["rows"]["playlist_songs"])
        record("generate postgres", step, rows=rows, rows_per_s=round(rows / step.seconds))
        step = run_child([python, "preprocessing.py", "--source", "postgres", "--dsn", dsn,
                          "--out", str(data)], ONE_THREAD)
        record("preprocess postgres", step, rows=rows, rows_per_s=round(rows / step.seconds))
        step = run_child([python, "train.py", "--preset", "full", "--data", str(data),
                          "--run-dir", str(run_dir), "--threads", "1", "--quiet",
                          "--set", f"train.max_minutes={train_minutes:g}"], ONE_THREAD)
        record("train", step, **training_figures(run_dir, data, step.summary()))
        checkpoint = run_dir / "best.pt"
        step = run_child([python, "train.py", "--evaluate", str(checkpoint), "--data", str(data),
                          "--split", "test", "--threads", "1"], ONE_THREAD)
        results = step.summary()
        record("evaluate test", step, sequences=results["sequences"],
               sequences_per_s=round(results["sequences"] / step.seconds, 1),
               **{f"{model}_ndcg@10": round(results[model]["ndcg@10"], 4)
                  for model in ("model", "most_popular", "transition")})
        service_env = {**ONE_THREAD, "DATABASE_URL": dsn, "MODEL_PATH": str(checkpoint),
                       "API_TOKEN": "", "CATALOG_DIR": "", "LOG_LEVEL": "warning"}
        run_child([python, "-m", "flask", "--app", "flask_app", "init-db"], service_env)
        step = run_child([python, "-m", "flask", "--app", "flask_app", "score-all"],
                         service_env, limit_seconds=60 * score_minutes)
        stored, total = query(dsn, "SELECT (SELECT count(DISTINCT playlist_id) FROM "
                                       "recommendations), (SELECT count(*) FROM playlists)")[0]
        record("score-all", step, scored=stored, of=total, finished=not step.stopped,
               playlists_per_s=round(stored / step.seconds, 1),
               loop_playlists_per_s=tqdm_rate(step.stderr, "playlist"))
        songs = query(dsn, "SELECT array_agg(song_id ORDER BY pos) FROM playlist_songs "
                           "WHERE playlist_id IN (SELECT playlist_id FROM playlists ORDER BY "
                           "playlist_id LIMIT %s) GROUP BY playlist_id", (requests + 1,))
        bodies = [{"song_ids": row[0], "k": 10, "exclude_seen": True} for row in songs]
        port = free_port()
        step = run_child([python, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                          "flask_app:create_app()"],
                         {**service_env, "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1",
                          "THREADS": "1", "JOB_THREADS": "1"},
                         while_running=sync_client(port, bodies, ready_within=600))
        record("serve (gunicorn)", step, **step.result)
    finally:
        drop_database(server_dsn, name)
    return records


def projected_seconds(record: dict[str, Any]) -> float:
    """A step's seconds for all of its work: one whole epoch of training, every playlist of
    ``score-all`` (from its rate when it was stopped early), else as measured."""
    if record["step"] == "train":
        return float(record["projected_epoch_minutes"]) * 60
    if record["step"] == "score-all" and not record["finished"]:
        return float(record["of"]) / float(record["playlists_per_s"])
    return float(record["seconds"])


def plot(outputs: list[Path], png: Path) -> None:
    """Seconds and peak RSS of every step against the playlists, from runs' JSON last lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    records = [record for output in outputs
               for record in json.loads(output.read_text().strip().splitlines()[-1])["records"]]
    figure, (seconds_axes, memory_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for step in dict.fromkeys(record["step"] for record in records):
        mine = sorted((record for record in records if record["step"] == step),
                      key=lambda record: record["playlists"])
        playlists = [record["playlists"] for record in mine]
        label = {"train": "train (one epoch, projected)",
                 "score-all": "score-all (all playlists)",
                 "serve (gunicorn)": "serve (start, 51 requests)"}.get(step, step)
        seconds_axes.plot(playlists, [projected_seconds(record) for record in mine], "o-",
                          label=label)
        memory_axes.plot(playlists, [record["peak_rss_mb"] for record in mine], "o-",
                         label=step)
    for axes, title in ((seconds_axes, "seconds (1 thread)"), (memory_axes, "peak RSS (MB)")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("playlists (catalog: 116,293 songs)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
    seconds_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def main() -> None:
    """Parse the options, measure every fraction or the end-to-end run, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1",
                        help="sizes as fractions of the scale's playlists")
    parser.add_argument("--scale", choices=sorted(SCALE_PLAYLISTS), default="full",
                        help="the generator's catalog and playlists at fraction 1 (not with "
                             "--end-to-end, which is the full scale)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_scale",
                        help="folder for the generated tables (removed after each size)")
    parser.add_argument("--database", metavar="SERVER_DSN", default=None,
                        help="also generate into and preprocess from PostgreSQL")
    parser.add_argument("--end-to-end", action="store_true",
                        help="run every step end to end at each fraction (needs --database)")
    parser.add_argument("--train-minutes", type=float, default=10.0,
                        help="--end-to-end: train.max_minutes of the training step")
    parser.add_argument("--score-minutes", type=float, default=10.0,
                        help="--end-to-end: stop score-all after this many minutes")
    parser.add_argument("--requests", type=int, default=50,
                        help="--end-to-end: sync requests after the first one")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="write a plot of the runs whose output files follow, and stop")
    parser.add_argument("outputs", type=Path, nargs="*",
                        help="with --plot: files whose last line is this benchmark's JSON")
    args = parser.parse_args()
    if args.plot is not None:
        plot(args.outputs, args.plot)
        return
    if args.database is not None:
        parse_dsn(args.database)
    args.work.mkdir(parents=True, exist_ok=True)
    fractions = [float(value) for value in args.fractions.split(",")]
    if args.end_to_end:
        if args.database is None:
            parser.error("--end-to-end needs --database SERVER_DSN")
        if args.scale != "full":
            parser.error("--end-to-end runs the full scale only")
        print(f"{'step':<20} {'fraction':>8} {'seconds':>8} {'peak MB':>8} {'load':>6} "
              "figures", flush=True)
        records = [record for fraction in fractions
                   for record in end_to_end(fraction, args.database, args.work,
                                            args.train_minutes, args.score_minutes,
                                            args.requests)]
        print(json.dumps({"benchmark": "scale_end_to_end", "records": records}))
        return
    records = []
    print(f"{'step':<20} {'fraction':>8} {'rows':>11} {'seconds':>8} {'rows/s':>10} "
          f"{'peak MB':>8}", flush=True)
    for fraction in fractions:
        for record in measure(fraction, args.work, args.database, args.scale):
            records.append(record)
            print(f"{record['step']:<20} {fraction:>8g} {record['rows']:>11,} "
                  f"{record['seconds']:>8.1f} {record['rows_per_s']:>10,} "
                  f"{record['peak_rss_mb']:>8}", flush=True)
    print(json.dumps({"benchmark": "scale", "records": records}))


if __name__ == "__main__":
    main()
