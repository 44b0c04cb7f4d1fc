"""Checkpoints: saving (atomically), loading (weights_only), verifying, and checkpoint → model.

A checkpoint's state is a dict of tensors and plain Python values, so
``torch.load(weights_only=True)`` reads it without unpickling code. It carries the config it
was trained with and the fitted encoders (as tensors, with their fingerprint), so serving needs
only the file. On disk the state is serialized once more inside an envelope,
``{"format", "sha256", "state": uint8 tensor of the serialized state}``: the digest covers every
byte of the state, so a damaged file is refused before its state is even unpickled, and the
envelope is itself a plain weights_only file. ``load_model`` is the one way from a file to a
ready network: the recommender, ``train.py --evaluate``, the notebook and the benchmarks all
use it, so every one of them checks the same things (hash, format, finiteness, shapes,
encoders).

    python checkpoint.py --upgrade OLD.pt NEW.pt   # re-save a format-1 checkpoint (no hash)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomic_files import atomic_write
from config import Config, ConfigError, decide_exclude_seen
from dataset import album_successors
from model import BERT4Rec
from preprocessing_utils import Encoders

CHECKPOINT_FORMAT = "bert4musicrec-checkpoint-2"
# the format before content hashes: refused by load_checkpoint, re-saved by ``--upgrade``
LEGACY_FORMAT = "bert4musicrec-checkpoint-1"
# what a checkpoint must hold for load_model
MODEL_KEYS = ("model", "config", "encoders", "encoders_fingerprint", "popularity",
              "model_version")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, damaged, wrong format, non-finite weights,
    weights of other shapes, or fitted on different encoders. The message is one line."""


def named_tensors(value: Any, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its path (``model[...]``)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from named_tensors(item, f"{name}[{key!r}]" if name else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from named_tensors(item, f"{name}[{index}]")


def first_non_finite(state: Any) -> str | None:
    """Path of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in named_tensors(state):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            return name
    return None


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


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type name when it has no message."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize the state, hash it and write it in its envelope through the atomic writer.

    A reader sees the old file or the new one, never half. A state holding a non-finite tensor
    is refused (CheckpointError naming it) and nothing is written: a diverged model never
    becomes a checkpoint.
    """
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: not saved: tensor {bad} holds NaN or infinite values")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    view = buffer.getbuffer()
    envelope = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(view).hexdigest(),
                "state": torch.frombuffer(view, dtype=torch.uint8)}
    atomic_write(Path(path), lambda file: torch.save(envelope, file))


def read_weights_only(path: Path, source: Path | io.BytesIO, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; any failure as a one-line CheckpointError.

    ``mmap``: map the tensors from the file instead of reading them (the envelope's payload is
    only hashed and copied once, so it need not be read into memory first).
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"({type(error).__name__}: {first_line(error)})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only, CPU), check its hash, format and finiteness.

    CheckpointError, naming the file, for anything unreadable, damaged (the digest differs),
    of another or the hash-less legacy format, or holding a NaN or infinite tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save zip archive: "
                              f"truncated, empty or another kind of file)")
    envelope = read_weights_only(path, path, mmap=True)
    found = envelope.get("format") if isinstance(envelope, dict) else None
    if found == LEGACY_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {LEGACY_FORMAT} has no content hash and is no longer "
            f"loaded; retrain, or re-save it with `python checkpoint.py --upgrade {path} NEW.pt`"
        )
    payload = envelope.get("state") if isinstance(envelope, dict) else None
    if (found != CHECKPOINT_FORMAT or not isinstance(payload, torch.Tensor)
            or payload.dtype != torch.uint8):
        raise CheckpointError(f"{path}: not a Bert4MusicRec checkpoint ({CHECKPOINT_FORMAT})")
    data = payload.numpy()
    if hashlib.sha256(data.data).hexdigest() != envelope.get("sha256"):
        raise CheckpointError(f"{path}: damaged checkpoint: its content does not match its "
                              f"SHA-256; restore the file or retrain")
    checkpoint = read_weights_only(path, io.BytesIO(data.tobytes()))
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a Bert4MusicRec checkpoint ({CHECKPOINT_FORMAT})")
    check_finite(checkpoint, path)
    return checkpoint


def check_finite(checkpoint: dict[str, Any], path: Path) -> None:
    """CheckpointError naming the first tensor with a NaN or infinity (a diverged run's)."""
    bad = first_non_finite(checkpoint)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or infinite values (the run "
                              f"diverged); retrain, e.g. with a lower train.lr")


