"""Training runs, resume, logs, progress output and the CLI of train.py on tiny data."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_support import make_encoders, step_losses, tiny_config, tiny_overrides, write_data

import train as train_module
from recommender import Recommender
from train import EpochStats, TrainingDiverged, prepare_run, train, validate_and_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a finished six-epoch training."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data_dir, run_dir, **{"train.epochs": 6}), progress=False)
    return run_dir


def test_training_writes_checkpoints_and_logs_and_the_loss_falls(trained: Path) -> None:
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        assert (trained / name).is_file()
    assert list(trained.glob("events.out.tfevents.*"))
    losses = step_losses(trained)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    epochs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "epoch"]
    assert [record["epoch"] for record in epochs] == list(range(1, 7))
    assert {"val_ndcg@10", "val_hr@10", "train_loss"} <= set(epochs[0])


def test_resume_gives_the_same_next_step_loss(data_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(data_dir, straight), progress=False)
    interrupted = tmp_path / "interrupted"
    config = tiny_config(data_dir, interrupted)
    train(config, progress=False, stop_after=1)
    steps_per_epoch = len(step_losses(interrupted))
    train(config, resume=True, progress=False)
    expected, resumed = step_losses(straight), step_losses(interrupted)
    assert len(resumed) == len(expected)
    assert resumed[steps_per_epoch] == pytest.approx(expected[steps_per_epoch], rel=1e-6)
    assert resumed == pytest.approx(expected, rel=1e-5)


def test_a_fresh_run_starts_new_logs_in_a_used_run_dir(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "reused"
    config = tiny_config(data_dir, run_dir, **{"train.epochs": 2})
    train(config, progress=False)
    first = step_losses(run_dir)
    train(config, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records if record["type"] == "epoch"] == [1, 2]
    assert step_losses(run_dir) == first
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


def test_same_seed_repeats_the_run(data_dir: Path, tmp_path: Path) -> None:
    for name in ("one", "two"):
        train(tiny_config(data_dir, tmp_path / name, **{"train.epochs": 1}), progress=False)
    assert step_losses(tmp_path / "one") == step_losses(tmp_path / "two")


def test_evaluate_prints_a_table_and_one_json_line(
    trained: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train_module.main(["--evaluate", str(trained / "best.pt"), "--data",
                              str(data_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "most_popular" in "\n".join(lines[:-1])
    results = json.loads(lines[-1])
    for name in ("model", "most_popular", "transition"):
        assert set(results[name]) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"}
    assert results["model"]["hr@10"] > results["most_popular"]["hr@10"]


@pytest.mark.parametrize("variant", [{"model.tie_head": False},
                                     {"model.positional": "sinusoidal"},
                                     {"model.side_features": False},
                                     {"data.split_protocol": "leave_one_out"}])
def test_variants_train_and_serve(
    data_dir: Path, tmp_path: Path, variant: dict[str, object]
) -> None:
    summary = train(tiny_config(data_dir, tmp_path, **{"train.epochs": 1}, **variant),
                    progress=False)
    assert summary["epochs"] == 1
    result = Recommender.from_checkpoint(tmp_path / "best.pt").recommend([[5000]], k=3,
                                                                         exclude_seen=True)[0]
    assert len(result.song_ids) == 3 and 5000 not in result.song_ids


def test_data_without_side_information_trains_and_serves(tmp_path: Path) -> None:
    data = write_data(tmp_path / "ids_only", make_encoders(side_info=False))
    train(tiny_config(data, tmp_path / "run", **{"train.epochs": 1}), progress=False)
    result = Recommender.from_checkpoint(tmp_path / "run" / "best.pt").recommend([[5007]], k=2)
    assert len(result[0].song_ids) == 2


def test_recommend_cli_prints_the_sequence_and_top_k(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sequence = tmp_path / "sequence.csv"
    sequence.write_text("pos,song_id\n1,5007\n0,5000\n2,999\n")
    assert train_module.main(["--recommend", str(trained / "best.pt"), "--sequence",
                              str(sequence), "--k", "4"]) == 0
    output = capsys.readouterr().out
    assert "Top 4 next songs" in output and "999" in output
    assert output.index("5000") < output.index("5007")


def test_progress_off_a_terminal_is_one_line_per_epoch(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under capture stderr is no terminal, as in CI or a log file: no bar, no carriage returns."""
    train(tiny_config(data_dir, tmp_path, **{"train.epochs": 3}), progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    assert "batch/s" not in captured.err
    lines = captured.out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all("val ndcg@10" in line for line in lines)


def test_a_diverging_run_exits_with_an_error_naming_the_step_and_saves_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    """Issue 15 F1: lr=1e12 used to exit 0 with best_val_ndcg@10 1.0 and NaN weights in best.pt."""
    run_dir = tmp_path / "diverged"
    settings = tiny_overrides(data_dir, run_dir, **{"train.epochs": 1, "train.lr": 1e12})
    command = [sys.executable, "train.py", "--preset", "demo", "--data", str(data_dir),
               "--run-dir", str(run_dir), "--quiet", "--threads", "1"]
    for setting in settings:
        command += ["--set", setting]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300, check=False)
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr
    assert re.search(r"^error: training diverged in epoch 1 at step \d+: the loss is nan",
                     completed.stderr, re.MULTILINE), completed.stderr
    assert "best_val_ndcg" not in completed.stdout
    assert not (run_dir / "best.pt").exists() and not (run_dir / "last.pt").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "diverged"


def test_non_finite_weights_are_never_validated_or_saved(data_dir: Path, tmp_path: Path) -> None:
    """Weights gone NaN in an epoch's last step (finite loss) stop the run before any save."""
    run = prepare_run(tiny_config(data_dir, tmp_path, **{"train.epochs": 1}))
    with torch.no_grad():
        run.model.output_bias[5] = float("nan")
    stats = EpochStats(loss=1.0, samples=1, train_seconds=1.0, started=0.0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 at step 0: weight .*bias.* not finite"):
        validate_and_checkpoint(run, stats, writer=None, progress=False)
    assert run.state["best_ndcg"] == -1.0
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
