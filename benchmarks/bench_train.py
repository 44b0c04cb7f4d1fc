"""Training speed and peak memory at full sizes on random valid batches, ours vs the original.

    python benchmarks/bench_train.py --preset full --batch-size 256 --threads 1
    python benchmarks/bench_train.py --loss sampled --alternate 3 --threads 2   # full vs sampled
    python benchmarks/bench_train.py --loss sampled --songs 2262292 --training-only

Each measurement runs in its own process so that its peak RSS is its own. The original design's
step is reimplemented for comparison in the same run: the same encoder with the original's
separate d_model x songs output layer, logits at all positions, softmax over the whole
vocabulary, then log, then the loss at the masked positions, and plain (unfused) Adam. Also
measures the data pipeline (batches built from CSR arrays) and validation (full-catalog
ranking) in samples per second. ``--loss sampled`` trains with the sampled softmax
(``--negatives``, ``--alpha``); ``--alternate N`` instead runs N rounds of full then sampled
training in fresh processes and reports both and their ratio (the same machine load for both);
``--training-only`` measures the chosen loss's training alone. Prints one JSON object as the
last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_config
from dataset import EvalSet, Playlists, TrainBatches
from evaluation import evaluate_scores, keep_freed_memory, model_scorer
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, PAD_INDEX
from sampled_softmax import NegativeSampler
from train import make_optimizer

# untimed first steps: the allocator's heap and the page tables grow during the first few
WARMUP = 5


def random_playlists(args: argparse.Namespace, count: int, seed: int = 0) -> Playlists:
    """Random playlists of 5..80 songs over the whole vocabulary."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 81, count)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    songs = rng.integers(FIRST_SONG_INDEX, args.songs + FIRST_SONG_INDEX, offsets[-1])
    return Playlists(np.arange(count, dtype=np.int64), offsets, songs.astype(np.int64))


def build(args: argparse.Namespace, original: bool = False) -> tuple[BERT4Rec, object]:
    """The preset's model at the requested vocabulary sizes, with random side tables, under
    the cloze objective that the batches below and the original design train.

    ``original``: with the original design's separate output layer instead of the tied head.
    """
    overrides = [f"data.seq_len={args.seq_len}", "model.objective=cloze"]
    overrides += ["model.tie_head=false"] if original else []
    config = load_config(args.preset, overrides=overrides)
    tokens = args.songs + FIRST_SONG_INDEX
    model = BERT4Rec(config.model, tokens, args.albums + 1, args.artists + 1, args.features,
                     args.seq_len)
    model.set_side_tables(torch.randint(1, args.albums + 1, (tokens,)),
                          torch.randint(1, args.artists + 1, (tokens,)),
                          torch.randn(tokens, args.features))
    return model, config


