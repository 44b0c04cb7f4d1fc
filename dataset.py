"""Training samples from the training file: split protocols, windows, cloze and causal batches.

Everything is built once as flat arrays (CSR: ``songs[offsets[i]:offsets[i + 1]]`` is
sequence i) and whole batches are cut from them with numpy, never item by item. Windows are
right-aligned (left padding), the layout ``model.BERT4Rec`` expects: the last column is the
most recent song, or the [MASK] whose song is to be predicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from config import Config, decide_exclude_seen
from preprocessing_utils import (
    FEATURE_NAMES,
    FIRST_SONG_INDEX,
    MASK_INDEX,
    PAD_INDEX,
    Encoders,
    Sequences,
    load_training_file,
)


@dataclass(frozen=True)
class Playlists(Sequences):
    """Training sequences in the training file's CSR layout, with slicing helpers."""

    @classmethod
    def from_parts(
        cls, playlist_ids: np.ndarray, source: Sequences | Playlists, starts: np.ndarray,
        stops: np.ndarray,
    ) -> Playlists:
        """Sequences ``source.songs[starts[i]:stops[i]]`` (absolute positions), copied out."""
        lengths = (stops - starts).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        songs = source.songs[np.repeat(starts, lengths) + within]
        return cls(np.asarray(playlist_ids, dtype=np.int64), offsets, songs)


def album_successors(encoders: Encoders) -> np.ndarray:
    """Each song token's next song in its album (disc, then track order), 0 for none.

    The scaled disc and track columns are monotonic in the raw numbers, so sorting by them
    gives the album order; [PAD], [MASK], songs without an album and last tracks get 0.
    """
    successors = np.zeros(encoders.n_song_tokens, dtype=np.int64)
    if not encoders.has_side_info:
        return successors
    features = encoders.song_features
    songs = np.arange(FIRST_SONG_INDEX, encoders.n_song_tokens)
    albums = encoders.song_album[songs]
    order = songs[np.lexsort((features[songs, FEATURE_NAMES.index("track_number")],
                              features[songs, FEATURE_NAMES.index("disc_number")], albums))]
    same_album = encoders.song_album[order[1:]] == encoders.song_album[order[:-1]]
    same_album &= encoders.song_album[order[1:]] != 0
    successors[order[:-1][same_album]] = order[1:][same_album]
    return successors


@dataclass(frozen=True)
class EvalSet:
    """Inputs (the songs before the target) and the song to predict, per sequence."""

    inputs: Playlists
    targets: np.ndarray

    def __len__(self) -> int:
        """Number of evaluated sequences."""
        return len(self.targets)


@dataclass(frozen=True)
class Split:
    """Training sequences and the validation and test sets of one protocol."""

    protocol: str
    train: Playlists
    validation: EvalSet
    test: EvalSet

    def popularity(self, n_song_tokens: int) -> np.ndarray:
        """How often each song token occurs in the training part (int64, n_song_tokens)."""
        return np.bincount(self.train.songs, minlength=n_song_tokens).astype(np.int64)


def _eval_set(source: Sequences, rows: np.ndarray, drop: int) -> EvalSet:
    """Predict song ``len - drop`` of each playlist in ``rows`` from the songs before it."""
    starts = source.offsets[rows]
    target_positions = source.offsets[rows + 1] - drop
    inputs = Playlists.from_parts(source.playlist_ids[rows], source, starts, target_positions)
    return EvalSet(inputs, source.songs[target_positions].copy())


def split_sequences(
    sequences: Sequences,
    protocol: str,
    train_share: float = 0.9,
    seed: int = 42,
    min_playlist_len: int = 2,
) -> Split:
    """Split playlists by ``protocol`` ('playlist' or 'leave_one_out'), deterministic by seed.

    playlist: whole playlists are shuffled by seed; ``train_share`` of them train, the rest
    are split in halves into validation and test, each predicting its playlist's last song.
    leave_one_out: in every playlist the last song is the test target, the one before it the
    validation target (playlists of 3+ songs) and the songs before that train.
    """
    lengths = np.diff(sequences.offsets)
    kept = np.flatnonzero(lengths >= min_playlist_len)
    offsets = sequences.offsets
    if protocol == "playlist":
        order = kept[np.random.default_rng(seed).permutation(len(kept))]
        n_train = round(train_share * len(order))
        n_validation = (len(order) - n_train) // 2
        train_rows = np.sort(order[:n_train])
        validation_rows = np.sort(order[n_train : n_train + n_validation])
        test_rows = np.sort(order[n_train + n_validation :])
        train = Playlists.from_parts(
            sequences.playlist_ids[train_rows], sequences, offsets[train_rows],
            offsets[train_rows + 1],
        )
        return Split(protocol, train, _eval_set(sequences, validation_rows, 1),
                     _eval_set(sequences, test_rows, 1))
    if protocol == "leave_one_out":
        long_rows = kept[lengths[kept] >= 3]
        train = Playlists.from_parts(
            sequences.playlist_ids[long_rows], sequences, offsets[long_rows],
            offsets[long_rows + 1] - 2,
        )
        return Split(protocol, train, _eval_set(sequences, long_rows, 2),
                     _eval_set(sequences, kept, 1))
    raise ValueError(f"unknown split protocol {protocol!r} (known: playlist, leave_one_out)")


def gather_windows(
    playlists: Playlists, rows: np.ndarray, ends: np.ndarray, width: int
) -> np.ndarray:
    """Right-aligned windows (len(rows), width): up to ``width`` songs ending before ``ends``.

    ``ends`` are positions within each sequence (exclusive); missing songs are [PAD].
    """
    column = np.arange(width, dtype=np.int64)
    back = width - column
    positions = ends[:, None] - back[None, :]
    valid = positions >= 0
    flat = playlists.offsets[rows][:, None] + np.where(valid, positions, 0)
    return np.where(valid, playlists.songs[flat], PAD_INDEX)


