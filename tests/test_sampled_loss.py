"""The sampled softmax: exact when it samples everything, logQ applied, hits masked, it trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_model import N_ALBUMS, N_ARTISTS, N_FEATURES, N_SONGS, SEQ_LEN, random_tokens, tiny_config
from training_support import make_encoders, step_losses, write_data
from training_support import tiny_config as tiny_run_config

from checkpoint import load_checkpoint
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, PAD_INDEX
from recommender import Recommender
from sampled_softmax import NegativeSampler, sampled_cross_entropy
from train import train


def pointer_model(seed: int = 0, **changes: object) -> BERT4Rec:
    """A tiny model with random side tables, album successors included."""
    torch.manual_seed(seed)
    model = BERT4Rec(tiny_config(**changes), N_SONGS, N_ALBUMS, N_ARTISTS, N_FEATURES, SEQ_LEN)
    generator = torch.Generator().manual_seed(1)
    model.set_side_tables(
        torch.randint(1, N_ALBUMS, (N_SONGS,), generator=generator),
        torch.randint(1, N_ARTISTS, (N_SONGS,), generator=generator),
        torch.randn(N_SONGS, N_FEATURES, generator=generator),
        torch.randint(0, N_SONGS, (N_SONGS,), generator=generator),
    )
    return model


def cloze_batch(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with the last and a few other positions masked, and their labels."""
    tokens = random_tokens(batch)
    tokens[0, :3] = PAD_INDEX
    labels = torch.zeros_like(tokens)
    labels[:, -1] = tokens[:, -1]
    labels[1:, 2] = tokens[1:, 2]
    labels[2, 4] = tokens[0, -1]  # a target that occurs twice in the batch
    inputs = torch.where(labels != PAD_INDEX, 1, tokens)
    return inputs, labels


def popularity() -> torch.Tensor:
    """Training counts with a long tail (specials at 0)."""
    counts = (1000.0 / torch.arange(1, N_SONGS + 1)).floor()
    counts[:FIRST_SONG_INDEX] = 0
    return counts


VARIANTS = [{"side_pointer": False}, {"side_pointer": True}, {"tie_head": False},
            {"side_features": False}]


@pytest.mark.parametrize("changes", VARIANTS)
def test_sampling_every_song_uniformly_is_the_full_loss_in_value_and_gradient(
    changes: dict[str, bool],
) -> None:
    inputs, labels = cloze_batch()
    losses, gradients = [], []
    for sampler in (None, NegativeSampler(popularity(), N_SONGS, alpha=0.0)):
        model = pointer_model(**changes).eval()
        loss = model.loss(inputs, labels, sampler)
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: parameter.grad.clone() for name, parameter
                          in model.named_parameters() if parameter.grad is not None})
    assert losses[1] == pytest.approx(losses[0].item(), rel=1e-5)
    assert gradients[1].keys() == gradients[0].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_exhaustive_sampler_takes_every_song_once() -> None:
    sampler = NegativeSampler(popularity(), 10 * N_SONGS, alpha=0.0)
    assert sampler.exhaustive
    assert sampler.draw().tolist() == list(range(N_SONGS))  # the full softmax's columns
    assert sampler.expected.tolist() == [1.0] * N_SONGS


def test_popularity_sampler_draws_by_count_plus_one_to_the_alpha() -> None:
    torch.manual_seed(0)
    counts = popularity()
    sampler = NegativeSampler(counts, 200_000, alpha=0.5)
    drawn = torch.bincount(sampler.draw(), minlength=N_SONGS).double()
    weights = (counts.double() + 1) ** 0.5
    weights[:FIRST_SONG_INDEX] = 0
    expected = 200_000 * weights / weights.sum()
    assert drawn[:FIRST_SONG_INDEX].sum() == 0
    torch.testing.assert_close(sampler.expected.double(), expected.float().double())
    songs = slice(FIRST_SONG_INDEX, None)
    assert ((drawn - expected)[songs].abs() / expected[songs].sqrt()).max() < 5  # 5 sigma