def verify_checkpoint(
    checkpoint: dict[str, Any], path: Path, encoders: Encoders | None = None,
    where: Path | str | None = None,
) -> Encoders:
    """The checkpoint's own encoders, after checking them; with ``encoders``, those must match.

    The embedded encoders must match the fingerprint stored beside them (a damaged or edited
    file otherwise decodes indices to the wrong songs). Given ``encoders`` (the data's, read
    from ``where``) must have the checkpoint's fingerprint too, or be the base the checkpoint's
    catalog extension (cold_start.py) derives from: song indices mean songs only under the
    encoders they were fitted with, and an extension only appends.
    """
    expected = checkpoint.get("encoders_fingerprint")
    try:
        embedded = encoders_from_tensors(checkpoint["encoders"])
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the embedded encoders cannot be read: {error}") from None
    if embedded.fingerprint != expected:
        raise CheckpointError(f"{path}: the embedded encoders do not match their fingerprint")
    if (encoders is not None and encoders.fingerprint != expected
            and not embedded.derives_from(encoders.fingerprint)):
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

    @property
    def exclude_seen(self) -> bool:
        """The run's train.exclude_seen decision, the default of every use of the model (a
        config stored before the decision was resolved, ``auto``, excludes seen songs)."""
        return decide_exclude_seen(self.config.train.exclude_seen, None)


def load_model(
    path: Path | str, encoders: Encoders | None = None, device: str | torch.device = "cpu",
    where: Path | str | None = None,
) -> LoadedModel:
    """Load, verify and build a checkpoint's model on ``device``, ready for inference.

    ``encoders``: the encoders of the data the model is about to see (``where`` names their
    folder in the error); CheckpointError unless they are the checkpoint's.
    """
    path = Path(path)
    loaded = model_from_checkpoint(load_checkpoint(path), path, encoders, where)
    return LoadedModel(loaded.model.to(torch.device(device)), loaded.config, loaded.encoders,
                       loaded.popularity, loaded.model_version)


def model_from_checkpoint(
    checkpoint: dict[str, Any], path: Path, encoders: Encoders | None = None,
    where: Path | str | None = None,
) -> LoadedModel:
    """The network of an already read checkpoint, on the CPU, after checking what it holds."""
    missing = [key for key in MODEL_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    embedded = verify_checkpoint(checkpoint, path, encoders, where)
    try:
        config = Config.from_dict(checkpoint["config"])
    except (ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its config cannot be read: {first_line(error)}") from None
    model = build_model(config, embedded)
    weights = checkpoint["model"]
    check_shapes(weights, model.state_dict(), path)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit the network: "
                              f"{first_line(error)}") from None
    popularity = checkpoint["popularity"]
    if not isinstance(popularity, torch.Tensor) or popularity.shape != (model.n_song_tokens,):
        raise CheckpointError(f"{path}: its popularity is not one value per song token")
    return LoadedModel(model.eval(), config, embedded, popularity,
                       str(checkpoint["model_version"]))


def check_shapes(weights: Any, expected: dict[str, torch.Tensor], path: Path) -> None:
    """CheckpointError (one line, naming the tensor and both shapes) unless ``weights`` holds
    exactly the network's tensors with their shapes."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its weights are not a dict of tensors")
    for name, tensor in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: tensor {name} is missing from the weights")
        found = weights[name]
        if not isinstance(found, torch.Tensor):
            raise CheckpointError(f"{path}: {name} is not a tensor")
        if found.shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(found.shape)} in the checkpoint, but "
                f"the network of its config needs {tuple(tensor.shape)}"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]} is not part of the network")


def upgrade(old: Path, new: Path) -> None:
    """Re-save a legacy (hash-less) checkpoint in the current format, after every load check.

    The old file is read with weights_only and must pass what load_model checks (finite
    weights of the right shapes, matching encoders); only then is ``new`` written.
    """
    old = Path(old)
    if not old.is_file():
        raise CheckpointError(f"{old}: checkpoint not found")
    state = read_weights_only(old, old)
    if not isinstance(state, dict) or state.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{old}: not a {LEGACY_FORMAT} checkpoint")
    check_finite(state, old)
    model_from_checkpoint(state, old)
    save_checkpoint(Path(new), {**state, "format": CHECKPOINT_FORMAT})


def main(argv: list[str] | None = None) -> int:
    """``--upgrade OLD NEW``; exit status 2 with a one-line error when the old file is refused."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upgrade", nargs=2, type=Path, metavar=("OLD", "NEW"), required=True,
                        help="re-save a format-1 checkpoint with a content hash")
    args = parser.parse_args(argv)
    try:
        upgrade(*args.upgrade)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.upgrade[1]} ({CHECKPOINT_FORMAT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
