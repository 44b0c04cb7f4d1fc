"""Cold start: songs never played in training, recommended after a catalog extension.

    python benchmarks/bench_coldstart.py [--datasets 1,2,3] [--seeds 42] [--song-dropout 0.1]
                                         [--sweep 0.2,0.05] [--threads 2] [--set key=value ...]

Per generated dataset (``demo data/generate.py --seed N``, demo scale): 10% of the songs that
occur in playlists are held out entirely (every playlist row of theirs removed from training,
their catalog rows kept) and 10% of the playlists are test playlists, never trained on. The
demo preset trains on the rest with ``model.song_dropout`` and without (early stopping on its
own validation split); then the encoders and the model are extended by the whole catalog
(cold_start.py) and the full catalog is ranked, the test playlist's seen songs excluded:

- cold: each test playlist holding a held-out song after its first position; the target is
  its last such song, the input the songs before it (held-out ones included: after the
  extension they are known);
- warm: each test playlist whose last song was trained on; the input is the rest.

Baselines on the same sets: random (its exact expectation), and content (every song ranked
by how many input songs share its artist, then its album, ties broken by the cosine
similarity of its sound, the scaled features other than explicit / disc / track number, to
the input's mean). Means over datasets x seeds with the population standard deviation; the
last line is one JSON object.
The new songs' output bias follows cold_start (their album's mean); ``*_bias`` rows report the
alternatives (``set_new_bias``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoint import load_model  # noqa: E402
from cold_start import extend_encoders, extend_model  # noqa: E402
from config import PRESET_SONG_DROPOUT, load_config  # noqa: E402
from csv_tables import read_csv_songs  # noqa: E402
from dataset import EvalSet, Playlists  # noqa: E402
from evaluation import evaluate_scores, model_scorer  # noqa: E402
from model import BERT4Rec  # noqa: E402
from preprocessing_utils import FEATURE_NAMES, FIRST_SONG_INDEX, Encoders  # noqa: E402
from train import train  # noqa: E402

KEYS = ("hr@10", "ndcg@10", "mrr")
HOLDOUT_SHARE = 0.1
TEST_SHARE = 0.1
# what the content baseline compares: the sound, not the explicit flag or the track's place
SOUND = [FEATURE_NAMES.index(name) for name in FEATURE_NAMES
         if name not in ("explicit", "disc_number", "track_number")]


def make_dataset(seed: int, root: Path) -> Path:
    """Generate dataset ``seed``, hold out songs and test playlists, preprocess the rest."""
    folder = root / f"data{seed}"
    if (folder / "out" / "training.npz").is_file():
        return folder
    tables = folder / "tables"
    if not (tables / "songs.csv").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "demo data" / "generate.py"), "--scale",
                        "demo", "--seed", str(seed), "--out", str(tables)], check=True,
                       capture_output=True)
    rows = pd.read_csv(tables / "playlist_songs.csv")
    rng = np.random.default_rng(seed)
    songs = np.unique(rows["song_id"].to_numpy())
    held = rng.choice(songs, round(HOLDOUT_SHARE * len(songs)), replace=False)
    playlists = np.unique(rows["playlist_id"].to_numpy())
    test = rng.choice(playlists, round(TEST_SHARE * len(playlists)), replace=False)
    in_test = rows["playlist_id"].isin(test).to_numpy()
    training = folder / "training tables"
    training.mkdir(parents=True, exist_ok=True)
    rows[~in_test & ~rows["song_id"].isin(held).to_numpy()].to_csv(
        training / "playlist_songs.csv", index=False)
    (training / "songs.csv").write_bytes((tables / "songs.csv").read_bytes())
    rows[in_test].to_csv(folder / "test_playlist_songs.csv", index=False)
    np.save(folder / "held_out.npy", np.sort(held))
    subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--source", "csv",
                    "--data", str(training), "--out", str(folder / "out")], check=True,
                   capture_output=True)
    return folder


def eval_sets(folder: Path, encoders: Encoders) -> dict[str, EvalSet]:
    """The cold and warm evaluation sets of a dataset's test playlists (extended tokens)."""
    rows = pd.read_csv(folder / "test_playlist_songs.csv").sort_values(["playlist_id", "pos"])
    held = np.load(folder / "held_out.npy")
    parts: dict[str, tuple[list[int], list[np.ndarray], list[int]]] = {
        "cold": ([], [], []), "warm": ([], [], [])}
    for playlist, group in rows.groupby("playlist_id", sort=True):
        ids = group["song_id"].to_numpy()
        tokens = encoders.find_songs(ids)
        if (tokens < 0).any() or len(ids) < 2:
            continue
        cold = np.flatnonzero(np.isin(ids, held))
        cold = cold[cold >= 1]
        if len(cold):
            parts["cold"][0].append(int(playlist))
            parts["cold"][1].append(tokens[: cold[-1]])
            parts["cold"][2].append(int(tokens[cold[-1]]))
        if not np.isin(ids[-1], held):
            parts["warm"][0].append(int(playlist))
            parts["warm"][1].append(tokens[:-1])
            parts["warm"][2].append(int(tokens[-1]))
    sets = {}
    for name, (ids, inputs, targets) in parts.items():
        offsets = np.concatenate([[0], np.cumsum([len(part) for part in inputs])])
        playlists = Playlists(np.asarray(ids, np.int64), offsets.astype(np.int64),
                              np.concatenate(inputs).astype(np.int64))
        sets[name] = EvalSet(playlists, np.asarray(targets, dtype=np.int64))
    return sets


