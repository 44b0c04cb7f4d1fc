"""Full-catalog rank metrics, the MostPopular and Transition baselines, evaluating a split.

Every song of the catalog is ranked for every evaluated sequence (no sampled negatives); a
target's rank is the number of other songs scoring at least as high, so ties count against it.
A NaN or infinite score ranks last: such a target is not ranked at all (every metric counts it
as 0), and such another song is never above the target. Metrics are computed per sequence,
then averaged.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from config import Config, decide_exclude_seen
from dataset import EvalSet, Playlists, Split, eval_tokens
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX

METRIC_NAMES = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
# scores (len(rows), n_song_tokens) of the sequences ``rows`` of an evaluation set
ScoreFunction = Callable[[EvalSet, np.ndarray], torch.Tensor]


# ----------------------------------------------------------------------------- metrics


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target, (B,) float64: how many other songs score at least as high.

    Only finite scores count as above the target. A target whose own score is NaN or infinite
    (or -inf: excluded) is not ranked at all: rank +inf, which every metric counts as 0, so a
    diverged model evaluates to 0, not to 1.
    """
    target_scores = scores.gather(1, targets[:, None])
    at_least = ((scores >= target_scores) & (scores < float("inf"))).sum(dim=1) - 1
    return torch.where(torch.isfinite(target_scores[:, 0]), at_least.double(), float("inf"))


def metric_sums(ranks: torch.Tensor) -> dict[str, float]:
    """Per-sequence HR@1/5/10, NDCG@5/10 and MRR from 0-based ranks, summed over the batch.

    A rank of +inf (a target not ranked) adds 0 to each of them.
    """
    ranks = ranks.double()
    gain = 1.0 / torch.log2(ranks + 2.0)
    return {
        "hr@1": float((ranks < 1).sum()),
        "hr@5": float((ranks < 5).sum()),
        "hr@10": float((ranks < 10).sum()),
        "ndcg@5": float(torch.where(ranks < 5, gain, 0.0).sum()),
        "ndcg@10": float(torch.where(ranks < 10, gain, 0.0).sum()),
        "mrr": float((1.0 / (ranks + 1.0)).sum()),
    }


def average_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """Summed metrics divided by the number of sequences (0 for none), in METRIC_NAMES order."""
    return {name: sums[name] / max(count, 1) for name in METRIC_NAMES}


