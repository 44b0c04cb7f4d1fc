"""Checkpoints: saving (atomically), loading (weights_only), verifying, and checkpoint → model.

A checkpoint is a dict of tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it without unpickling code. It carries the config it was trained with and the fitted
encoders (as tensors, with their fingerprint), so serving needs only the file. ``load_model``
is the one way from a file to a ready network: the recommender, ``train.py --evaluate``, the
notebook and the benchmarks all use it, so every one of them checks the same things.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Config
from dataset import album_successors
from model import BERT4Rec
from preprocessing_utils import Encoders, atomic_write

CHECKPOINT_FORMAT = "bert4musicrec-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: wrong format, or fitted on different encoders."""


def build_model(config: Config, encoders: Encoders) -> BERT4Rec:
    """The network sized by the encoders, with their side tables copied in (random weights)."""
    model = BERT4Rec(
        config.model, encoders.n_song_tokens, encoders.n_album_tokens, encoders.n_artist_tokens,
        encoders.n_features, config.data.seq_len,
    )
    model.set_side_tables(
        torch.from_numpy(encoders.song_album), torch.from_numpy(encoders.song_artist),
        torch.from_numpy(encoders.song_features), torch.from_numpy(album_successors(encoders)),
    )
    return model


def encoders_to_tensors(encoders: Encoders) -> dict[str, torch.Tensor]:
    """The encoders' arrays as tensors, which weights_only loading accepts."""
    return {name: torch.from_numpy(np.array(array))
            for name, array in encoders.to_arrays().items()}


def encoders_from_tensors(tensors: dict[str, torch.Tensor]) -> Encoders:
    """Encoders rebuilt from ``encoders_to_tensors`` output (as embedded in a checkpoint)."""
    return Encoders.from_arrays({name: value.numpy() for name, value in tensors.items()})


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` the state through the atomic writer: a reader sees old or new, never half."""
    atomic_write(Path(path), lambda file: torch.save(state, file))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only, onto the CPU) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a Bert4MusicRec checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint


def verify_checkpoint(
    checkpoint: dict[str, Any], path: Path, encoders: Encoders | None = None,
    where: Path | str | None = None,
) -> Encoders:
    """The checkpoint's own encoders, after checking them; with ``encoders``, those must match.

    The embedded encoders must match the fingerprint stored beside them (a damaged or edited
    file otherwise decodes indices to the wrong songs). Given ``encoders`` (the data's, read
    from ``where``) must have the checkpoint's fingerprint too: song indices mean songs only
    under the encoders they were fitted with.
    """
    expected = checkpoint.get("encoders_fingerprint")
    try:
        embedded = encoders_from_tensors(checkpoint["encoders"])
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the embedded encoders cannot be read: {error}") from None
    if embedded.fingerprint != expected:
        raise CheckpointError(f"{path}: the embedded encoders do not match their fingerprint")
    if encoders is not None and encoders.fingerprint != expected:
        source = where if where is not None else "the data"
        raise CheckpointError(
            f"the checkpoint was trained with encoders {str(expected)[:12]}…, but {source} holds "
            f"encoders {encoders.fingerprint[:12]}…: song indices would mean different songs. "
            f"Re-run preprocessing.py with --encoders pointing at the checkpoint's encoders, "
            f"or train a new model on this data."
        )
    return embedded


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's network in eval mode, with what it was trained with and on."""

    model: BERT4Rec
    config: Config
    encoders: Encoders
    popularity: torch.Tensor
    model_version: str


def load_model(
    path: Path | str, encoders: Encoders | None = None, device: str | torch.device = "cpu",
    where: Path | str | None = None,
) -> LoadedModel:
    """Load, verify and build a checkpoint's model on ``device``, ready for inference.

    ``encoders``: the encoders of the data the model is about to see (``where`` names their
    folder in the error); CheckpointError unless they are the checkpoint's.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    embedded = verify_checkpoint(checkpoint, path, encoders, where)
    config = Config.from_dict(checkpoint["config"])
    model = build_model(config, embedded)
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the weights do not fit the network: {error}") from None
    return LoadedModel(model.to(torch.device(device)).eval(), config, embedded,
                       checkpoint["popularity"], str(checkpoint["model_version"]))
