"""Training of Bert4MusicRec: optimizer, the training loop and the command line.

    python train.py --preset demo|full --data DIR [--run-dir DIR] [--config FILE]
                    [--set section.key=value ...] [--resume] [--seed N] [--threads N]
    python train.py --evaluate CHECKPOINT --data DIR [--split test|validation] [--exclude-seen]
    python train.py --recommend CHECKPOINT --sequence CSV --catalog DIR [--k 10] [--index auto]

Metrics and baselines live in evaluation.py, checkpoints in checkpoint.py and serving in
recommender.py; this module only trains, and runs the other two jobs for its command line.
Checkpoints hold tensors and plain Python values only, so they load with
``torch.load(weights_only=True)``; they carry the encoders, so serving needs only the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    build_model,
    check_shapes,
    encoders_to_tensors,
    first_non_finite,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from config import (
    Config,
    ConfigError,
    add_config_arguments,
    config_from_args,
)
from dataset import Split, TrainBatches, load_data, resolve_exclude_seen, split_for
from distributed import (
    NoWriter,
    World,
    from_main,
    global_mean_factor,
    join_world,
    leave_world,
    mean_over_ranks,
    rank_seed,
    wrap_model,
)
from evaluation import autocast, evaluate_model, format_table, keep_freed_memory
from model import BERT4Rec
from preprocessing_utils import DataError, Encoders
from recommender import NonFiniteScores, Recommender
from sample import print_recommendations, read_sequence_csv, run_evaluate, with_catalog
from sampled_softmax import NegativeSampler, choose_loss
from schedule import Schedule

# ----------------------------------------------------------------------------- building blocks


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: training stops and saves nothing."""


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def make_optimizer(model: BERT4Rec, config: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on the transformer's and head's matrices only.

    Fused: one pass over the 9M parameters, three times faster than foreach on the CPU.
    Biases, norms, the position table and the embeddings are not decayed: a rare song's
    embedding row would shrink at every step but be updated only when the song appears.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        matrix = parameter.dim() >= 2 and "position" not in name and "embedding" not in name
        (decay if matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, fused=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Add one JSON record as a line of ``path``."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- training steps


@dataclass
class Run:
    """What one training call works with: data, network, optimizer and progress so far.

    ``state`` is the progress (epoch, step, best validation NDCG@10, seconds spent, why it
    stopped, run name) that a checkpoint stores and a resumed call continues from.
    ``network`` is what a training step calls: the model itself, or its DistributedDataParallel
    wrapper under torchrun; ``sampler`` draws the negatives of the sampled loss (None: full
    softmax).
    """

    config: Config
    device: torch.device
    run_dir: Path
    encoders: Encoders
    split: Split
    popularity: torch.Tensor
    model: BERT4Rec
    batches: TrainBatches
    optimizer: torch.optim.AdamW
    schedule: Schedule
    state: dict[str, Any]
    world: World
    network: nn.Module
    sampler: NegativeSampler | None

    @property
    def metrics_path(self) -> Path:
        """The run's metrics.jsonl (step and epoch records)."""
        return self.run_dir / "metrics.jsonl"

    @property
    def done(self) -> bool:
        """True once early stopping or the time limit fired, or every epoch ran."""
        return bool(self.state["stopped"]) or self.state["epoch"] >= self.config.train.epochs

    @property
    def out_of_time(self) -> bool:
        """True once training and validation (over resumed calls too) used train.max_minutes."""
        limit = self.config.train.max_minutes
        return limit > 0 and self.state["seconds"] >= 60 * limit


@dataclass
class EpochStats:
    """What one epoch of optimisation measured, for its epoch record."""

    loss: float
    samples: int
    train_seconds: float
    started: float


def prepare_run(config: Config) -> Run:
    """Data, split, a freshly seeded model, batches, optimizer and schedule for ``config``.

    ``train.loss = auto`` becomes the loss chosen for the catalog (the run's config, and so
    its checkpoints, record which). The heap keeps freed memory for the full loss's large
    per-step buffers only: with the sampled loss the largest are embedding gradients (580 MB
    at 2.26M songs) that fragment a kept heap (peak RSS 3.2 GB without, 3.7 to 4.8 GB with,
    BENCHMARKS.md).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    world, device = join_world(pick_device(config.train.device))
    run_dir = Path(config.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    encoders, sequences = load_data(config.paths.data_dir)
    loss = choose_loss(config.train.loss, encoders.n_songs, config.train.negatives)
    config = replace(config, train=replace(config.train, loss=loss))
    if loss == "full":
        keep_freed_memory()
    config = resolve_exclude_seen(config, sequences)
    split = split_for(config, sequences)
    torch.manual_seed(config.train.seed)
    model = build_model(config, encoders).to(device)
    batches = TrainBatches(split.train, config.data.seq_len, config.data.cloze_probability,
                           config.train.batch_size, config.train.seed, (world.rank, world.size),
                           causal=config.model.objective == "causal")
    optimizer = make_optimizer(model, config)
    schedule = Schedule(optimizer, config.train, len(batches))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_ndcg": -1.0, "best_epoch": -1,
                             "seconds": 0.0, "stopped": False, "stop_reason": "",
                             "run_name": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")}
    popularity = torch.from_numpy(split.popularity(encoders.n_song_tokens))
    sampler = None
    if config.train.loss == "sampled":
        sampler = NegativeSampler(popularity, config.train.negatives,
                                  config.train.sampling_alpha).to(device)
    return Run(config, device, run_dir, encoders, split, popularity, model, batches, optimizer,
               schedule, state, world, model, sampler)


def resume_run(run: Run) -> None:
    """Continue from RUN_DIR/last.pt if there is one: weights, optimizer, RNG and progress.

    Records that metrics.jsonl holds past the checkpoint's step (a run killed mid-epoch) go.
    """
    path = run.run_dir / "last.pt"
    if not path.is_file():
        return
    checkpoint = load_checkpoint(path)
    verify_checkpoint(checkpoint, path, run.encoders, Path(run.config.paths.data_dir) / "encoders")
    check_shapes(checkpoint["model"], run.model.state_dict(), path)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.schedule.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if run.device.type == "cuda" and checkpoint["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    run.state.update(checkpoint["progress"])
    if run.world.is_main and run.metrics_path.is_file():
        lines = run.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= run.state["step"]]
        run.metrics_path.write_text("".join(kept), encoding="utf-8")


def start_fresh_if_new(run: Run) -> None:
    """Before a run's first step: output bias from popularity, and no logs of an older run."""
    if run.state["step"] != 0:
        return
    run.model.init_head_bias(run.popularity)
    if not run.world.is_main:
        return
    run.metrics_path.unlink(missing_ok=True)
    for events in run.run_dir.glob("events.out.tfevents.*"):
        events.unlink()


def train_step(run: Run, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """One optimisation step on a batch; returns its loss, TrainingDiverged if it is not finite.

    The loss is read after the step (as before, one device sync per step); the weights it
    touched are never saved, since the error ends the run before the next checkpoint. Under
    torchrun the loss is scaled so that the averaged gradient is that of the global batch's
    mean, and the value returned is that global mean.
    """
    inputs, labels = inputs.to(run.device), labels.to(run.device)
    with autocast(run.device):
        loss = run.network(inputs, labels, run.sampler)
    if run.world.distributed:
        loss = loss * global_mean_factor(run.world, (labels != 0).sum())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.train.grad_clip)
    run.optimizer.step()
    run.schedule.step()
    run.state["step"] += 1
    value = float(mean_over_ranks(run.world, loss).item())
    if not math.isfinite(value):
        diverged(run, f"the loss is {value}")
    return value


def diverged(run: Run, what: str) -> NoReturn:
    """Record the divergence in metrics.jsonl and raise TrainingDiverged naming epoch and step."""
    epoch, step = run.state["epoch"] + 1, run.state["step"]
    if run.world.is_main:
        append_jsonl(run.metrics_path, {"type": "diverged", "epoch": epoch, "step": step,
                                        "reason": what})
    raise TrainingDiverged(
        f"training diverged in epoch {epoch} at step {step}: {what}; stopped, and no checkpoint "
        f"was written from these weights (lower train.lr)"
    )


def log_steps(run: Run, writer: Any, loss: float, samples: int, seconds: float) -> dict[str, Any]:
    """Record the mean loss, learning rate and speed of the last ``log_every`` steps."""
    step = run.state["step"]
    record = {"type": "step", "epoch": run.state["epoch"] + 1, "step": step,
              "loss": loss / samples, "lr": run.schedule.lr,
              "samples_per_s": samples / max(seconds, 1e-9)}
    if run.world.is_main:
        append_jsonl(run.metrics_path, record)
    writer.add_scalar("train/loss", record["loss"], step)
    writer.add_scalar("train/lr", record["lr"], step)
    writer.add_scalar("train/samples_per_s", record["samples_per_s"], step)
    return record


def train_epoch(
    run: Run, loader: torch.utils.data.DataLoader, writer: Any, progress: bool
) -> EpochStats:
    """One pass over the training batches of the current epoch, logging every few steps;
    ``train.max_minutes`` running out ends it early (under torchrun: at the epoch's end, since
    every rank must take the same steps).

    The progress bar shows only on a terminal: in a log file, CI or a notebook its
    carriage-return updates would be hundreds of lines, and the epoch line says enough.
    """
    epoch = run.state["epoch"]
    run.batches.set_epoch(epoch)
    if run.world.distributed:
        torch.manual_seed(rank_seed(run.config.train.seed, epoch, run.world))
    run.model.train()
    epoch_loss, epoch_samples, epoch_started = 0.0, 0, time.perf_counter()
    window_loss, window_samples, window_started = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{run.config.train.epochs}", unit="batch",
               disable=not progress or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
    step_started = time.perf_counter()
    for inputs, labels in bar:
        value, size = train_step(run, inputs, labels), len(inputs) * run.world.size
        epoch_loss += value * size
        epoch_samples += size
        window_loss += value * size
        window_samples += size
        if run.state["step"] % run.config.train.log_every == 0:
            record = log_steps(run, writer, window_loss, window_samples,
                               time.perf_counter() - window_started)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            samples_s=f"{record['samples_per_s']:.0f}")
            window_loss, window_samples, window_started = 0.0, 0, time.perf_counter()
        run.state["seconds"] += time.perf_counter() - step_started
        step_started = time.perf_counter()
        if run.out_of_time and not run.world.distributed:
            break
    return EpochStats(epoch_loss, epoch_samples, time.perf_counter() - epoch_started,
                      epoch_started)


def checkpoint_state(run: Run, validation: dict[str, float]) -> dict[str, Any]:
    """Everything a checkpoint holds: weights, optimizer, RNG, progress, config and encoders."""
    device, config, state = run.device, run.config, run.state
    return {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
        "progress": dict(state),
        "config": config.to_dict(),
        "encoders": encoders_to_tensors(run.encoders),
        "encoders_fingerprint": run.encoders.fingerprint,
        "popularity": run.popularity,
        "model_version": f"bert4rec-{config.preset}-{state['run_name']}-epoch{state['epoch']}",
        "validation": validation,
    }


def validate_and_checkpoint(run: Run, stats: EpochStats, writer: Any, progress: bool) -> None:
    """Validate the epoch's model, let the schedule decide, log the epoch, write the checkpoints.

    last.pt every epoch; best.pt when validation NDCG@10 improved. Weights with a NaN or an
    infinity raise TrainingDiverged first: they are neither validated nor saved. Under
    torchrun rank 0 alone validates and writes; the others take its progress and schedule.
    """
    bad = first_non_finite(run.model.state_dict())
    if bad is not None:
        diverged(run, f"weight {bad} is not finite")
    if not run.world.is_main:
        state, schedule = from_main(run.world, None)
        run.state.update(state)
        run.schedule.load_state_dict(schedule)
        return
    validation_started = time.perf_counter()
    validation = evaluate_model(run.model, run.split.validation, run.config, run.device)
    state = run.state
    state["seconds"] += time.perf_counter() - validation_started
    epoch = state["epoch"] = state["epoch"] + 1
    improved = validation["ndcg@10"] > state["best_ndcg"]
    if improved:
        state.update(best_ndcg=validation["ndcg@10"], best_epoch=epoch)
    if run.schedule.validated(improved):
        state.update(stopped=True, stop_reason="validation NDCG@10 stopped improving")
    elif run.out_of_time:
        state.update(stopped=True, stop_reason="train.max_minutes")
    elif epoch >= run.config.train.epochs:
        state["stop_reason"] = "train.epochs"
    record = {"type": "epoch", "epoch": epoch, "step": state["step"],
              "train_loss": stats.loss / max(stats.samples, 1),
              "samples_per_s": stats.samples / max(stats.train_seconds, 1e-9),
              "seconds": time.perf_counter() - stats.started, "lr": run.schedule.lr,
              **{f"val_{name}": value for name, value in validation.items()}}
    append_jsonl(run.metrics_path, record)
    for name, value in validation.items():
        writer.add_scalar(f"validation/{name}", value, epoch)
    writer.add_scalar("train/epoch_loss", record["train_loss"], epoch)
    writer.flush()
    if progress:
        tqdm.write(f"epoch {epoch}: loss {record['train_loss']:.4f}  "
                   f"val ndcg@10 {validation['ndcg@10']:.4f}  hr@10 {validation['hr@10']:.4f}"
                   f"  {record['samples_per_s']:.0f} samples/s"
                   f"{'  (best)' if improved else ''}")
        sys.stdout.flush()
    checkpoint = checkpoint_state(run, validation)
    save_checkpoint(run.run_dir / "last.pt", checkpoint)
    if improved:
        save_checkpoint(run.run_dir / "best.pt", checkpoint)
    from_main(run.world, (dict(state), run.schedule.state_dict()))


def train(
    config: Config, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train with early stopping on validation NDCG@10; returns a summary of the run.

    Writes last.pt every epoch, best.pt when validation NDCG@10 improves, metrics.jsonl and
    TensorBoard events into ``config.paths.run_dir``. ``stop_after`` ends this call after that
    many epochs, as an interruption would (a later ``resume=True`` call continues exactly).
    Under torchrun every process calls this; rank 0 alone writes.
    """
    from torch.utils.tensorboard import SummaryWriter

    run = prepare_run(config)
    if resume:
        resume_run(run)
    start_fresh_if_new(run)
    run.network = wrap_model(run.model, run.world, run.device)
    loader = torch.utils.data.DataLoader(run.batches, batch_size=None, shuffle=False,
                                         num_workers=config.train.num_workers)
    progress = progress and run.world.is_main
    writer = SummaryWriter(log_dir=str(run.run_dir)) if run.world.is_main else NoWriter()
    started, epochs_this_call, finished = time.perf_counter(), 0, False
    try:
        while not run.done and (stop_after is None or epochs_this_call < stop_after):
            stats = train_epoch(run, loader, writer, progress)
            validate_and_checkpoint(run, stats, writer, progress)
            epochs_this_call += 1
        finished = True
    finally:
        writer.close()
        leave_world(run.world, finished)
    state = run.state
    return {"epochs": state["epoch"], "steps": state["step"], "best_epoch": state["best_epoch"],
            "best_val_ndcg@10": state["best_ndcg"], "stopped_early": state["stopped"],
            "stop_reason": state["stop_reason"],
            "seconds": time.perf_counter() - started, "run_dir": str(run.run_dir)}


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of train.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--data", type=Path, help="folder written by preprocessing.py")
    parser.add_argument("--run-dir", type=Path, help="where checkpoints and logs go")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--seed", type=int, help="seed of the split, masking and init")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (0: default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--evaluate", type=Path, metavar="CHECKPOINT",
                        help="evaluate a checkpoint and the baselines on --data")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                        help="drop songs already in the playlist from the ranking (default: "
                             "the checkpoint's train.exclude_seen, decided from its data)")
    parser.add_argument("--recommend", type=Path, metavar="CHECKPOINT",
                        help="print the next songs of --sequence")
    parser.add_argument("--sequence", type=Path, help="CSV with columns pos,song_id")
    parser.add_argument("--catalog", type=Path, help="folder with songs/albums/artists CSVs")
    parser.add_argument("--k", type=int, default=10, help="how many songs to recommend")
    parser.add_argument("--index", choices=("exact", "approximate", "auto"), default="auto",
                        help="--recommend's retrieval: score every song, a faiss shortlist "
                             "re-scored exactly, or by catalog size (default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, 2 for a bad config, data or checkpoint, 1 when
    training diverged or a model's scores are not finite."""
    args = parse_args(argv)
    try:
        if args.recommend is not None:
            if args.sequence is None:
                raise ConfigError("--recommend needs --sequence CSV")
            if args.threads:
                torch.set_num_threads(args.threads)
            sequence = read_sequence_csv(args.sequence)
            recommender = with_catalog(
                Recommender.from_checkpoint(args.recommend, index=args.index), args.catalog)
            result = recommender.recommend([sequence], k=args.k,
                                           exclude_seen=args.exclude_seen)[0]
            print(f"model {recommender.model_version}")
            print_recommendations(sequence, result, args.catalog)
            return 0
        if args.data is None:
            raise ConfigError("--data DIR is required (the folder written by preprocessing.py)")
        if args.evaluate is not None:
            results = run_evaluate(args.evaluate, args.data, args.split, args.exclude_seen,
                                   args.threads or 0)
            print(f"{results['split']} split, protocol {results['protocol']}, "
                  f"{results['sequences']} sequences, full-catalog ranking")
            print(format_table({name: results[name]
                                for name in ("model", "most_popular", "transition")}))
            print(json.dumps(results))
            return 0
        overrides = [*list(args.overrides), f"paths.data_dir={args.data}"]
        if args.run_dir is not None:
            overrides.append(f"paths.run_dir={args.run_dir}")
        if args.seed is not None:
            overrides.append(f"train.seed={args.seed}")
        if args.threads is not None:
            overrides.append(f"train.threads={args.threads}")
        args.overrides = overrides
        config = config_from_args(args)
        summary = train(config, resume=args.resume, progress=not args.quiet)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))
        return 0
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, NonFiniteScores) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank ends without C++ teardown: gloo's threads, destroyed at interpreter
        # exit, aborted a rank in about one run of three ("terminate called without an active
        # exception"), failing a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
