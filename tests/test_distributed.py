"""torchrun: two CPU processes (gloo) train as one process on the same global batch, and a run
killed mid-epoch resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_support import make_encoders, step_losses, tiny_config, tiny_overrides, write_data

from checkpoint import load_checkpoint
from train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
# no dropout: its masks are drawn per rank, so with dropout the runs differ by design
SETTINGS = {"model.dropout": 0.0, "train.epochs": 2}


def torchrun(data_dir: Path, run_dir: Path, *extra: str, **overrides: object) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node 2 train.py`` on the tiny settings (its own session)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(REPO_ROOT / "train.py"), "--preset", "demo",
               "--data", str(data_dir), "--run-dir", str(run_dir), "--quiet", *extra]
    for setting in tiny_overrides(data_dir, run_dir, **{**SETTINGS, **overrides}):
        command += ["--set", setting]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    """Wait for a torchrun started by ``torchrun``; its stdout, or fail with its stderr."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def descendants(pid: int) -> list[int]:
    """The ids of every process below ``pid`` (Linux /proc), children first."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    data_dir = write_data(tmp_path / "data", make_encoders(), n_playlists=128)
    single = tmp_path / "single"
    deterministic = {**SETTINGS, "model.song_dropout": 0.0}  # its masks differ between ranks
    train(tiny_config(data_dir, single, **deterministic), progress=False)
    double = tmp_path / "double"
    stdout = finish(torchrun(data_dir, double, **deterministic))
    assert len([line for line in stdout.splitlines() if line.startswith("{")]) == 1  # rank 0
    assert step_losses(double) == pytest.approx(step_losses(single), rel=1e-4)
    one, two = (load_checkpoint(folder / "last.pt") for folder in (single, double))
    assert one["progress"]["step"] == two["progress"]["step"] > 10
    for name, tensor in one["model"].items():
        other = two["model"][name]
        if name == "pointer_key.bias":  # softmax ignores a key bias: its gradient is only noise,
            continue  # which Adam's normalisation blows up to steps of lr in either run
        if name.endswith("attention.qkv.bias"):
            width = len(tensor) // 3
            tensor, other = (torch.cat([t[:width], t[2 * width :]]) for t in (tensor, other))
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=name)
    epochs = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "epoch"]
    assert [record["epoch"] for record in epochs] == [1, 2]  # validated once per epoch
    assert len(list(double.glob("events.out.tfevents.*"))) == 1


def test_a_torchrun_killed_mid_epoch_resumes_where_its_checkpoint_left_off(
    tmp_path: Path,
) -> None:
    data_dir = write_data(tmp_path / "data", make_encoders(), n_playlists=1400)
    settings = {"train.epochs": 3}
    straight = tmp_path / "straight"
    finish(torchrun(data_dir, straight, **settings))
    killed = tmp_path / "killed"
    process = torchrun(data_dir, killed, **settings)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(json.loads(line)["epoch"] == 2 for line in lines if line.endswith("}")):
            break
        time.sleep(0.01)
    for pid in [*descendants(process.pid), process.pid]:  # torchrun's workers: own sessions
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert load_checkpoint(killed / "last.pt")["progress"]["epoch"] == 1  # killed in epoch 2
    finish(torchrun(data_dir, killed, "--resume", **settings))
    assert step_losses(killed) == pytest.approx(step_losses(straight), rel=1e-6)
    assert load_checkpoint(killed / "last.pt")["progress"]["epoch"] == 3