def test_logq_correction_and_accidental_hits_on_hand_made_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0]])
    songs = torch.tensor([6, 5, 6, 7, 8])  # the target 6 twice: column 0 and column 2
    log_q = torch.tensor([0.3, 0.1, 0.7, -0.4, 2.0])
    target, positive = torch.tensor([6]), torch.tensor([0])
    loss = sampled_cross_entropy(logits, songs, log_q, positive, target)
    negatives = torch.tensor([2.0 - 0.1, -1.0 + 0.4, 3.0 - 2.0])  # corrected; 6's copies masked
    expected = torch.logsumexp(torch.cat([torch.tensor([1.0]), negatives]), 0) - 1.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    uncorrected = sampled_cross_entropy(logits, songs, torch.zeros(5), positive, target)
    assert abs(uncorrected.item() - loss.item()) > 0.3


def test_with_popularity_negatives_the_corrected_loss_estimates_the_full_loss() -> None:
    """Many draws from a skewed q: with −log Q the estimate is the full loss, without it not."""
    torch.manual_seed(3)
    inputs, labels = cloze_batch()
    model = pointer_model().eval()
    full = model.loss(inputs, labels).item()
    sampler = NegativeSampler(popularity(), 100_000, alpha=1.0)
    with torch.no_grad():
        sampled = model.loss(inputs, labels, sampler).item()
        sampler.expected = torch.ones_like(sampler.expected)  # as if logQ were not applied
        uncorrected = model.loss(inputs, labels, sampler).item()
    assert sampled == pytest.approx(full, rel=0.01)
    assert uncorrected > full + math.log(100_000) / 2


def test_accidental_hits_among_the_negatives_are_masked() -> None:
    """Negatives that are all copies of the batch's targets leave only the in-batch softmax."""
    inputs, labels = cloze_batch()
    model = pointer_model().eval()
    targets = labels[labels != PAD_INDEX]
    batch_songs = torch.unique(targets)

    class TargetsOnly(NegativeSampler):
        def draw(self) -> torch.Tensor:
            return batch_songs.repeat(5)

    sampler = TargetsOnly(popularity(), 1, alpha=0.0)
    sampler.expected = torch.full_like(sampler.expected, 5.0)  # Q: 1 in-batch + 5 drawn copies
    with torch.no_grad():
        loss = model.loss(inputs, labels, sampler)
        hidden = model.encode(inputs)[labels != PAD_INDEX]
        logits = model.logits(hidden)[:, batch_songs]
        expected = torch.nn.functional.cross_entropy(
            logits, torch.searchsorted(batch_songs, targets))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pointer_and_head_at_candidates_equal_the_full_columns() -> None:
    model = pointer_model(side_pointer=True).eval()
    inputs, labels = cloze_batch()
    masked = labels != PAD_INDEX
    candidates = torch.tensor([2, 5, 5, 9, 17, 31, 39, 3])
    with torch.no_grad():
        encoded = model.encode(inputs)
        rows, columns = masked.nonzero(as_tuple=True)
        dense = model.pointer_logits(encoded, inputs, rows, columns)
        sparse = model.pointer_logits(encoded, inputs, rows, columns, candidates)
        torch.testing.assert_close(sparse, dense[:, candidates])
        assert dense[:, candidates].abs().sum() > 0
        torch.testing.assert_close(model.candidate_vectors(candidates),
                                   model.song_vectors()[candidates])


def test_sampled_training_runs_end_to_end_and_its_checkpoint_serves(tmp_path: Path) -> None:
    data_dir = write_data(tmp_path / "data", make_encoders())
    run_dir = tmp_path / "run"
    config = tiny_run_config(data_dir, run_dir, **{"train.epochs": 6, "train.loss": "sampled",
                                                   "train.negatives": 8})
    summary = train(config, progress=False)
    losses = step_losses(run_dir)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    assert summary["best_val_ndcg@10"] > 0.2
    recommender = Recommender.from_checkpoint(run_dir / "best.pt")
    result = recommender.recommend([[5000, 5007, 5014]], k=5)[0]
    assert len(result.song_ids) == 5 and all(math.isfinite(score) for score in result.scores)


@pytest.mark.parametrize(("negatives", "chosen"), [(4, "full"), (3, "sampled")])
def test_auto_loss_samples_only_on_a_catalog_much_larger_than_the_negatives(
    tmp_path: Path, negatives: int, chosen: str
) -> None:
    """30 songs: the full softmax up to 8 x negatives, the sampled one above; best.pt says which."""
    data_dir = write_data(tmp_path / "data", make_encoders())
    config = tiny_run_config(data_dir, tmp_path / "run", **{
        "train.epochs": 1, "train.loss": "auto", "train.negatives": negatives})
    train(config, progress=False)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["config"]["train"]["loss"] == chosen
