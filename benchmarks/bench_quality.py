"""Demo-data quality: the model against the ids-only model and both baselines, same split.

    python benchmarks/bench_quality.py [--protocol playlist|leave_one_out] [--threads 2]
                                       [--seeds 42,43] [--data-seeds 7,99,123]
                                       [--set section.key=value ...] [--no-ids-only]

Without ``--data-seeds`` the data is the committed demo sample (build/demo, made with
preprocessing.py when missing). ``--data-seeds`` regenerates the demo tables with each
generator seed (``demo data/generate.py --seed N``) into build/bench_quality/data-N and fits
their encoders there (never committed), so a figure can be checked on data it was not tuned on.
For every dataset and every split seed the demo preset is trained with side features and
without (early stopping on validation) and evaluated on the test split beside MostPopular and
Transition. The seed sets the split, the masking and the init; exclusion of already-seen songs
is each checkpoint's resolved train.exclude_seen, for every row alike. One JSON line per run,
then a table of mean ± standard deviation over datasets x seeds, and, as the last line, one
JSON object with the means, spreads and every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoint import load_model  # noqa: E402
from config import load_config  # noqa: E402
from dataset import load_data, split_for  # noqa: E402
from evaluation import evaluate_split  # noqa: E402
from train import train  # noqa: E402

KEYS = ("ndcg@10", "hr@10", "mrr")
ROWS = ("model", "ids_only", "transition", "most_popular")
GENERATED_DIR = REPO_ROOT / "build" / "bench_quality"


def committed_data(data_dir: Path) -> Path:
    """The committed demo sample preprocessed into ``data_dir`` (with the committed encoders)."""
    if not (data_dir / "training.npz").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--source", "csv",
                        "--data", str(REPO_ROOT / "demo data"), "--encoders",
                        str(REPO_ROOT / "preprocessing encoders"), "--out", str(data_dir)],
                       check=True)
    return data_dir


def generated_data(seed: int, root: Path = GENERATED_DIR) -> Path:
    """Demo-sized tables generated with ``seed`` and preprocessed (encoders fitted on them)."""
    tables, prepared = root / f"data-{seed}" / "tables", root / f"data-{seed}" / "prepared"
    if not (tables / "playlist_songs.csv").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "demo data" / "generate.py"),
                        "--seed", str(seed), "--out", str(tables)],
                       check=True, stdout=subprocess.DEVNULL)
    if not (prepared / "training.npz").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--source", "csv",
                        "--data", str(tables), "--out", str(prepared)],
                       check=True, stdout=subprocess.DEVNULL)
    return prepared


def evaluate_run(run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Test metrics of a run's best checkpoint, with both baselines on the same split."""
    encoders, sequences = load_data(data_dir)
    loaded = load_model(run_dir / "best.pt", encoders, where=data_dir / "encoders")
    split = split_for(loaded.config, sequences)
    return evaluate_split(loaded.model, split, loaded.config, torch.device("cpu"), "test")


def run_one(args: argparse.Namespace, data_name: str, data_dir: Path,
            seed: int) -> dict[str, Any]:
    """Train the variants on one dataset and split seed; test metrics of each and the baselines."""
    result: dict[str, Any] = {"data": data_name, "seed": seed}
    variants = [("model", []), ("ids_only", ["model.side_features=false"])]
    for name, extra in variants[: 1 if args.no_ids_only else 2]:
        tag = "_".join(item.replace("=", "-") for item in args.overrides)
        run_dir = (args.runs / data_name
                   / f"{args.protocol}_{seed}_{name}{'_' + tag if tag else ''}")
        config = load_config("demo", overrides=[
            *args.overrides, *extra, f"data.split_protocol={args.protocol}",
            f"paths.data_dir={data_dir}", f"paths.run_dir={run_dir}",
            f"train.threads={args.threads}", f"train.seed={seed}"])
        summary = train(config, progress=False)
        evaluation = evaluate_run(run_dir, data_dir)
        result[name] = {key: evaluation["model"][key] for key in KEYS}
        result[name]["best_epoch"] = summary["best_epoch"]
        result[name]["train_seconds"] = summary["seconds"]
        for baseline in ("most_popular", "transition"):
            result[baseline] = {key: evaluation[baseline][key] for key in KEYS}
        result["test_sequences"] = evaluation["sequences"]
        result["exclude_seen"] = evaluation["exclude_seen"]
    result["model_over_transition"] = (result["model"]["ndcg@10"]
                                       / max(result["transition"]["ndcg@10"], 1e-12))
    return result


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": mean(values), "std": stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over every (dataset, seed) run of each row's metrics and of the ratio."""
    summary: dict[str, Any] = {
        row: {key: spread([run[row][key] for run in runs]) for key in KEYS}
        for row in ROWS if row in runs[0]}
    summary["model_over_transition"] = spread([run["model_over_transition"] for run in runs])
    summary["model_over_transition_of_means"] = (summary["model"]["ndcg@10"]["mean"]
                                                 / summary["transition"]["ndcg@10"]["mean"])
    return summary


def format_summary(summary: dict[str, Any], runs: int) -> str:
    """The summary as a plain-text table: mean ± std per row and metric."""
    lines = [f"mean ± std over {runs} runs (datasets x seeds)",
             f"{'':<14}" + "".join(f"{key:>20}" for key in KEYS)]
    for row in ROWS:
        if row in summary:
            cells = (f"{summary[row][key]['mean']:.4f} ± {summary[row][key]['std']:.4f}"
                     for key in KEYS)
            lines.append(f"{row:<14}" + "".join(f"{cell:>20}" for cell in cells))
    ratio = summary["model_over_transition"]
    lines.append(f"model / transition NDCG@10: {ratio['mean']:.3f} ± {ratio['std']:.3f} "
                 f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}; ratio of means "
                 f"{summary['model_over_transition_of_means']:.3f})")
    return "\n".join(lines)


def integers(text: str) -> list[int]:
    """A comma-separated list of whole numbers, e.g. ``7,99,123``."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}") from None


def main() -> None:
    """Prepare each dataset, train every (dataset, seed), print the runs and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=("playlist", "leave_one_out"), default="playlist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", "--seed", type=integers, default=[42],
                        help="split seeds, comma-separated (default: 42)")
    parser.add_argument("--data-seeds", "--data-seed", type=integers, default=None,
                        help="generator seeds of demo datasets to make and use instead of the "
                             "committed sample, comma-separated")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "build" / "demo",
                        help="where the committed sample is preprocessed")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "bench_quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-ids-only", action="store_true",
                        help="train only the model with side features (e.g. to compare losses)")
    args = parser.parse_args()
    datasets = ([(f"data-{seed}", generated_data(seed)) for seed in args.data_seeds]
                if args.data_seeds else [("committed", committed_data(args.data))])
    runs = []
    for data_name, data_dir in datasets:
        for seed in args.seeds:
            runs.append(run_one(args, data_name, data_dir, seed))
            print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)
    print(format_summary(summary, len(runs)))
    print(json.dumps({"protocol": args.protocol, "overrides": args.overrides,
                      "datasets": [name for name, _ in datasets], "seeds": args.seeds,
                      "exclude_seen": sorted({run["exclude_seen"] for run in runs}),
                      "test_sequences": mean(run["test_sequences"] for run in runs),
                      **summary, "runs": runs}))


if __name__ == "__main__":
    main()
