"""Splits, windows and cloze masking of dataset.py."""

from __future__ import annotations

import numpy as np
import pytest

from dataset import Playlists, TrainBatches, eval_tokens, split_sequences
from preprocessing_utils import MASK_INDEX, PAD_INDEX, Sequences


def make_sequences(n_playlists: int = 50, seed: int = 0) -> Playlists:
    """Playlists of 2..30 distinct-looking song tokens, ids 100, 101, ..."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 31, n_playlists)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    songs = rng.integers(2, 500, offsets[-1]).astype(np.int64)
    return Playlists(np.arange(100, 100 + n_playlists, dtype=np.int64), offsets, songs)


def songs_at(sequences: Sequences, row: int) -> np.ndarray:
    """The songs of the sequence in ``row`` (CSR slice)."""
    return sequences.songs[sequences.offsets[row] : sequences.offsets[row + 1]]


def playlist_of(sequences: Sequences, playlist_id: int) -> np.ndarray:
    """The songs of one playlist by id."""
    row = int(np.flatnonzero(sequences.playlist_ids == playlist_id)[0])
    return sequences.songs[sequences.offsets[row] : sequences.offsets[row + 1]]


def test_playlist_protocol_holds_out_whole_playlists_without_overlap() -> None:
    sequences = make_sequences(200)
    split = split_sequences(sequences, "playlist", train_share=0.8, seed=3)
    train = set(split.train.playlist_ids.tolist())
    validation = set(split.validation.inputs.playlist_ids.tolist())
    test = set(split.test.inputs.playlist_ids.tolist())
    assert not train & validation and not train & test and not validation & test
    assert len(train) == 160 and len(validation) == 20 and len(test) == 20
    assert train | validation | test == set(sequences.playlist_ids.tolist())
    for eval_set in (split.validation, split.test):
        for row, playlist_id in enumerate(eval_set.inputs.playlist_ids):
            songs = playlist_of(sequences, int(playlist_id))
            assert np.array_equal(songs_at(eval_set.inputs, row), songs[:-1])
            assert eval_set.targets[row] == songs[-1]


def test_leave_one_out_never_trains_on_evaluated_positions() -> None:
    sequences = make_sequences(60)
    split = split_sequences(sequences, "leave_one_out", seed=0)
    assert len(split.test) == 60
    for row, playlist_id in enumerate(split.test.inputs.playlist_ids):
        songs = playlist_of(sequences, int(playlist_id))
        assert split.test.targets[row] == songs[-1]
        assert np.array_equal(songs_at(split.test.inputs, row), songs[:-1])
    for row, playlist_id in enumerate(split.validation.inputs.playlist_ids):
        songs = playlist_of(sequences, int(playlist_id))
        assert split.validation.targets[row] == songs[-2]
        assert np.array_equal(songs_at(split.validation.inputs, row), songs[:-2])
    for row, playlist_id in enumerate(split.train.playlist_ids):
        songs = playlist_of(sequences, int(playlist_id))
        assert np.array_equal(songs_at(split.train, row), songs[:-2])
    assert (split.train.lengths >= 1).all()


def test_splits_are_deterministic_by_seed() -> None:
    sequences = make_sequences(100)
    first = split_sequences(sequences, "playlist", seed=5)
    again = split_sequences(sequences, "playlist", seed=5)
    other = split_sequences(sequences, "playlist", seed=6)
    assert np.array_equal(first.test.inputs.playlist_ids, again.test.inputs.playlist_ids)
    assert not np.array_equal(first.test.inputs.playlist_ids, other.test.inputs.playlist_ids)


def test_short_playlists_are_dropped_and_unknown_protocol_refused() -> None:
    sequences = make_sequences(100)
    split = split_sequences(sequences, "playlist", min_playlist_len=10)
    kept = (split.train.lengths.min(), split.test.inputs.lengths.min() + 1)
    assert min(kept) >= 10
    with pytest.raises(ValueError, match="protocol"):
        split_sequences(sequences, "random")


def test_training_batches_mask_the_last_song_and_a_share_of_the_others() -> None:
    playlists = make_sequences(300)
    batches = TrainBatches(playlists, seq_len=16, cloze_probability=0.25, batch_size=64, seed=1)
    batches.set_epoch(0)
    inputs, labels = batches[0]
    assert inputs.shape == labels.shape == (64, 16)
    masked = labels != PAD_INDEX
    assert masked[:, -1].all()
    assert (inputs[masked] == MASK_INDEX).all()
    assert not (inputs[~masked] == MASK_INDEX).any()
    real = (inputs != PAD_INDEX) | masked
    share = (masked[:, :-1].sum() / real[:, :-1].sum()).item()
    assert 0.15 < share < 0.35
    assert not masked[~real].any()


def test_training_windows_are_right_aligned_slices_of_their_playlist() -> None:
    playlists = make_sequences(40)
    batches = TrainBatches(playlists, seq_len=8, cloze_probability=0.3, batch_size=40, seed=2)
    batches.set_epoch(3)
    inputs, labels = batches[0]
    tokens = np.where(labels.numpy() != PAD_INDEX, labels.numpy(), inputs.numpy())
    for row, playlist_row in enumerate(batches.order[:40]):
        songs = songs_at(playlists, int(playlist_row))
        window = tokens[row][tokens[row] != PAD_INDEX]
        assert len(window) == min(len(songs), 8)
        assert (tokens[row, : 8 - len(window)] == PAD_INDEX).all()
        starts = [i for i in range(len(songs) - len(window) + 1)
                  if np.array_equal(songs[i : i + len(window)], window)]
        assert starts


def test_an_epoch_covers_every_sequence_once_per_seq_len_songs() -> None:
    playlists = make_sequences(120)
    batches = TrainBatches(playlists, seq_len=8, cloze_probability=0.3, batch_size=32, seed=0)
    batches.set_epoch(1)
    windows = np.bincount(batches.order, minlength=len(playlists))
    assert np.array_equal(windows, -(-playlists.lengths // 8))
    assert len(batches) == -(-windows.sum() // 32)
    samples = sum(len(batches[index][0]) for index in range(len(batches)))
    assert samples == windows.sum()


def test_batches_are_a_function_of_seed_epoch_and_index() -> None:
    playlists = make_sequences(100)
    first = TrainBatches(playlists, 8, 0.3, 16, seed=4)
    second = TrainBatches(playlists, 8, 0.3, 16, seed=4)
    first.set_epoch(2)
    second.set_epoch(2)
    for index in (3, 0):
        assert all(np.array_equal(a, b) for a, b in zip(first[index], second[index], strict=True))
    second.set_epoch(3)
    assert not np.array_equal(first[0][0], second[0][0])
    with pytest.raises(IndexError):
        first[len(first)]


def test_eval_tokens_put_the_latest_songs_before_a_mask() -> None:
    sequences = make_sequences(30)
    split = split_sequences(sequences, "leave_one_out")
    rows = np.arange(len(split.test))
    tokens = eval_tokens(split.test, rows, seq_len=6).numpy()
    assert (tokens[:, -1] == MASK_INDEX).all()
    for row in rows:
        inputs = songs_at(split.test.inputs, int(row))[-5:]
        assert np.array_equal(tokens[row, 6 - 1 - len(inputs) : -1], inputs)
        assert (tokens[row, : 6 - 1 - len(inputs)] == PAD_INDEX).all()


def test_popularity_counts_only_the_training_part() -> None:
    sequences = make_sequences(80)
    split = split_sequences(sequences, "leave_one_out")
    popularity = split.popularity(500)
    assert popularity.sum() == len(split.train.songs)
    assert popularity[split.train.songs[0]] >= 1
