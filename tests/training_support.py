"""Tiny encoders, data and configs shared by the training, checkpoint and recommender tests,
and the demo-data generator loaded as a module."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from config import Config, load_config
from preprocessing_utils import FIRST_SONG_INDEX, NUMERIC_COLUMNS, Encoders, save_training_file

GENERATOR = Path(__file__).resolve().parents[1] / "demo data" / "generate.py"
N_SONGS = 30
SONG_IDS = np.arange(5000, 5000 + 7 * N_SONGS, 7, dtype=np.int64)


def make_encoders(side_info: bool = True, shift: float = 0.0) -> Encoders:
    """Encoders for 30 songs (catalog ids 5000, 5007, ...), 6 albums and 3 artists."""
    tokens = N_SONGS + FIRST_SONG_INDEX
    numeric = len(NUMERIC_COLUMNS)
    if not side_info:
        empty = np.zeros(0, dtype=np.int64)
        return Encoders(SONG_IDS, empty, empty, np.zeros(tokens, np.int64),
                        np.zeros(tokens, np.int64), np.zeros((tokens, 0), np.float32),
                        np.zeros(numeric), np.zeros(numeric), np.ones(numeric), False)
    song_album = np.concatenate([[0, 0], np.arange(N_SONGS) // 5 + 1])
    song_artist = np.concatenate([[0, 0], np.arange(N_SONGS) // 10 + 1])
    features = np.zeros((tokens, 21), np.float32)
    features[FIRST_SONG_INDEX:] = np.random.default_rng(0).normal(size=(N_SONGS, 21)) + shift
    return Encoders(SONG_IDS, np.arange(200, 206), np.arange(10, 13), song_album, song_artist,
                    features, np.zeros(numeric), np.zeros(numeric), np.ones(numeric), True)


def write_data(folder: Path, encoders: Encoders, n_playlists: int = 120) -> Path:
    """Playlists that mostly walk to the next song, as preprocessing.py would write them."""
    rng = np.random.default_rng(1)
    sequences = []
    for _ in range(n_playlists):
        song = int(rng.integers(0, N_SONGS))
        walk = []
        for _ in range(int(rng.integers(4, 14))):
            walk.append(song + FIRST_SONG_INDEX)
            song = (song + 1) % N_SONGS if rng.random() < 0.9 else int(rng.integers(0, N_SONGS))
        sequences.append(walk)
    offsets = np.concatenate([[0], np.cumsum([len(walk) for walk in sequences])])
    save_training_file(folder, np.arange(1, n_playlists + 1), offsets,
                       np.concatenate(sequences))
    encoders.save(folder / "encoders")
    return folder


def tiny_overrides(data_dir: Path, run_dir: Path, **overrides: object) -> list[str]:
    """``section.key=value`` settings of a model and schedule small enough for a test."""
    values = {"data.seq_len": 8, "model.d_song": 16, "model.d_album": 8, "model.d_artist": 8,
              "model.d_ff": 32, "model.n_layers": 1, "model.dropout": 0.1, "train.batch_size": 16,
              "train.eval_batch_size": 32, "train.epochs": 3, "train.lr": 0.01,
              "train.log_every": 1, "train.patience": 10, "paths.data_dir": str(data_dir),
              "paths.run_dir": str(run_dir)}
    values.update({key: str(value) for key, value in overrides.items()})
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(data_dir: Path, run_dir: Path, **overrides: object) -> Config:
    """A model and schedule small enough for a test (the demo preset with tiny_overrides)."""
    return load_config("demo", overrides=tiny_overrides(data_dir, run_dir, **overrides))


def step_losses(run_dir: Path) -> list[float]:
    """The per-step losses logged in metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["type"] == "step"]


def load_generator() -> ModuleType:
    """demo data/generate.py as a module (its folder name is no package name)."""
    if "generate" in sys.modules:
        return sys.modules["generate"]
    spec = importlib.util.spec_from_file_location("generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = module
    spec.loader.exec_module(module)
    return module
