"""Approximate retrieval: the exact answer when the shortlist covers it, exclude-seen and the side
pointer as in exact mode, the saved index checked against its checkpoint, ``auto`` by size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from training_support import SONG_IDS, make_encoders, tiny_config, write_data

import retrieval
from checkpoint import build_model
from preprocessing_utils import FIRST_SONG_INDEX
from recommender import NonFiniteScores, Recommender
from retrieval import index_files, resolve_index_mode
from train import train

PLAYLISTS = [[int(song) for song in SONG_IDS[rows]]
             for rows in ([4, 9, 2, 17, 5], [0], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [3, 3])]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


@pytest.fixture(scope="module")
def checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a short training, side pointer on (the demo preset's)."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data_dir, run_dir, **{"train.epochs": 2}), progress=False)
    return run_dir / "best.pt"


def pair(
    data_dir: Path, side_pointer: bool, seen_bias: float | None = None,
    pointer_gate: float | None = None,
) -> tuple[Recommender, Recommender]:
    """An exact and an approximate Recommender over the same random model (with ``seen_bias``,
    the model's seen bias set to that value; with ``pointer_gate``, the pointer's gate bias)."""
    encoders = make_encoders()
    torch.manual_seed(5)
    overrides = {"model.side_pointer": side_pointer, "model.seen_bias": seen_bias is not None}
    model = build_model(tiny_config(data_dir, data_dir, **overrides), encoders).eval()
    if seen_bias is not None:
        with torch.no_grad():
            model.seen_song_bias.fill_(seen_bias)
    if pointer_gate is not None:
        with torch.no_grad():
            model.pointer_gate.bias.fill_(pointer_gate)
    popularity = torch.ones(encoders.n_song_tokens)
    return (Recommender(model, encoders, popularity, "test", index="exact"),
            Recommender(model, encoders, popularity, "test", index="approximate"))


@pytest.mark.parametrize("side_pointer", [False, True])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_approximate_gives_the_exact_answer_when_the_shortlist_covers_it(
    data_dir: Path, side_pointer: bool, exclude_seen: bool
) -> None:
    exact, approximate = pair(data_dir, side_pointer)
    assert approximate.approximate is not None and approximate.scoring_matrix is None
    for k in (1, 5, 40):
        expected = exact.recommend(PLAYLISTS, k=k, exclude_seen=exclude_seen)
        found = approximate.recommend(PLAYLISTS, k=k, exclude_seen=exclude_seen)
        for mine, truth in zip(found, expected, strict=True):
            assert mine.song_ids == truth.song_ids
            # the shortlist is the whole catalog here, so the softmax's normalizer is exact too
            assert mine.scores == pytest.approx(truth.scores, rel=1e-4)


@pytest.mark.parametrize("side_pointer", [False, True])
def test_seen_songs_are_excluded_after_a_short_retrieval(
    data_dir: Path, side_pointer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no margin the shortlist is k + the playlist's length: after dropping the seen
    songs, k remain, none of them seen, and they are exact mode's; their probabilities too,
    since the normalizer's sample of the songs not re-scored is this small catalog whole."""
    monkeypatch.setattr(retrieval, "SHORTLIST_MARGIN", 0)
    exact, approximate = pair(data_dir, side_pointer)
    for playlist in PLAYLISTS:
        found = approximate.recommend([playlist], k=3)[0]
        truth = exact.recommend([playlist], k=3)[0]
        assert len(found.song_ids) == 3 and not set(found.song_ids) & set(playlist)
        assert found.song_ids == truth.song_ids
        assert found.scores == pytest.approx(truth.scores, rel=1e-4)


