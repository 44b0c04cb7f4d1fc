"""The plateau schedule halves the rate and stops on its own; the guards stop and keep the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_support import make_encoders, step_losses, tiny_config, write_data

from config import Config, ConfigError, TrainConfig
from recommender import Recommender
from schedule import Schedule
from train import train


def plateau(**values: object) -> tuple[Schedule, torch.optim.Optimizer]:
    """A plateau schedule over one parameter's optimizer."""
    settings = TrainConfig(schedule="plateau", lr=0.01, warmup_steps=4, patience=2, halvings=2)
    for name, value in values.items():
        setattr(settings, name, value)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    return Schedule(optimizer, settings, steps_per_epoch=10), optimizer


def test_plateau_warms_up_then_holds_the_peak_rate() -> None:
    schedule, optimizer = plateau()
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01])


def test_plateau_halves_after_patience_and_stops_after_the_last_halving() -> None:
    schedule, optimizer = plateau()
    for _ in range(4):
        schedule.step()
    decisions, rates = [], []
    for improved in [True, False, False, False, True, False, False, False, False]:
        decisions.append(schedule.validated(improved))
        rates.append(optimizer.param_groups[0]["lr"])
    # two checks without a better NDCG@10 halve the rate; a better one restarts that count but
    # not the halvings: the plateau after the second halving in all (halvings=2) ends the run,
    # even though a new best came between the two halvings.
    assert rates == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.0025, 0.0025,
                                   0.0025])
    assert decisions == [False] * 8 + [True]


def test_cosine_stops_after_patience_without_halving() -> None:
    schedule, optimizer = plateau(schedule="cosine", warmup_share=0.0)
    assert [schedule.validated(False) for _ in range(2)] == [False, True]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


def plateau_config(data_dir: Path, run_dir: Path, **overrides: object) -> Config:
    """The tiny test model under the plateau schedule."""
    return tiny_config(data_dir, run_dir, **{"train.schedule": "plateau",
                                             "train.warmup_steps": 5, **overrides})


def epoch_records(run_dir: Path) -> list[dict[str, float]]:
    """The epoch records of metrics.jsonl."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [record for record in records if record["type"] == "epoch"]


def test_the_time_limit_stops_training_and_keeps_a_usable_best(
    data_dir: Path, tmp_path: Path
) -> None:
    config = plateau_config(data_dir, tmp_path, **{"train.epochs": 50,
                                                   "train.max_minutes": 1e-6})
    summary = train(config, progress=False)
    assert summary["stop_reason"] == "train.max_minutes" and summary["stopped_early"]
    assert summary["epochs"] == 1 and summary["steps"] == 1
    result = Recommender.from_checkpoint(tmp_path / "best.pt").recommend([[5000]], k=3)[0]
    assert len(result.song_ids) == 3


def test_the_epoch_limit_stops_the_plateau_schedule(data_dir: Path, tmp_path: Path) -> None:
    summary = train(plateau_config(data_dir, tmp_path, **{"train.epochs": 2}), progress=False)
    assert (summary["epochs"], summary["stop_reason"], summary["stopped_early"]) == (
        2, "train.epochs", False)
    assert (tmp_path / "best.pt").is_file()


def test_a_plateau_run_resumes_exactly(data_dir: Path, tmp_path: Path) -> None:
    settings = {"train.epochs": 4, "train.patience": 1, "train.halvings": 5}
    train(plateau_config(data_dir, tmp_path / "straight", **settings), progress=False)
    interrupted = plateau_config(data_dir, tmp_path / "interrupted", **settings)
    train(interrupted, progress=False, stop_after=2)
    train(interrupted, resume=True, progress=False)
    assert step_losses(tmp_path / "interrupted") == pytest.approx(
        step_losses(tmp_path / "straight"), rel=1e-5)
    assert [record["lr"] for record in epoch_records(tmp_path / "interrupted")] == [
        record["lr"] for record in epoch_records(tmp_path / "straight")]


def test_resuming_under_another_schedule_names_the_setting(data_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(data_dir, tmp_path, **{"train.epochs": 1}), progress=False)
    with pytest.raises(ConfigError, match=r"train\.schedule.*'cosine'"):
        train(plateau_config(data_dir, tmp_path, **{"train.epochs": 2}), resume=True,
              progress=False)


def test_an_older_checkpoints_config_reads_as_the_cosine_schedule() -> None:
    values = Config().to_dict()
    for name in ("schedule", "warmup_steps", "halvings", "max_minutes"):
        del values["train"][name]
    assert Config.from_dict(values).train.schedule == "cosine"
