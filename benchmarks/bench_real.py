"""Real-data quality: MovieLens-100k, leave-one-out, full ranking, model beside both baselines.

    python benchmarks/bench_real.py [--objectives cloze,causal] [--seeds 42,43,44]
                                    [--threads 2] [--max-minutes M] [--set section.key=value]

The data is the ``ml-100k.inter`` file shipped inside the RecBole 1.2.1 wheel: the wheel is
fetched once with the venv's ``pip download --no-deps`` into build/cache/recbole (a second
run is offline) and read straight from the zip; RecBole is never installed or imported and
nothing of the data leaves build/ (its license forbids redistribution). One interaction per
rating, each user's ratings ordered by timestamp with ties kept in file order, ids only (no
side information). Every model (``--preset full`` defaults plus the objective) and both
baselines are evaluated on the same test split, with seen items excluded and kept. The last
line printed is one JSON object: means over the seeds of the default objective's runs, and
per objective and seed detail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoint import load_model  # noqa: E402
from config import load_config  # noqa: E402
from dataset import load_data, split_for  # noqa: E402
from evaluation import evaluate_split  # noqa: E402
from preprocessing_utils import Encoders, save_training_file  # noqa: E402
from train import train  # noqa: E402

WHEEL = "recbole-1.2.1-py3-none-any.whl"
INTER_PATH = "recbole/dataset_example/ml-100k/ml-100k.inter"
KEYS = ("ndcg@10", "hr@10", "mrr")
CACHE_DIR = REPO_ROOT / "build" / "cache" / "recbole"


def fetch_wheel(cache_dir: Path = CACHE_DIR) -> Path:
    """The RecBole wheel in ``cache_dir``, downloaded (no dependencies) only when missing."""
    wheel = cache_dir / WHEEL
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "recbole==1.2.1", "-d", str(cache_dir)], check=True)
    return wheel


def parse_interactions(lines: Iterable[str]) -> pd.DataFrame:
    """Rows (user, item, timestamp) of an atomic ``.inter`` file, in file order.

    The header names the columns as ``name:type``; only user_id, item_id and timestamp are
    kept. Every rating is one interaction whatever its value.
    """
    rows = iter(lines)
    header = [name.split(":")[0] for name in next(rows).rstrip("\n").split("\t")]
    columns = [header.index(name) for name in ("user_id", "item_id", "timestamp")]
    records = []
    for line in rows:
        if line.strip():
            fields = line.rstrip("\n").split("\t")
            records.append([int(float(fields[column])) for column in columns])
    return pd.DataFrame(records, columns=["user", "item", "timestamp"], dtype=np.int64)


def to_playlist_rows(interactions: pd.DataFrame) -> pd.DataFrame:
    """Playlist rows (playlist_id, pos, song_id): per user, items by timestamp, ties in file order.

    One stable sort by (user, timestamp) keeps equal timestamps in the order of the file.
    """
    ordered = interactions.sort_values(["user", "timestamp"], kind="stable")
    positions = ordered.groupby("user", sort=False).cumcount()
    return pd.DataFrame({"playlist_id": ordered["user"].to_numpy(),
                         "pos": positions.to_numpy(dtype=np.int64),
                         "song_id": ordered["item"].to_numpy()})


def write_training_folder(rows: pd.DataFrame, folder: Path) -> None:
    """Encoders (ids only) and training.npz for ``rows``, as preprocessing.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    encoders = Encoders.fit(rows)
    encoders.save(folder / "encoders")
    playlist_ids, lengths = np.unique(rows["playlist_id"].to_numpy(), return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ordered = rows.sort_values(["playlist_id", "pos"], kind="stable")
    songs = encoders.encode_songs(ordered["song_id"].to_numpy())
    save_training_file(folder, playlist_ids, offsets, songs)


def prepare_data(data_dir: Path) -> dict[str, Any]:
    """Build ``data_dir`` from the cached wheel unless it is there; returns the data's shape."""
    if not (data_dir / "training.npz").is_file():
        with zipfile.ZipFile(fetch_wheel()) as wheel, wheel.open(INTER_PATH) as file:
            text = file.read().decode("utf-8").splitlines()
        write_training_folder(to_playlist_rows(parse_interactions(text)), data_dir)
    _, sequences = load_data(data_dir)
    return {"sequences": len(sequences), "items": len(np.unique(sequences.songs)),
            "interactions": len(sequences.songs),
            "mean_length": float(sequences.lengths.mean())}


def pick(metrics: dict[str, float]) -> dict[str, float]:
    """The reported keys of one metrics dict."""
    return {key: metrics[key] for key in KEYS}


def run_one(args: argparse.Namespace, objective: str, seed: int) -> dict[str, Any]:
    """Train ``--preset full`` with one objective and seed; test metrics seen excluded and kept."""
    run_dir = args.runs / f"{objective}_{seed}"
    config = load_config("full", overrides=[
        *args.overrides, f"model.objective={objective}", "data.split_protocol=leave_one_out",
        f"paths.data_dir={args.data}", f"paths.run_dir={run_dir}",
        f"train.threads={args.threads}", f"train.seed={seed}"])
    summary = train(config, progress=False)
    encoders, sequences = load_data(args.data)
    loaded = load_model(run_dir / "best.pt", encoders, where=args.data / "encoders")
    split = split_for(loaded.config, sequences)
    result: dict[str, Any] = {"objective": objective, "seed": seed,
                              "best_epoch": summary["best_epoch"], "epochs": summary["epochs"],
                              "train_seconds": summary["seconds"]}
    for name, exclude in (("seen_excluded", True), ("seen_kept", False)):
        evaluation = evaluate_split(loaded.model, split, loaded.config, torch.device("cpu"),
                                    "test", exclude_seen=exclude)
        result[name] = {which: pick(evaluation[which])
                        for which in ("model", "transition", "most_popular")}
    return result


def summarize(runs: list[dict[str, Any]], objective: str) -> dict[str, Any]:
    """Means over the seeds of ``objective``'s runs, in the headline's shape."""
    chosen = [run for run in runs if run["objective"] == objective]
    summary: dict[str, Any] = {"objective": objective, "seeds": [run["seed"] for run in chosen]}
    for view in ("seen_excluded", "seen_kept"):
        summary[view] = {which: {key: mean(run[view][which][key] for run in chosen)
                                 for key in KEYS}
                         for which in ("model", "transition", "most_popular")}
        summary[view]["model_over_transition"] = (
            summary[view]["model"]["ndcg@10"] / summary[view]["transition"]["ndcg@10"])
    summary["train_seconds"] = mean(run["train_seconds"] for run in chosen)
    return summary


def main() -> None:
    """Prepare the data, train every (objective, seed) in the time allowed, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="cloze,causal")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no further run once this much time has passed")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "build" / "ml-100k")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "bench_real")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    started = time.perf_counter()
    data = prepare_data(args.data)
    objectives = args.objectives.split(",")
    default_objective = load_config("full", overrides=args.overrides).model.objective
    runs = []
    deadline = started + 60 * args.max_minutes if args.max_minutes is not None else None
    for seed in (int(seed) for seed in args.seeds.split(",")):
        for objective in objectives:
            if deadline is not None and time.perf_counter() > deadline:
                break
            runs.append(run_one(args, objective, seed))
            print(json.dumps(runs[-1]), flush=True)
    by_objective = {objective: summarize(runs, objective) for objective in objectives
                    if any(run["objective"] == objective for run in runs)}
    headline_objective = (default_objective if default_objective in by_objective
                          else next(iter(by_objective)))
    headline = by_objective[headline_objective]
    print(json.dumps({"seen_excluded": headline["seen_excluded"],
                      "seen_kept": headline["seen_kept"],
                      "train_seconds": headline["train_seconds"],
                      "objective": headline_objective, "data": data,
                      "by_objective": by_objective, "runs": runs}))


if __name__ == "__main__":
    main()
