"""The causal (SASRec) objective: no look-ahead, next-song batches, train, evaluate, serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset import make_sequences, songs_at
from test_model import random_tokens, tiny_model
from training_support import SONG_IDS, make_encoders, tiny_config, write_data

import train as train_module
from checkpoint import build_model
from dataset import TrainBatches, eval_tokens, split_sequences
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX
from recommender import Recommender
from train import train


@pytest.mark.parametrize("side_pointer", [False, True])
def test_causal_attention_never_looks_ahead(side_pointer: bool) -> None:
    model = tiny_model(objective="causal", side_pointer=side_pointer).eval()
    tokens = random_tokens()
    tokens[1, :3] = PAD_INDEX
    changed = tokens.clone()
    changed[:, 5] = torch.where(tokens[:, 5] == 7, 8, 7)
    with torch.no_grad():
        before, after = model.encode(tokens), model.encode(changed)
        torch.testing.assert_close(before[:, :5], after[:, :5])
        assert not torch.allclose(before[:, 5:], after[:, 5:])
        if side_pointer:
            rows = torch.arange(len(tokens)).repeat_interleave(5)
            positions = torch.arange(5).repeat(len(tokens))
            pointer = [model.pointer_logits(hidden, inputs, rows, positions)
                       for hidden, inputs in ((before, tokens), (after, changed))]
            torch.testing.assert_close(pointer[0], pointer[1])


def test_a_bidirectional_model_does_look_ahead() -> None:
    """The check above can fail: the same change moves a cloze model's earlier positions."""
    model = tiny_model().eval()
    tokens = random_tokens()
    changed = tokens.clone()
    changed[:, 5] = torch.where(tokens[:, 5] == 7, 8, 7)
    with torch.no_grad():
        assert not torch.allclose(model.encode(tokens)[:, :5], model.encode(changed)[:, :5])


def test_causal_prediction_reads_the_last_song_position() -> None:
    model = tiny_model(objective="causal", side_pointer=True).eval()
    tokens = random_tokens()
    tokens[2, :4] = PAD_INDEX
    with torch.no_grad():
        full = model.encode(tokens)
        torch.testing.assert_close(model.encode(tokens, last_only=True), full[:, -1:])
        short = model.predict_last(tokens[2:3, 4:])
        torch.testing.assert_close(model.predict_last(tokens)[2:3], short)


def test_causal_batches_predict_each_next_song_without_masks() -> None:
    playlists = make_sequences(40)
    batches = TrainBatches(playlists, seq_len=8, cloze_probability=0.3, batch_size=40, seed=2,
                           causal=True)
    batches.set_epoch(1)
    inputs, labels = (tensor.numpy() for tensor in batches[0])
    assert inputs.shape == labels.shape == (40, 8)
    assert not (inputs == MASK_INDEX).any()
    assert ((labels != PAD_INDEX) == (inputs != PAD_INDEX)).all()
    for row, playlist_row in enumerate(batches.order[:40]):
        songs = songs_at(playlists, int(playlist_row))
        real = inputs[row] != PAD_INDEX
        window = np.concatenate([inputs[row][real][:1], labels[row][real]])
        assert len(window) == min(len(songs), 9)
        assert any(np.array_equal(songs[i : i + len(window)], window)
                   for i in range(len(songs) - len(window) + 1))


def test_causal_eval_tokens_are_the_latest_songs_without_a_mask() -> None:
    split = split_sequences(make_sequences(30), "leave_one_out")
    rows = np.arange(len(split.test))
    tokens = eval_tokens(split.test, rows, seq_len=6, causal=True).numpy()
    for row in rows:
        inputs = songs_at(split.test.inputs, int(row))[-6:]
        assert np.array_equal(tokens[row, 6 - len(inputs) :], inputs)
        assert (tokens[row, : 6 - len(inputs)] == PAD_INDEX).all()


@pytest.mark.parametrize("variant", [{}, {"train.loss": "sampled", "train.negatives": 8},
                                     {"model.side_pointer": False}])
def test_a_causal_model_trains_evaluates_and_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], variant: dict[str, object]
) -> None:
    data = write_data(tmp_path / "data", make_encoders())
    run = tmp_path / "run"
    summary = train(tiny_config(data, run, **{"model.objective": "causal", "train.epochs": 6},
                                **variant), progress=False)
    assert summary["best_val_ndcg@10"] > 0
    assert train_module.main(["--evaluate", str(run / "best.pt"), "--data", str(data)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["model"]["hr@10"] > results["most_popular"]["hr@10"]
    recommender = Recommender.from_checkpoint(run / "best.pt")
    assert recommender.model.causal
    result = recommender.recommend([[int(SONG_IDS[3]), int(SONG_IDS[4])]], k=3,
                                   exclude_seen=True)[0]
    assert len(result.song_ids) == 3 and int(SONG_IDS[4]) not in result.song_ids


def test_causal_recommendations_are_the_models_ranking_after_the_last_song(
    tmp_path: Path,
) -> None:
    data = write_data(tmp_path / "data", make_encoders())
    config = tiny_config(data, tmp_path, **{"model.objective": "causal"})
    encoders = make_encoders()
    torch.manual_seed(3)
    model = build_model(config, encoders).eval()
    recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "test")
    playlist = [int(song) for song in SONG_IDS[[4, 9, 2, 17, 5]]]
    result = recommender.recommend([playlist], k=8)[0]
    tokens = torch.from_numpy(encoders.encode_songs(playlist))
    inputs = torch.full((1, config.data.seq_len), PAD_INDEX, dtype=torch.long)
    inputs[0, -len(tokens) :] = tokens
    with torch.no_grad():
        scores = model.predict_last(inputs)[0]
    scores[tokens] = float("-inf")
    expected = torch.softmax(scores[FIRST_SONG_INDEX:], dim=0).topk(8)
    assert result.song_ids == SONG_IDS[expected.indices.numpy()].tolist()

