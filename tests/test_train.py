"""Training runs, checkpoints, resume, encoder checks, the Recommender and the CLI on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_module
from config import Config, load_config
from model import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX
from preprocessing_utils import NUMERIC_COLUMNS, Encoders, save_training_file
from train import (
    CheckpointError,
    Recommender,
    build_model,
    load_checkpoint,
    run_evaluate,
    top_k,
    train,
)

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


def tiny_config(data_dir: Path, run_dir: Path, **overrides: object) -> Config:
    """A model and schedule small enough for a test."""
    values = {"data.seq_len": 8, "model.d_song": 16, "model.d_album": 8, "model.d_artist": 8,
              "model.d_ff": 32, "model.n_layers": 1, "model.dropout": 0.1, "train.batch_size": 16,
              "train.eval_batch_size": 32, "train.epochs": 3, "train.lr": 0.01,
              "train.log_every": 1, "train.patience": 10, "paths.data_dir": str(data_dir),
              "paths.run_dir": str(run_dir)}
    values.update({key: str(value) for key, value in overrides.items()})
    return load_config("demo", overrides=[f"{key}={value}" for key, value in values.items()])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a finished three-epoch training."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data_dir, run_dir, **{"train.epochs": 6}), progress=False)
    return run_dir


def step_losses(run_dir: Path) -> list[float]:
    """The per-step losses logged in metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["type"] == "step"]


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


def test_checkpoint_loads_with_weights_only_and_carries_what_serving_needs(trained: Path) -> None:
    checkpoint = torch.load(trained / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "config", "encoders",
            "encoders_fingerprint", "popularity", "model_version"} <= set(checkpoint)
    assert Config.from_dict(checkpoint["config"]).model.d_song == 16
    assert isinstance(checkpoint["model_version"], str)


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


def test_checkpoint_against_other_encoders_fails_clearly(trained: Path, tmp_path: Path) -> None:
    other = write_data(tmp_path / "other", make_encoders(shift=1.0))
    with pytest.raises(CheckpointError, match="encoders"):
        run_evaluate(trained / "best.pt", other, "test", None, 0)
    assert train_module.main(["--evaluate", str(trained / "best.pt"), "--data", str(other)]) == 2


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a Bert4MusicRec checkpoint"):
        load_checkpoint(path)


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


def test_recommender_returns_catalog_ids_and_honours_exclude_seen(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    assert recommender.n_songs == N_SONGS
    playlist = [int(song) for song in SONG_IDS[3:8]]
    seen = recommender.recommend([playlist], k=N_SONGS, exclude_seen=True)[0]
    assert len(seen.song_ids) == N_SONGS - 5
    assert not set(seen.song_ids) & set(playlist)
    assert set(seen.song_ids) <= set(SONG_IDS.tolist())
    assert seen.scores == sorted(seen.scores, reverse=True)
    everything = recommender.recommend([playlist], k=N_SONGS, exclude_seen=False)[0]
    assert sorted(everything.song_ids) == sorted(SONG_IDS.tolist())
    assert sum(everything.scores) == pytest.approx(1.0, abs=1e-4)


def test_recommender_reports_unknown_ids_and_falls_back_to_popular(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    known = [int(SONG_IDS[0]), int(SONG_IDS[1])]
    results = recommender.recommend([[*known, 123], [], [77, 78]], k=5)
    assert results[0].unknown_song_ids == [123]
    assert results[1].unknown_song_ids == [] and len(results[1].song_ids) == 5
    assert results[2].unknown_song_ids == [77, 78]
    assert results[1].song_ids == results[2].song_ids
    single = recommender.recommend([known], k=5)[0]
    assert results[0].song_ids == single.song_ids
    assert results[0].scores == pytest.approx(single.scores, rel=1e-5)
    with pytest.raises(ValueError):
        recommender.recommend([known], k=0)


@pytest.mark.parametrize("side_pointer", [False, True])
def test_recommendations_are_the_models_exhaustive_ranking(
    data_dir: Path, tmp_path: Path, side_pointer: bool
) -> None:
    """The fast path (no padding, last position only, cached head) ranks like the full pass."""
    config = tiny_config(data_dir, tmp_path, **{"model.side_pointer": side_pointer})
    encoders = make_encoders()
    torch.manual_seed(3)
    model = build_model(config, encoders).eval()
    recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "test")
    playlist = [int(song) for song in SONG_IDS[[4, 9, 2, 17, 5]]]
    result = recommender.recommend([playlist], k=8)[0]
    tokens = torch.from_numpy(encoders.encode_songs(playlist))
    inputs = torch.full((1, config.data.seq_len), PAD_INDEX, dtype=torch.long)
    inputs[0, -len(tokens) - 1 : -1] = tokens
    inputs[0, -1] = MASK_INDEX
    with torch.no_grad():
        if side_pointer:
            scores = model.predict_last(inputs)[0]
        else:
            scores = model.logits(model.encode(inputs)[0, -1])
    scores[tokens] = float("-inf")
    expected = torch.softmax(scores[FIRST_SONG_INDEX:], dim=0).topk(8)
    assert result.song_ids == SONG_IDS[expected.indices.numpy()].tolist()
    assert result.scores == pytest.approx(expected.values.tolist(), rel=1e-4)


@pytest.mark.parametrize(("rows", "width", "k"), [(1, 116_295, 10), (3, 20_000, 25),
                                                   (2, 1_000, 1), (2, 300, 100)])
def test_top_k_equals_a_full_sort(rows: int, width: int, k: int) -> None:
    """The block shortcut finds what topk finds, also in the ragged last block and past -inf."""
    generator = torch.Generator().manual_seed(width)
    scores = torch.randn(rows, width, generator=generator)
    scores[:, torch.randperm(width, generator=generator)[: width // 3]] = float("-inf")
    scores[0, -1] = 10.0
    scores[-1, :width // 2] = float("-inf")
    values, indices = top_k(scores, k)
    expected = scores.topk(k, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, expected.indices)


def test_batched_recommendations_equal_single_ones(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    playlists = [[int(song) for song in SONG_IDS[start : start + length]]
                 for start, length in ((0, 3), (5, 12), (20, 1), (2, 9))]
    batched = recommender.recommend(playlists, k=4)
    for playlist, result in zip(playlists, batched, strict=True):
        single = recommender.recommend([playlist], k=4)[0]
        assert result.song_ids == single.song_ids
        assert result.scores == pytest.approx(single.scores, rel=1e-4)


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
    result = Recommender.from_checkpoint(tmp_path / "best.pt").recommend([[5000]], k=3)[0]
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
