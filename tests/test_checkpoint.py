"""Checkpoints: safe loading, what they carry, atomic saving and the one checkpoint → model path."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_support import SONG_IDS, make_encoders, tiny_config, write_data

import checkpoint as checkpoint_module
import train as train_module
from checkpoint import (
    CHECKPOINT_FORMAT,
    LEGACY_FORMAT,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from config import Config
from sample import run_evaluate
from train import train

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    envelope = torch.load(trained / "best.pt", weights_only=True)
    assert set(envelope) == {"format", "sha256", "state"}
    assert envelope["format"] == CHECKPOINT_FORMAT
    checkpoint = torch.load(io.BytesIO(envelope["state"].numpy().tobytes()), weights_only=True)
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


def test_weights_of_another_shape_are_refused_naming_the_tensor_and_both_shapes(
    trained: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 F9: the message was load_state_dict's, several lines (the service kept one)."""
    checkpoint = load_checkpoint(trained / "best.pt")
    checkpoint["config"]["model"]["d_ff"] = 64
    path = tmp_path / "reshaped.pt"
    save_checkpoint(path, checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    assert ("tensor blocks.0.feed_forward.0.weight has shape (32, 32) in the checkpoint, but "
            "the network of its config needs (64, 32)") in message
    assert message.startswith(str(path))
    assert train_module.main(["--evaluate", str(path), "--data", str(data_dir)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


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


def save_unchecked(path: Path, state: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """save_checkpoint without its finiteness check, as a writer before issue 15 saved."""
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint_module, "first_non_finite", lambda state: None, raising=False)
        save_checkpoint(path, state)


def test_non_finite_weights_are_refused_on_load_naming_the_tensor(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 F1: best.pt with NaN weights loaded, evaluated (all 1.0) and served."""
    checkpoint = load_checkpoint(trained / "best.pt")
    name = next(key for key in checkpoint["model"] if key.endswith(".bias"))
    checkpoint["model"][name][1] = float("nan")
    path = tmp_path / "nan.pt"
    save_unchecked(path, checkpoint, monkeypatch)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor model[{name!r}] holds NaN")):
        load_model(path)
    checkpoint["model"][name][1] = float("inf")
    save_unchecked(path, checkpoint, monkeypatch)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        load_checkpoint(path)


def test_a_non_finite_state_is_never_saved(trained: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained / "best.pt")
    checkpoint["model"]["output_norm.weight"] = torch.full((3,), float("-inf"))
    with pytest.raises(CheckpointError,
                       match=re.escape("not saved: tensor model['output_norm.weight'] holds NaN")):
        save_checkpoint(tmp_path / "best.pt", checkpoint)
    assert not (tmp_path / "best.pt").exists()


def test_any_4_kib_xor_in_best_pt_is_refused_naming_the_file(
    trained: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Issue 15 F8: 4 KiB XOR-ed into best.pt still loaded, evaluated and served."""
    original = (trained / "best.pt").read_bytes()
    path = tmp_path / "damaged.pt"
    starts = [*range(0, len(original) - 4096, 4096), len(original) - 4096]
    for start in starts:
        block = bytes(byte ^ 0x5A for byte in original[start : start + 4096])
        path.write_bytes(original[:start] + block + original[start + 4096 :])
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_model(path)
    assert len(starts) > 5
    completed = subprocess.run(
        [sys.executable, "train.py", "--evaluate", str(path), "--data", str(data_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"error: {path}") and "Traceback" not in completed.stderr


def test_a_flipped_weight_byte_fails_the_hash(trained: Path, tmp_path: Path) -> None:
    """One changed byte inside the serialized state: the digest, not the parser, catches it."""
    envelope = torch.load(trained / "best.pt", weights_only=True)
    envelope["state"][len(envelope["state"]) // 2] ^= 1
    path = tmp_path / "flipped.pt"
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "directory"])
def test_unreadable_files_exit_2_with_one_line_naming_the_file(
    trained: Path, data_dir: Path, tmp_path: Path, damage: str
) -> None:
    """Issue 15 F9: a broken checkpoint is an error naming the file, never a traceback."""
    path = tmp_path / "broken.pt"
    original = (trained / "best.pt").read_bytes()
    if damage == "directory":
        path.mkdir()
    else:
        path.write_bytes({"truncated": original[: len(original) // 2], "empty": b"",
                          "garbage": bytes(range(256)) * 64}[damage])
    sequence = tmp_path / "sequence.csv"
    sequence.write_text(f"pos,song_id\n0,{SONG_IDS[0]}\n")
    for command in (["--evaluate", str(path), "--data", str(data_dir)],
                    ["--recommend", str(path), "--sequence", str(sequence)]):
        completed = subprocess.run([sys.executable, "train.py", *command], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=300, check=False)
        assert completed.returncode == 2, completed.stderr
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines


def test_a_legacy_checkpoint_is_refused_and_upgrade_re_saves_it(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Format 1 had no hash: refused with what to do; ``checkpoint.py --upgrade`` re-saves it."""
    state = {**load_checkpoint(trained / "best.pt"), "format": LEGACY_FORMAT}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(CheckpointError, match=r"has no content hash .* retrain, or re-save it"):
        load_model(old)
    new = tmp_path / "new.pt"
    completed = subprocess.run([sys.executable, "checkpoint.py", "--upgrade", str(old), str(new)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    upgraded = load_model(new)
    for name, value in load_model(trained / "best.pt").model.state_dict().items():
        assert torch.equal(upgraded.model.state_dict()[name], value), name
    name = next(key for key in state["model"] if key.endswith(".bias"))
    state["model"][name][0] = float("nan")
    torch.save(state, old)
    assert checkpoint_module.main(["--upgrade", str(old), str(tmp_path / "nan.pt")]) == 2
    assert not (tmp_path / "nan.pt").exists()