class Content:
    """Shared artist count, then shared album count, then cosine of the sound to the mean."""

    def __init__(self, encoders: Encoders) -> None:
        self.album = torch.from_numpy(encoders.song_album)
        self.artist = torch.from_numpy(encoders.song_artist)
        self.n_albums, self.n_artists = encoders.n_album_tokens, encoders.n_artist_tokens
        sound = torch.from_numpy(encoders.song_features[:, SOUND]).double()
        self.sound = sound / sound.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def __call__(self, eval_set: EvalSet, rows: np.ndarray) -> torch.Tensor:
        """Scores (len(rows), n_song_tokens): artist count x 1e6 + album count x 1e3 + cosine."""
        inputs = eval_set.inputs
        scores = []
        for row in rows:
            songs = torch.from_numpy(inputs.songs[inputs.offsets[row]:inputs.offsets[row + 1]])
            artists = torch.bincount(self.artist[songs], minlength=self.n_artists).double()
            albums = torch.bincount(self.album[songs], minlength=self.n_albums).double()
            artists[0] = albums[0] = 0.0
            mean = self.sound[songs].mean(dim=0)
            cosine = self.sound @ (mean / mean.norm().clamp(min=1e-12))
            scores.append(artists[self.artist] * 1e6 + albums[self.album] * 1e3 + cosine)
        return torch.stack(scores)


def random_metrics(eval_set: EvalSet, n_songs: int) -> dict[str, float]:
    """The expected metrics of a uniformly random ranking of the songs not seen (exact, so
    no sampling noise): a target is at each of the N candidate ranks with probability 1/N."""
    inputs = eval_set.inputs
    totals = dict.fromkeys(KEYS, 0.0)
    gains = 1.0 / np.log2(np.arange(10) + 2.0)
    for row, target in enumerate(eval_set.targets):
        seen = np.unique(inputs.songs[inputs.offsets[row]:inputs.offsets[row + 1]])
        candidates = n_songs - int((seen != target).sum())
        totals["hr@10"] += min(10, candidates) / candidates
        totals["ndcg@10"] += gains[:candidates].sum() / candidates
        totals["mrr"] += float(np.sum(1.0 / np.arange(1, candidates + 1))) / candidates
    return {key: value / max(len(eval_set), 1) for key, value in totals.items()}


def run_one(folder: Path, seed: int, dropout: float, args: argparse.Namespace) -> Path:
    """Train the demo preset with this song dropout on a dataset (resuming, so a finished run
    is not trained again); its best.pt."""
    tag = "_".join(item.replace("=", "-") for item in args.overrides)
    run_dir = args.runs / f"{folder.name}_seed{seed}_dropout{dropout:g}{'_' + tag if tag else ''}"
    config = load_config("demo", overrides=[
        *args.overrides, f"model.song_dropout={dropout}", f"paths.data_dir={folder / 'out'}",
        f"paths.run_dir={run_dir}", f"train.threads={args.threads}", f"train.seed={seed}"])
    train(config, resume=True, progress=False)
    return run_dir / "best.pt"


def set_new_bias(model: BERT4Rec, known: int, how: str) -> None:
    """Give the songs from token ``known`` on another output bias than cold_start's album
    mean: ``min`` (the least played song's), ``mean`` (of every known song) or ``unknown``
    (the bias song dropout learned; the mean without it), the alternatives it was chosen over."""
    bias = model.head_bias.data
    known_bias = bias[FIRST_SONG_INDEX:known]
    values = {"min": known_bias.min(), "mean": known_bias.mean(),
              "unknown": model.unknown_bias.data if model.song_dropout > 0 else known_bias.mean()}
    bias[known:] = values[how]


