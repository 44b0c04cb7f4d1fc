"""The seen bias: one learned score on the songs a position sees, the same in every loss and at
inference, and it learns to push seen songs down where nothing repeats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_model import assert_same_value_and_gradient, fused_case, random_tokens, tiny_model
from test_sampled_loss import cloze_batch, popularity
from training_support import make_encoders, write_data
from training_support import tiny_config as tiny_run_config

from checkpoint import load_checkpoint
from fused_softmax import linear_cross_entropy, split_seen_keys
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX
from sampled_softmax import NegativeSampler
from train import train

SEEN_BIAS = -1.5


def seen_model(**changes: object) -> BERT4Rec:
    """A tiny model with the seen bias at SEEN_BIAS."""
    model = tiny_model(seen_bias=True, **changes).eval()
    with torch.no_grad():
        model.seen_song_bias.fill_(SEEN_BIAS)
    return model


def dense_seen(
    tokens: torch.Tensor, masked: torch.Tensor, causal: bool, width: int
) -> torch.Tensor:
    """(M, width) 1.0 where a labelled position sees the song, written out position by position."""
    where = masked.nonzero().tolist()
    seen = torch.zeros(len(where), width)
    for m, (row, column) in enumerate(where):
        for position, song in enumerate(tokens[row].tolist()):
            if song >= FIRST_SONG_INDEX and (not causal or position <= column):
                seen[m, song] = 1.0
    return seen


@pytest.mark.parametrize("chunk", [4, 11, 4096])
def test_fused_loss_adds_the_seen_value_at_its_entries_in_value_and_gradient(chunk: int) -> None:
    x, weight, bias, targets = fused_case()
    value = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    seen = torch.zeros(7, 11, dtype=torch.float64)
    seen[[0, 0, 1, 2, 4, 6, 6], [3, 10, 3, 10, 2, 0, 10]] = 1.0  # rows 2 and 4: target seen
    keys = torch.unique(seen.nonzero()[:, 1] * 7 + seen.nonzero()[:, 0])
    assert_same_value_and_gradient(
        linear_cross_entropy(x, weight, bias, targets,
                             (*split_seen_keys(keys, 7), value.expand(len(keys))), chunk),
        F.cross_entropy(F.linear(x, weight, bias) + value * seen, targets),
        (x, weight, bias, value))


@pytest.mark.parametrize("objective", ["cloze", "causal"])
def test_loss_and_prediction_add_the_bias_to_the_songs_each_position_sees(objective: str) -> None:
    model = seen_model(objective=objective)
    tokens = random_tokens()
    tokens[1, :3] = PAD_INDEX
    tokens[2, 5] = tokens[2, 1]  # a song twice in one sequence gets the bias once
    if objective == "cloze":
        labels = torch.where(torch.rand(tokens.shape) < 0.3, tokens, PAD_INDEX)
        labels[:, -1] = tokens[:, -1]
        inputs = torch.where(labels != PAD_INDEX, MASK_INDEX, tokens)
    else:
        inputs = tokens
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = tokens[:, 0]
        labels[tokens == PAD_INDEX] = PAD_INDEX
    masked = labels != PAD_INDEX
    encoded = model.encode(inputs)
    logits = model.logits(encoded[masked])
    seen = dense_seen(inputs, masked, objective == "causal", logits.shape[1])
    expected = F.cross_entropy(logits + SEEN_BIAS * seen, labels[masked])
    torch.testing.assert_close(model.loss(inputs, labels), expected)
    last = model.logits(encoded[:, -1])
    every = torch.ones(len(inputs), inputs.shape[1], dtype=torch.bool)
    last = last + SEEN_BIAS * dense_seen(inputs, every, False, last.shape[1])[
        torch.arange(len(inputs)) * inputs.shape[1] + inputs.shape[1] - 1]
    torch.testing.assert_close(model.predict_last(inputs)[:, FIRST_SONG_INDEX:],
                               last[:, FIRST_SONG_INDEX:])


@pytest.mark.parametrize("changes", [{}, {"side_pointer": True}, {"objective": "causal"}])
def test_sampling_every_song_is_the_full_loss_with_the_seen_bias(
    changes: dict[str, object],
) -> None:
    inputs, labels = cloze_batch()
    if changes.get("objective") == "causal":
        inputs = random_tokens(6)
        labels = torch.roll(inputs, -1, dims=1)
    losses, gradients = [], []
    for sampler in (None, NegativeSampler(popularity(), 10_000, alpha=0.0)):
        model = seen_model(**changes)
        loss = model.loss(inputs, labels, sampler)
        loss.backward()
        losses.append(loss.detach())
        gradients.append(model.seen_song_bias.grad.clone())
    assert losses[1] == pytest.approx(losses[0].item(), rel=1e-5)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-6)
    assert gradients[0] != 0


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_training_where_nothing_repeats_pushes_seen_songs_down(tmp_path: Path, loss: str) -> None:
    data_dir = write_data(tmp_path / "data", make_encoders())
    config = tiny_run_config(data_dir, tmp_path / "run", **{
        "model.seen_bias": True, "train.epochs": 3, "train.loss": loss, "train.negatives": 8})
    train(config, progress=False)
    state = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert state["seen_song_bias"] < 0
