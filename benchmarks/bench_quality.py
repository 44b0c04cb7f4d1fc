"""Demo-data quality: the model against the ids-only model and both baselines, same split.

    python benchmarks/bench_quality.py [--protocol playlist|leave_one_out] [--threads 2]
                                       [--seed 42] [--set section.key=value ...] [--no-ids-only]

Builds build/demo with preprocessing.py when it is missing, trains the demo preset with side
features and without (early stopping on validation), evaluates both on the test split and
prints one JSON object as the last line. The seed sets the split, the masking and the init;
exclusion of already-seen songs follows the preset (train.exclude_seen) for every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoint import load_model  # noqa: E402
from config import load_config  # noqa: E402
from dataset import load_data, split_for  # noqa: E402
from evaluation import evaluate_split  # noqa: E402
from train import train  # noqa: E402

KEYS = ("ndcg@10", "hr@10", "mrr")


def evaluate_run(run_dir: Path, data_dir: Path) -> dict:
    """Test metrics of a run's best checkpoint, with both baselines on the same split."""
    encoders, sequences = load_data(data_dir)
    loaded = load_model(run_dir / "best.pt", encoders, where=data_dir / "encoders")
    split = split_for(loaded.config, sequences)
    return evaluate_split(loaded.model, split, loaded.config, torch.device("cpu"), "test")


def main() -> None:
    """Train both variants, evaluate, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=("playlist", "leave_one_out"), default="playlist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "build" / "demo")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "bench_quality")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-ids-only", action="store_true",
                        help="train only the model with side features (e.g. to compare losses)")
    args = parser.parse_args()
    if not (args.data / "training.npz").is_file():
        subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--source", "csv",
                        "--data", str(REPO_ROOT / "demo data"), "--encoders",
                        str(REPO_ROOT / "preprocessing encoders"), "--out", str(args.data)],
                       check=True)
    results = {}
    variants = [("model", []), ("ids_only", ["model.side_features=false"])]
    for name, extra in variants[: 1 if args.no_ids_only else 2]:
        tag = "_".join(item.replace("=", "-") for item in args.overrides)
        run_dir = args.runs / f"{args.protocol}_{args.seed}_{name}{'_' + tag if tag else ''}"
        config = load_config("demo", overrides=[
            *args.overrides, *extra, f"data.split_protocol={args.protocol}",
            f"paths.data_dir={args.data}", f"paths.run_dir={run_dir}",
            f"train.threads={args.threads}", f"train.seed={args.seed}"])
        summary = train(config, progress=False)
        evaluation = evaluate_run(run_dir, args.data)
        results[name] = {key: evaluation["model"][key] for key in KEYS}
        results[name]["best_epoch"] = summary["best_epoch"]
        results[name]["train_seconds"] = summary["seconds"]
        for baseline in ("most_popular", "transition"):
            results[baseline] = {key: evaluation[baseline][key] for key in KEYS}
        results["test_sequences"] = evaluation["sequences"]
        results["exclude_seen"] = evaluation["exclude_seen"]
    results["protocol"] = args.protocol
    results["seed"] = args.seed
    better = max(results["most_popular"]["ndcg@10"], results["transition"]["ndcg@10"])
    results["model_over_best_baseline"] = results["model"]["ndcg@10"] / max(better, 1e-12)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