def evaluate(
    checkpoint: Path, folder: Path, bias: str | None = None
) -> dict[str, dict[str, float]]:
    """Cold and warm metrics of a checkpoint after extending it by the dataset's catalog
    (``bias``: see set_new_bias)."""
    loaded = load_model(checkpoint)
    catalog = read_csv_songs(folder / "tables" / "songs.csv")
    encoders = extend_encoders(loaded.encoders, catalog)
    model = extend_model(loaded.model, encoders)
    if bias is not None:
        set_new_bias(model, loaded.model.n_song_tokens, bias)
    scorer = model_scorer(model, loaded.config.data.seq_len, torch.device("cpu"))
    return {name: evaluate_scores(scorer, eval_set, 256, exclude_seen=True)
            for name, eval_set in eval_sets(folder, encoders).items()}


def baselines(checkpoint: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """Random and content metrics on the cold and warm sets, and the sets' sizes."""
    encoders = extend_encoders(load_model(checkpoint).encoders,
                               read_csv_songs(folder / "tables" / "songs.csv"))
    results: dict[str, dict[str, Any]] = {}
    for name, eval_set in eval_sets(folder, encoders).items():
        results[name] = {
            "random": random_metrics(eval_set, encoders.n_songs),
            "content": evaluate_scores(Content(encoders), eval_set, 64, exclude_seen=True),
            "sequences": len(eval_set),
        }
    return results


def summarize(values: list[dict[str, float]]) -> dict[str, float]:
    """Mean and population standard deviation of each metric over runs."""
    summary: dict[str, float] = {}
    for key in KEYS:
        numbers = np.array([value[key] for value in values])
        summary[key] = round(float(numbers.mean()), 4)
        summary[f"{key}_std"] = round(float(numbers.std()), 4)
    return summary


def main() -> None:
    """Train, extend, evaluate every dataset x seed x dropout; print per-run and mean results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="1,2,3")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--song-dropout", type=float, default=PRESET_SONG_DROPOUT)
    parser.add_argument("--sweep", default="", help="more song_dropout values to report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=REPO_ROOT / "build" / "coldstart")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "bench_coldstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dropouts = [("model", args.song_dropout), ("no_dropout", 0.0),
                *((f"dropout_{value}", float(value)) for value in args.sweep.split(",") if value)]
    variants: list[tuple[str, float, str | None]] = [
        *((name, dropout, None) for name, dropout in dropouts),
        ("no_dropout_min_bias", 0.0, "min"), ("no_dropout_mean_bias", 0.0, "mean"),
        *((f"{name}_unknown_bias", dropout, "unknown") for name, dropout in dropouts
          if dropout > 0)]
    collected: dict[str, dict[str, list[dict[str, float]]]] = {"cold": {}, "warm": {}}
    sizes: dict[str, list[int]] = {"cold": [], "warm": []}
    for dataset in (int(value) for value in args.datasets.split(",")):
        folder = make_dataset(dataset, args.root)
        for seed in (int(value) for value in args.seeds.split(",")):
            run: dict[str, Any] = {"dataset": dataset, "seed": seed}
            for name, dropout, bias in variants:
                checkpoint = run_one(folder, seed, dropout, args)
                for part, metrics in evaluate(checkpoint, folder, bias).items():
                    collected[part].setdefault(name, []).append(metrics)
                    run.setdefault(part, {})[name] = {key: round(metrics[key], 4) for key in KEYS}
            for part, found in baselines(checkpoint, folder).items():
                sizes[part].append(found.pop("sequences"))
                for name, metrics in found.items():
                    collected[part].setdefault(name, []).append(metrics)
                    run[part][name] = {key: round(metrics[key], 4) for key in KEYS}
            print(json.dumps(run), flush=True)
    results: dict[str, Any] = {part: {name: summarize(values) for name, values in found.items()}
                               for part, found in collected.items()}
    cold, warm = results["cold"], results["warm"]
    results["goals"] = {
        "cold_hr10_over_content": round(cold["model"]["hr@10"] / max(
            cold["content"]["hr@10"], 1e-12), 3),
        "cold_hr10_over_random": round(cold["model"]["hr@10"] / max(
            cold["random"]["hr@10"], 1e-12), 1),
        "warm_ndcg10_cost": round(1 - warm["model"]["ndcg@10"] / max(
            warm["no_dropout"]["ndcg@10"], 1e-12), 4),
    }
    results["song_dropout"] = args.song_dropout
    results["sequences"] = {part: int(np.mean(values)) for part, values in sizes.items()}
    results["runs"] = len(sizes["cold"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
