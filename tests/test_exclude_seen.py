"""train.exclude_seen decided from the data: preprocessing records how many playlists repeat a
song, training resolves ``auto`` from it (an override wins), the checkpoint carries the
decision, and evaluation, the Recommender and the service default to it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from training_support import N_SONGS, make_encoders, tiny_config

import sample
from checkpoint import load_checkpoint, load_model, save_checkpoint
from config import Config, Settings
from flask_app import EXTENSION_KEY, create_app
from npz_files import write_npz
from preprocessing import format_summary, preprocess
from preprocessing_utils import FIRST_SONG_INDEX, load_training_file, save_training_file
from recommender import Recommender
from train import train


def walks(n_playlists: int, repeating: int) -> list[list[int]]:
    """Song tokens of playlists that walk to the next song; the first ``repeating`` of them
    come back to their first song at the end."""
    rng = np.random.default_rng(3)
    playlists = []
    for index in range(n_playlists):
        start, length = int(rng.integers(0, N_SONGS)), int(rng.integers(4, 12))
        walk = [(start + step) % N_SONGS + FIRST_SONG_INDEX for step in range(length)]
        playlists.append(walk + walk[:1] if index < repeating else walk)
    return playlists


def write_playlists(folder: Path, playlists: list[list[int]]) -> Path:
    """A training folder (tiny encoders) holding ``playlists``, as preprocessing writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(songs) for songs in playlists])])
    save_training_file(folder, np.arange(1, len(playlists) + 1), offsets,
                       np.concatenate(playlists))
    make_encoders().save(folder / "encoders")
    return folder


@pytest.mark.parametrize(("repeating", "excluded"), [(0, True), (1, True), (2, False)])
def test_preprocessing_records_the_repeat_share_and_says_the_default(
        tmp_path: Path, repeating: int, excluded: bool) -> None:
    # 1 of 101 playlists (0.99%) is under the 1% limit, 2 of 101 are not
    rows = [(playlist, pos, 100 + song) for playlist, songs in enumerate(walks(101, repeating))
            for pos, song in enumerate(songs)]
    tables = tmp_path / "tables"
    tables.mkdir()
    pd.DataFrame(rows, columns=["playlist_id", "pos", "song_id"]).to_csv(
        tables / "playlist_songs.csv", index=False)
    summary = preprocess("csv", tmp_path / "out", data_dir=tables)
    assert summary["repeat_share"] == pytest.approx(repeating / 101)
    assert summary["exclude_seen_default"] is excluded
    assert ("excluded from" if excluded else "kept in") in format_summary(summary)
    assert load_training_file(tmp_path / "out").repeat_share == pytest.approx(repeating / 101)


@pytest.mark.parametrize(("repeating", "setting", "excluded"), [
    (0, "auto", True), (12, "auto", False), (12, "true", True), (0, "false", False)],
    ids=["no-repeats", "repeats", "override-exclude", "override-keep"])
def test_the_checkpoint_carries_the_decision_to_evaluation_and_the_recommender(
        tmp_path: Path, repeating: int, setting: str, excluded: bool) -> None:
    data = write_playlists(tmp_path / "data", walks(120, repeating))
    config = tiny_config(data, tmp_path / "run", **{"train.epochs": 1,
                                                    "train.exclude_seen": setting})
    train(config, progress=False)
    loaded = load_model(tmp_path / "run" / "best.pt")
    assert loaded.config.train.exclude_seen == ("true" if excluded else "false")
    assert loaded.exclude_seen is excluded
    assert sample.run_evaluate(tmp_path / "run" / "best.pt", data, "test", None,
                               0)["exclude_seen"] is excluded
    assert sample.run_evaluate(tmp_path / "run" / "best.pt", data, "test", not excluded,
                               0)["exclude_seen"] is not excluded
    recommender = Recommender.from_checkpoint(tmp_path / "run" / "best.pt")
    playlist = [int(song) for song in make_encoders().song_ids[:5]]
    answer = recommender.recommend([playlist], k=N_SONGS)[0]
    assert answer.song_ids == recommender.recommend([playlist], k=N_SONGS,
                                                    exclude_seen=excluded)[0].song_ids
    assert bool(set(answer.song_ids) & set(playlist)) is not excluded


def test_an_old_training_file_and_an_old_config_still_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = write_playlists(tmp_path / "data", walks(120, 12))
    arrays = np.load(data / "training.npz")
    write_npz(data / "training.npz", {name: arrays[name]
                                      for name in ("playlist_ids", "offsets", "songs")})
    assert load_training_file(data).repeat_share is None
    with caplog.at_level(logging.WARNING):
        train(tiny_config(data, tmp_path / "run", **{"train.epochs": 1}), progress=False)
    assert "does not record how many playlists repeat a song" in caplog.text
    assert load_model(tmp_path / "run" / "best.pt").exclude_seen is True
    stored = Config().to_dict()
    for old, decided in ((True, "true"), (False, "false")):
        stored["train"]["exclude_seen"] = old
        assert Config.from_dict(stored).train.exclude_seen == decided


def keeping_checkpoint(checkpoint: Path, folder: Path) -> Path:
    """The service tests' checkpoint with its decision turned to keeping seen songs."""
    state = load_checkpoint(checkpoint)
    state["config"]["train"]["exclude_seen"] = "false"
    path = folder / "keeps-seen.pt"
    save_checkpoint(path, state)
    return path


def test_the_service_default_follows_the_checkpoint(
        demo_dsn: str, checkpoint: Path, tmp_path: Path) -> None:
    # songs the model ranks high whatever comes before them, so keeping them shows
    first = Recommender.from_checkpoint(checkpoint).recommend(
        [[int(load_model(checkpoint).encoders.song_ids[0])]], k=8, exclude_seen=False)[0]
    songs = first.song_ids
    for path, excluded in ((checkpoint, True), (keeping_checkpoint(checkpoint, tmp_path), False)):
        settings = replace(Settings.from_env({}), database_url=demo_dsn, model_path=path)
        app = create_app(settings)
        try:
            client = app.test_client()
            answers = [client.post("/recommendations", json={"song_ids": songs, "k": 20,
                                                             **extra}).json
                       for extra in ({}, {"exclude_seen": None}, {"exclude_seen": excluded})]
            ranked = [[item["song_id"] for item in answer["recommendations"]]
                      for answer in answers]
            assert ranked[0] == ranked[1] == ranked[2]
            assert bool(set(ranked[0]) & set(songs)) is not excluded
        finally:
            app.extensions[EXTENSION_KEY].database.close()
