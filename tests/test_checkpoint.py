"""Checkpoints: safe loading, what they carry, atomic saving and the one checkpoint → model path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_support import make_encoders, tiny_config, write_data

import train as train_module
from checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from config import Config
from train import run_evaluate, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a finished two-epoch training."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data_dir, run_dir, **{"train.epochs": 2}), progress=False)
    return run_dir


def test_checkpoint_loads_with_weights_only_and_carries_what_serving_needs(trained: Path) -> None:
    checkpoint = torch.load(trained / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "config", "encoders",
            "encoders_fingerprint", "popularity", "model_version"} <= set(checkpoint)
    assert Config.from_dict(checkpoint["config"]).model.d_song == 16
    assert isinstance(checkpoint["model_version"], str)


def test_load_model_gives_the_trained_network_in_eval_mode(trained: Path) -> None:
    loaded = load_model(trained / "best.pt")
    checkpoint = load_checkpoint(trained / "best.pt")
    assert not loaded.model.training
    assert loaded.encoders.fingerprint == checkpoint["encoders_fingerprint"]
    assert loaded.model_version == checkpoint["model_version"]
    assert loaded.config.model.d_song == 16
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name


def test_load_model_accepts_the_same_encoders_and_refuses_others(trained: Path) -> None:
    assert load_model(trained / "best.pt", make_encoders()).encoders.n_songs == 30
    with pytest.raises(CheckpointError, match="song indices would mean different songs"):
        load_model(trained / "best.pt", make_encoders(shift=1.0), where="elsewhere/encoders")
    with pytest.raises(CheckpointError, match="elsewhere/encoders"):
        load_model(trained / "best.pt", make_encoders(shift=1.0), where="elsewhere/encoders")


def test_checkpoint_against_other_encoders_fails_clearly(trained: Path, tmp_path: Path) -> None:
    other = write_data(tmp_path / "other", make_encoders(shift=1.0))
    with pytest.raises(CheckpointError, match="encoders"):
        run_evaluate(trained / "best.pt", other, "test", None, 0)
    assert train_module.main(["--evaluate", str(trained / "best.pt"), "--data", str(other)]) == 2


def test_resume_against_other_encoders_is_refused(trained: Path, tmp_path: Path) -> None:
    other = write_data(tmp_path / "other", make_encoders(shift=1.0))
    config = tiny_config(other, trained, **{"train.epochs": 3})
    with pytest.raises(CheckpointError, match="encoders"):
        train(config, resume=True, progress=False)


def test_embedded_encoders_that_do_not_match_their_fingerprint_are_refused(
    trained: Path, tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(trained / "best.pt")
    checkpoint["encoders"]["song_ids"] = checkpoint["encoders"]["song_ids"] + 1
    save_checkpoint(tmp_path / "tampered.pt", checkpoint)
    with pytest.raises(CheckpointError, match="do not match their fingerprint"):
        load_model(tmp_path / "tampered.pt")


def test_weights_of_another_shape_are_refused(trained: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained / "best.pt")
    checkpoint["config"]["model"]["d_ff"] = 64
    save_checkpoint(tmp_path / "reshaped.pt", checkpoint)
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_model(tmp_path / "reshaped.pt")


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a Bert4MusicRec checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary(
    trained: Path, tmp_path: Path
) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, load_checkpoint(trained / "best.pt"))
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"format": "x", "thing": Unsaveable()})
    assert path.read_bytes() == before
    assert sorted(item.name for item in tmp_path.iterdir()) == ["best.pt"]


def test_build_model_copies_the_encoders_side_tables() -> None:
    encoders = make_encoders()
    config = tiny_config(Path("unused"), Path("unused"))
    model = build_model(config, encoders)
    assert model.n_song_tokens == encoders.n_song_tokens
    assert torch.equal(model.song_album, torch.from_numpy(encoders.song_album))
