"""Metrics from ranks, full-catalog evaluation and the two baselines, against hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import make_encoders, tiny_config, write_data

from checkpoint import build_model
from dataset import EvalSet, Playlists, split_sequences
from evaluation import (
    METRIC_NAMES,
    MostPopular,
    Transition,
    average_metrics,
    evaluate_scores,
    evaluate_split,
    metric_sums,
    target_ranks,
)
from preprocessing_utils import load_training_file


def playlists(*sequences: list[int]) -> Playlists:
    """CSR playlists from lists of song tokens."""
    lengths = [len(sequence) for sequence in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    songs = np.asarray([song for sequence in sequences for song in sequence], dtype=np.int64)
    return Playlists(np.arange(len(sequences), dtype=np.int64), offsets, songs)


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """The metrics of 0-based ranks averaged per sequence, through the public functions."""
    return average_metrics(metric_sums(ranks), len(ranks))


def test_target_ranks_count_strictly_higher_scores() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 2.0]])
    ranks = target_ranks(scores, torch.tensor([2, 0, 3]))
    assert ranks.tolist() == [1, 0, 0]


def test_metrics_against_hand_computed_values() -> None:
    metrics = rank_metrics(torch.tensor([0, 4, 9, 20]))
    assert metrics["hr@1"] == pytest.approx(0.25)
    assert metrics["hr@5"] == pytest.approx(0.5)
    assert metrics["hr@10"] == pytest.approx(0.75)
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 5 + 1 / 10 + 1 / 21) / 4)
    assert tuple(metrics) == METRIC_NAMES
    assert average_metrics(metric_sums(torch.zeros(0)), 0) == dict.fromkeys(METRIC_NAMES, 0.0)


def test_evaluation_averages_per_sequence_and_never_ranks_specials() -> None:
    eval_set = EvalSet(playlists([2], [3, 4], [5]), np.array([4, 2, 6]))
    table = torch.tensor([0, 0, 0.9, 0.8, 0.7, 0.6, 0.5], dtype=torch.float64)
    table[:2] = 100.0

    def score(_: EvalSet, rows: np.ndarray) -> torch.Tensor:
        return table.expand(len(rows), -1).clone()

    expected = rank_metrics(torch.tensor([2, 0, 4]))
    for batch_size in (1, 2, 3):
        assert evaluate_scores(score, eval_set, batch_size) == pytest.approx(expected)
    seen = rank_metrics(torch.tensor([1, 0, 3]))
    assert evaluate_scores(score, eval_set, 2, exclude_seen=True) == pytest.approx(seen)


def test_most_popular_ranks_by_training_counts() -> None:
    popularity = np.array([0, 0, 5, 1, 3, 0], dtype=np.int64)
    scores = MostPopular(popularity)(EvalSet(playlists([2]), np.array([3])), np.array([0]))
    assert scores[0].argsort(descending=True)[:3].tolist() == [2, 4, 3]


def test_transition_uses_counts_from_the_last_song_then_popularity() -> None:
    train = playlists([2, 3, 4], [2, 3], [2, 5], [4, 2], [3])
    popularity = np.bincount(train.songs, minlength=7)
    transition = Transition(train, popularity)
    eval_set = EvalSet(playlists([4, 2], [6]), np.array([3, 2]))
    scores = transition(eval_set, np.array([0, 1]))
    assert scores[0].argsort(descending=True)[:4].tolist() == [3, 5, 2, 4]
    assert scores[1].argsort(descending=True)[:3].tolist() == [2, 3, 4]
    ranks = target_ranks(scores, torch.tensor([3, 2]))
    assert ranks.tolist() == [0, 0]


def test_ties_count_against_the_target_and_non_finite_scores_rank_last() -> None:
    """DESIGN's evaluation contract; before issue 15 ties and NaN both favoured the target."""
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [0.5, 0.5, 0.5, 0.1],   # target 0 ties two others: rank 2
        [nan, nan, nan, nan],   # a NaN target: not ranked (worse than any rank)
        [0.3, inf, 0.2, 0.1],   # an infinite target: not ranked
        [nan, 0.2, inf, 0.1],   # NaN and +inf songs are not above a finite target
        [0.3, -inf, 0.2, -inf],  # an excluded (-inf) target is not ranked either
    ])
    ranks = target_ranks(scores, torch.tensor([0, 2, 1, 3, 1]))
    assert ranks.tolist() == [2, inf, inf, 1, inf]
    assert rank_metrics(ranks[1:3]) == dict.fromkeys(METRIC_NAMES, 0.0)


def test_a_nan_scorer_evaluates_to_zero_not_one() -> None:
    """Issue 15 F1: a NaN model's every metric used to be 1.0 (``scores > target`` never true)."""
    eval_set = EvalSet(playlists([2], [3, 4], [5]), np.array([4, 2, 6]))

    def nan_scores(_: EvalSet, rows: np.ndarray) -> torch.Tensor:
        return torch.full((len(rows), 7), float("nan"))

    for exclude_seen in (False, True):
        assert evaluate_scores(nan_scores, eval_set, 2, exclude_seen) == dict.fromkeys(
            METRIC_NAMES, 0.0)


def test_a_nan_model_evaluates_to_zero_beside_working_baselines(tmp_path: Path) -> None:
    """The model scorer goes through the same ranking as MostPopular and Transition."""
    data_dir = write_data(tmp_path / "data", make_encoders())
    config = tiny_config(data_dir, tmp_path / "run")
    encoders = make_encoders()
    model = build_model(config, encoders)
    with torch.no_grad():
        model.output_bias.fill_(float("nan"))
    sequences = load_training_file(data_dir, encoders.n_song_tokens)
    split = split_sequences(sequences, "playlist", 0.8, 0)
    results = evaluate_split(model, split, config, torch.device("cpu"))
    assert results["model"] == dict.fromkeys(METRIC_NAMES, 0.0)
    for baseline in ("most_popular", "transition"):
        assert results[baseline]["hr@10"] > 0