def test_a_positive_seen_bias_brings_the_playlists_songs_back_into_a_short_retrieval(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index knows nothing of the seen bias: the input's songs are merged into the
    shortlist and re-scored with it, so a large bias puts them first, as in exact mode; with
    seen songs excluded none of them is shown, as in exact mode."""
    monkeypatch.setattr(retrieval, "SHORTLIST_MARGIN", 0)
    exact, approximate = pair(data_dir, side_pointer=False, seen_bias=50.0)
    for playlist in PLAYLISTS:
        found = approximate.recommend([playlist], k=3, exclude_seen=False)[0]
        assert found.song_ids == exact.recommend([playlist], k=3, exclude_seen=False)[0].song_ids
        assert set(found.song_ids[:len(set(playlist))]) <= set(playlist)
        kept_out = approximate.recommend([playlist], k=3, exclude_seen=True)[0]
        truth = exact.recommend([playlist], k=3, exclude_seen=True)[0]
        assert kept_out.song_ids == truth.song_ids and not set(kept_out.song_ids) & set(playlist)
        assert kept_out.scores == pytest.approx(truth.scores, rel=1e-4)


def test_songs_only_the_pointer_lifts_are_merged_into_a_short_retrieval(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index knows nothing of the pointer's copy scores: the songs it scores are merged
    into the shortlist and re-scored with them, so with large gates the top songs are the
    pointer's, as in exact mode."""
    monkeypatch.setattr(retrieval, "SHORTLIST_MARGIN", 0)
    exact, approximate = pair(data_dir, side_pointer=True, pointer_gate=12.0)
    model = approximate.model
    for playlist in PLAYLISTS:
        found = approximate.recommend([playlist], k=3, exclude_seen=False)[0]
        assert found.song_ids == exact.recommend([playlist], k=3, exclude_seen=False)[0].song_ids
        tokens = torch.from_numpy(approximate.encoders.encode_songs(playlist))
        top = torch.from_numpy(approximate.encoders.encode_songs(found.song_ids))
        related = (torch.isin(model.song_artist[top], model.song_artist[tokens])
                   | torch.isin(model.song_album[top], model.song_album[tokens])
                   | torch.isin(top, model.song_successor[tokens]))
        assert related.all()


def test_a_playlist_holding_the_whole_catalog_gets_no_songs_in_either_mode(
    data_dir: Path,
) -> None:
    """Every candidate is excluded as seen: an empty answer, as in exact mode, not an error."""
    every = [int(song) for song in SONG_IDS]
    for recommender in pair(data_dir, side_pointer=True):
        assert recommender.recommend([every], k=3)[0].song_ids == []


def test_a_saved_index_is_reused_and_a_stale_or_foreign_one_rebuilt(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index_path, record_path = index_files(checkpoint)
    index_path.unlink(missing_ok=True)
    record_path.unlink(missing_ok=True)
    first = Recommender.from_checkpoint(checkpoint, index="approximate")
    assert first.approximate is not None and first.approximate.build_seconds > 0
    assert index_path.is_file() and record_path.is_file()
    record = json.loads(record_path.read_text())
    again = Recommender.from_checkpoint(checkpoint, index="approximate")
    assert again.approximate is not None and again.approximate.build_seconds == 0
    expected = first.recommend(PLAYLISTS, k=5)
    assert [r.song_ids for r in again.recommend(PLAYLISTS, k=5)] == [r.song_ids for r in expected]

    stale = {**record, "checkpoint_sha256": "0" * 64}
    foreign = index_path.read_bytes()[:-8] + b"\0" * 8
    for damage, reason in ((lambda: record_path.write_text(json.dumps(stale)),
                            "built for another checkpoint"),
                           (lambda: index_path.write_bytes(foreign), "do not match"),
                           (lambda: record_path.write_text("{not json"), "unreadable")):
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retrieval"):
            rebuilt = Recommender.from_checkpoint(checkpoint, index="approximate")
        assert reason in caplog.text and "rebuilding" in caplog.text
        assert rebuilt.approximate is not None and rebuilt.approximate.build_seconds > 0
        assert json.loads(record_path.read_text())["index_sha256"] == record["index_sha256"]
        assert [r.song_ids for r in rebuilt.recommend(PLAYLISTS, k=5)] == [
            r.song_ids for r in expected]


def test_auto_picks_the_index_by_catalog_size(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threshold = retrieval.AUTO_MIN_SONGS
    assert resolve_index_mode("auto", threshold - 1) == "exact"
    assert resolve_index_mode("auto", threshold) == "approximate"
    assert resolve_index_mode("exact", 10 * threshold) == "exact"
    assert resolve_index_mode("approximate", 10) == "approximate"
    with pytest.raises(ValueError, match="index must be one of exact, approximate, auto"):
        resolve_index_mode("hnsw", 10)
    encoders = make_encoders()
    model = build_model(tiny_config(data_dir, data_dir), encoders).eval()
    popularity = torch.ones(encoders.n_song_tokens)
    assert Recommender(model, encoders, popularity, "t", index="auto").index_mode == "exact"
    monkeypatch.setattr(retrieval, "AUTO_MIN_SONGS", encoders.n_songs)
    assert Recommender(model, encoders, popularity, "t", index="auto").index_mode == "approximate"


def test_non_finite_scores_raise_in_approximate_mode_too(data_dir: Path) -> None:
    encoders = make_encoders()
    model = build_model(tiny_config(data_dir, data_dir), encoders).eval()
    with torch.no_grad():
        model.output_bias[FIRST_SONG_INDEX + 7] = float("nan")
    recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "broken",
                              index="approximate")
    with pytest.raises(NonFiniteScores, match="for 2 of 3") as caught:
        recommender.recommend([PLAYLISTS[0], [], PLAYLISTS[0]], k=5)
    assert caught.value.playlists == [0, 2]
    assert len(recommender.recommend([[123]], k=5)[0].song_ids) == 5
