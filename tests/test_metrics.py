"""Metrics from ranks, full-catalog evaluation and the two baselines, against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataset import EvalSet, Playlists
from evaluation import (
    METRIC_NAMES,
    MostPopular,
    Transition,
    average_metrics,
    evaluate_scores,
    metric_sums,
    target_ranks,
)


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