def flat_songs(playlists: Playlists, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(batch row, song) pairs for every song of the selected sequences."""
    lengths = playlists.lengths[rows]
    batch_rows = np.repeat(np.arange(len(rows)), lengths)
    starts = np.repeat(playlists.offsets[rows], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return batch_rows, playlists.songs[starts + within]


def evaluate_scores(
    score: ScoreFunction, eval_set: EvalSet, batch_size: int = 512, exclude_seen: bool = False
) -> dict[str, float]:
    """Full-catalog metrics of a scorer, averaged over the sequences of ``eval_set``."""
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for start in range(0, len(eval_set), batch_size):
        rows = np.arange(start, min(start + batch_size, len(eval_set)))
        scores = score(eval_set, rows)
        scores[:, :FIRST_SONG_INDEX] = float("-inf")
        if exclude_seen:
            batch_rows, songs = flat_songs(eval_set.inputs, rows)
            scores[torch.from_numpy(batch_rows), torch.from_numpy(songs)] = float("-inf")
        targets = torch.from_numpy(eval_set.targets[rows]).to(scores.device)
        for name, value in metric_sums(target_ranks(scores, targets)).items():
            totals[name] += value
    return average_metrics(totals, len(eval_set))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table of metric rows, one row per label."""
    header = f"{'':<14}" + "".join(f"{name:>10}" for name in METRIC_NAMES)
    lines = [header]
    for label, metrics in rows.items():
        lines.append(f"{label:<14}" + "".join(f"{metrics[name]:>10.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- baselines


def tie_broken_popularity(popularity: np.ndarray) -> torch.Tensor:
    """Popularity scaled into [0, 1) with a fixed random tie-break (PAD/MASK lowest)."""
    jitter = np.random.default_rng(0).random(len(popularity)) * 0.5
    values = (popularity + jitter) / (popularity.max() + 1.0)
    values[:FIRST_SONG_INDEX] = -1.0
    return torch.from_numpy(values.astype(np.float64))


class MostPopular:
    """Scores every song by its count in the training part."""

    def __init__(self, popularity: np.ndarray) -> None:
        self.scores = tie_broken_popularity(popularity)

    def __call__(self, eval_set: EvalSet, rows: np.ndarray) -> torch.Tensor:
        """The same popularity scores for every sequence (B, n_song_tokens)."""
        return self.scores.expand(len(rows), -1).clone()


class Transition:
    """First-order Markov counts (previous song -> next song) with popularity back-off."""

    def __init__(self, train: Playlists, popularity: np.ndarray) -> None:
        n_tokens = len(popularity)
        follows_in_sequence = np.ones(len(train.songs), dtype=bool)
        follows_in_sequence[train.offsets[:-1]] = False
        after = np.flatnonzero(follows_in_sequence)
        pairs = train.songs[after - 1] * n_tokens + train.songs[after]
        unique_pairs, counts = np.unique(pairs, return_counts=True)
        previous = unique_pairs // n_tokens
        self.next_songs = unique_pairs % n_tokens
        self.counts = counts.astype(np.float64)
        self.row_offsets = np.searchsorted(previous, np.arange(n_tokens + 1))
        self.backoff = tie_broken_popularity(popularity)

    def __call__(self, eval_set: EvalSet, rows: np.ndarray) -> torch.Tensor:
        """Transition counts from each sequence's last song, ties broken by popularity."""
        inputs = eval_set.inputs
        last = inputs.songs[inputs.offsets[rows + 1] - 1]
        counts_per_row = self.row_offsets[last + 1] - self.row_offsets[last]
        batch_rows = np.repeat(np.arange(len(rows)), counts_per_row)
        starts = np.repeat(self.row_offsets[last], counts_per_row)
        within = np.arange(counts_per_row.sum()) - np.repeat(
            np.cumsum(counts_per_row) - counts_per_row, counts_per_row
        )
        entries = starts + within
        scores = self.backoff.expand(len(rows), -1).clone()
        scores[torch.from_numpy(batch_rows), torch.from_numpy(self.next_songs[entries])] += (
            torch.from_numpy(self.counts[entries])
        )
        return scores


# ----------------------------------------------------------------------------- the model


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on the CPU (shared by training and evaluation)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_scorer(model: BERT4Rec, seq_len: int, device: torch.device) -> ScoreFunction:
    """Scores of the model after each sequence's latest window ([MASK] appended under cloze)."""

    matrix = model.scoring_matrix()

    def score(eval_set: EvalSet, rows: np.ndarray) -> torch.Tensor:
        tokens = eval_tokens(eval_set, rows, seq_len, model.causal).to(device)
        with torch.no_grad(), autocast(device):
            return model.predict_last(tokens, matrix).float().cpu()

    return score


def evaluate_model(
    model: BERT4Rec, eval_set: EvalSet, config: Config, device: torch.device
) -> dict[str, float]:
    """Full-catalog metrics of the model on one evaluation set (model left in eval mode)."""
    model.eval()
    score = model_scorer(model, config.data.seq_len, device)
    return evaluate_scores(score, eval_set, config.train.eval_batch_size,
                           decide_exclude_seen(config.train.exclude_seen, None))


def evaluate_split(
    model: BERT4Rec, split: Split, config: Config, device: torch.device, which: str = "test",
    exclude_seen: bool | None = None,
) -> dict[str, Any]:
    """Model, MostPopular and Transition metrics on the same evaluation set of ``split``.

    ``exclude_seen`` (None: the config's decision, a checkpoint's resolved one) applies to all
    three alike.
    """
    eval_set = split.test if which == "test" else split.validation
    exclude = (decide_exclude_seen(config.train.exclude_seen, None) if exclude_seen is None
               else exclude_seen)
    popularity = split.popularity(model.n_song_tokens)
    batch = config.train.eval_batch_size
    model.eval()
    return {
        "split": which,
        "protocol": split.protocol,
        "sequences": len(eval_set),
        "exclude_seen": exclude,
        "model": evaluate_scores(model_scorer(model, config.data.seq_len, device), eval_set,
                                 batch, exclude),
        "most_popular": evaluate_scores(MostPopular(popularity), eval_set, batch, exclude),
        "transition": evaluate_scores(Transition(split.train, popularity), eval_set, batch,
                                      exclude),
    }


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory instead of unmapping it (large logits buffers).

    Each training step and evaluation batch allocates and frees buffers of tens to hundreds of
    MB; by default glibc hands them back to the kernel and the next one pays the page faults
    again (a third of a training step, 40% of an evaluation batch).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