def eval_tokens(
    eval_set: EvalSet, rows: np.ndarray, seq_len: int, causal: bool = False
) -> torch.Tensor:
    """Inputs (len(rows), seq_len): the latest seq_len - 1 songs, then [MASK] to predict.

    ``causal``: the latest seq_len songs and no [MASK]; the last song's position predicts.
    """
    lengths = eval_set.inputs.lengths[rows]
    if causal:
        return torch.from_numpy(gather_windows(eval_set.inputs, rows, lengths, seq_len))
    tokens = np.full((len(rows), seq_len), MASK_INDEX, dtype=np.int64)
    tokens[:, :-1] = gather_windows(eval_set.inputs, rows, lengths, seq_len - 1)
    return torch.from_numpy(tokens)


class TrainBatches(torch.utils.data.Dataset):
    """Shuffled, cloze-masked training batches; batch i of epoch e is a function of (seed, e, i).

    An epoch covers the data: a sequence of n songs gives ``ceil(n / seq_len)`` samples, each
    a random window of up to ``seq_len`` of its songs; a window's last song is always masked,
    each other song with probability ``cloze_probability``. ``causal`` (SASRec's objective)
    masks nothing: a window of up to ``seq_len + 1`` songs gives the inputs (all but its last)
    and, at every position holding a song, the label of the song after it.
    ``order[i]`` is the sequence of sample i of the current epoch.
    Works as a map-style dataset of whole batches (``DataLoader(batch_size=None)``), so
    DataLoader workers and resumed runs produce exactly the same batches.
    ``shard = (rank, size)`` (torchrun): batch i is rank's contiguous share of the same global
    batch i; the last batch is dropped when it has fewer rows than ``size``.
    """

    def __init__(
        self, playlists: Playlists, seq_len: int, cloze_probability: float, batch_size: int,
        seed: int, shard: tuple[int, int] = (0, 1), causal: bool = False,
    ) -> None:
        if len(playlists) == 0:
            raise ValueError("no training sequences: the data or the split left none")
        self.playlists = playlists
        self.seq_len = seq_len
        self.cloze_probability = cloze_probability
        self.batch_size = batch_size
        self.seed = seed
        self.causal = causal
        windows = -(-playlists.lengths // seq_len)
        self.samples = np.repeat(np.arange(len(playlists)), windows)
        self.order = self.samples
        self.epoch = 0
        self.shard = shard

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch``; call before iterating over that epoch's batches."""
        self.epoch = epoch
        shuffle = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        self.order = self.samples[shuffle]

    def __len__(self) -> int:
        """Batches per epoch (the last may be smaller)."""
        batches = -(-len(self.samples) // self.batch_size)
        if 0 < len(self.samples) % self.batch_size < self.shard[1]:
            batches -= 1
        return batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of the current epoch as (inputs, labels), both int64 (B, seq_len)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        lengths = self.playlists.lengths[rows]
        span = self.seq_len + self.causal
        widths = np.minimum(lengths, span)
        ends = widths + rng.integers(0, lengths - widths + 1)
        tokens = gather_windows(self.playlists, rows, ends, span)
        if self.causal:
            inputs = tokens[:, :-1]
            labels = np.where(inputs != PAD_INDEX, tokens[:, 1:], PAD_INDEX)
        else:
            real = tokens != PAD_INDEX
            masked = real & (rng.random(tokens.shape) < self.cloze_probability)
            masked[:, -1] = True
            labels = np.where(masked, tokens, PAD_INDEX)
            inputs = np.where(masked, MASK_INDEX, tokens)
        rank, size = self.shard
        if size > 1:
            share = np.array_split(np.arange(len(rows)), size)[rank]
            inputs, labels = inputs[share], labels[share]
        return torch.from_numpy(inputs), torch.from_numpy(labels)


def load_data(data_dir: Path) -> tuple[Encoders, Sequences]:
    """The encoders and the training file written by preprocessing.py into ``data_dir``.

    The training arrays are memory-mapped copy-on-write, so a Million-Playlist-size file opens
    at once and processes reading it share its pages.
    """
    encoders = Encoders.load(Path(data_dir) / "encoders")
    return encoders, load_training_file(data_dir, encoders.n_song_tokens, mmap=True)


def resolve_exclude_seen(config: Config, sequences: Sequences) -> Config:
    """A copy of ``config`` with ``train.exclude_seen`` decided for this training file (true
    or false), which the run's checkpoints then carry; ``auto`` follows its repeat share."""
    if config.train.exclude_seen == "auto" and sequences.repeat_share is None:
        logging.getLogger(__name__).warning(
            "the training file does not record how many playlists repeat a song (written "
            "before preprocessing.py recorded it): train.exclude_seen=auto excludes seen songs, "
            "the Recommender's default so far; re-run preprocessing.py or set "
            "train.exclude_seen=true|false")
    excluded = decide_exclude_seen(config.train.exclude_seen, sequences.repeat_share)
    return replace(config, train=replace(config.train,
                                         exclude_seen="true" if excluded else "false"))


def split_for(config: Config, sequences: Sequences) -> Split:
    """The split a run of ``config`` trains and evaluates on (protocol, share and seed)."""
    return split_sequences(sequences, config.data.split_protocol, config.data.train_share,
                           config.train.seed, config.data.min_playlist_len)