def original_loss(model: BERT4Rec, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original design's loss: softmax over all songs at every position, then log."""
    probabilities = torch.softmax(model.logits(model.encode(inputs)), dim=-1)
    masked = labels != PAD_INDEX
    return torch.nn.functional.nll_loss(torch.log(probabilities[masked]), labels[masked])


def measure_training(args: argparse.Namespace, original: bool) -> dict[str, float]:
    """Samples per second of full training steps (forward, backward, AdamW) on one process.

    With the allocator setting train.py uses for that loss (kept heap for the full loss only).
    """
    if original or args.loss == "full":
        keep_freed_memory()
    model, config = build(args, original)
    model.train()
    optimizer = (torch.optim.Adam(model.parameters(), lr=config.train.lr) if original
                 else make_optimizer(model, config))
    playlists = random_playlists(args, args.batch_size * (args.steps + WARMUP))
    batches = TrainBatches(playlists, args.seq_len, config.data.cloze_probability,
                           args.batch_size, 0)
    batches.set_epoch(0)
    sampler = None
    if args.loss == "sampled":
        counts = torch.bincount(torch.from_numpy(playlists.songs), minlength=model.n_song_tokens)
        sampler = NegativeSampler(counts, args.negatives, args.alpha)
    seconds = 0.0
    for index in range(args.steps + WARMUP):
        inputs, labels = batches[index]
        started = time.perf_counter()
        loss = (original_loss(model, inputs, labels) if original
                else model.loss(inputs, labels, sampler))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if index >= WARMUP:
            seconds += time.perf_counter() - started
    return {"batch_size": args.batch_size, "loss": "full" if original else args.loss,
            "samples_per_s": args.batch_size * args.steps / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_pipeline(args: argparse.Namespace) -> float:
    """Samples per second of building cloze-masked training batches."""
    config = load_config(args.preset)
    playlists = random_playlists(args, 200_000, seed=1)
    batches = TrainBatches(playlists, args.seq_len, config.data.cloze_probability,
                           args.batch_size, 0)
    batches.set_epoch(0)
    started = time.perf_counter()
    samples = sum(len(batches[index][0]) for index in range(len(batches)))
    return samples / (time.perf_counter() - started)


def measure_validation(args: argparse.Namespace) -> float:
    """Samples per second of full-catalog evaluation (ranks and all six metrics).

    With the allocator setting that training and ``train.py --evaluate`` use: each batch's
    60 MB score matrix is then reused instead of page-faulted in anew.
    """
    keep_freed_memory()
    model, config = build(args)
    model.eval()
    playlists = random_playlists(args, 2048, seed=2)
    eval_set = EvalSet(playlists, np.random.default_rng(3).integers(
        FIRST_SONG_INDEX, args.songs + FIRST_SONG_INDEX, len(playlists)))
    score = model_scorer(model, args.seq_len, torch.device("cpu"))
    evaluate_scores(score, eval_set, config.train.eval_batch_size)
    started = time.perf_counter()
    evaluate_scores(score, eval_set, config.train.eval_batch_size)
    return len(eval_set) / (time.perf_counter() - started)


def run_worker(
    args: argparse.Namespace, mode: str, batch_size: int, loss: str | None = None
) -> dict[str, float]:
    """Run one measurement in a fresh process (with ``loss``, default --loss); its JSON."""
    command = [sys.executable, __file__, "--worker", mode, "--batch-size", str(batch_size),
               "--loss", loss or args.loss]
    for name in ("preset", "threads", "songs", "albums", "artists", "features", "seq_len",
                 "steps", "negatives", "alpha"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def alternate(args: argparse.Namespace) -> dict[str, object]:
    """Full and sampled training in alternating fresh processes; medians and their ratio."""
    runs: dict[str, list[dict[str, float]]] = {"full": [], "sampled": []}
    for _ in range(args.alternate):
        for loss in ("full", "sampled"):
            runs[loss].append(run_worker(args, "ours", args.batch_size, loss))
    median = {loss: float(np.median([run["samples_per_s"] for run in measured]))
              for loss, measured in runs.items()}
    return {"preset": args.preset, "threads": args.threads, "batch_size": args.batch_size,
            "songs": args.songs, "negatives": args.negatives, "alpha": args.alpha,
            "loss": args.loss, "samples_per_s": median[args.loss],
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[args.loss]),
            "full_samples_per_s": median["full"], "sampled_samples_per_s": median["sampled"],
            "sampled_over_full": median["sampled"] / median["full"], "rounds": runs}


def main() -> None:
    """Parse flags, run every measurement, print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--batch-size", type=int, default=64, help="the batch size to report")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--songs", type=int, default=116_293)
    parser.add_argument("--albums", type=int, default=22_152)
    parser.add_argument("--artists", type=int, default=12_561)
    parser.add_argument("--features", type=int, default=21)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--loss", choices=("full", "sampled"), default="full")
    parser.add_argument("--negatives", type=int, default=2048, help="sampled loss: negatives")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="sampled loss: negatives drawn from (count + 1)^alpha")
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="compare full and sampled training, ROUNDS times each, alternating")
    parser.add_argument("--training-only", action="store_true",
                        help="measure only the training of --loss (no original, pipeline...)")
    parser.add_argument("--worker", choices=("ours", "original", "pipeline", "validation"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "ours":
        print(json.dumps(measure_training(args, original=False)))
        return
    if args.worker == "original":
        print(json.dumps(measure_training(args, original=True)))
        return
    if args.worker == "pipeline":
        print(json.dumps({"samples_per_s": measure_pipeline(args)}))
        return
    if args.worker == "validation":
        print(json.dumps({"samples_per_s": measure_validation(args)}))
        return
    if args.alternate:
        print(json.dumps(alternate(args)))
        return
    ours = run_worker(args, "ours", args.batch_size)
    if args.training_only:
        print(json.dumps({"preset": args.preset, "threads": args.threads, "songs": args.songs,
                          **ours}))
        return
    ours_16 = ours if args.batch_size == 16 else run_worker(args, "ours", 16)
    original_16 = run_worker(args, "original", 16)
    result = {
        "preset": args.preset, "threads": args.threads, "batch_size": args.batch_size,
        "loss": args.loss, "samples_per_s": ours["samples_per_s"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "batch16": ours_16, "original_batch16": original_16,
        "speedup_vs_original_batch16": ours_16["samples_per_s"] / original_16["samples_per_s"],
        "pipeline_samples_per_s": run_worker(args, "pipeline", args.batch_size)["samples_per_s"],
        "validation_samples_per_s": run_worker(args, "validation", 16)["samples_per_s"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
