"""Cold start: songs added to the catalog after training are recommended without retraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from service_support import DEMO_DATA
from test_sampled_loss import cloze_batch, pointer_model, popularity
from training_support import make_encoders
from training_support import tiny_config as tiny_run_config

from checkpoint import build_model, load_checkpoint, load_model, save_checkpoint
from cold_start import (
    extend_checkpoint,
    extend_encoders,
    extend_model,
    extend_recommender,
    main,
    with_reserve,
)
from csv_tables import read_csv_songs
from preprocessing_utils import (
    FIRST_SONG_INDEX,
    NUMERIC_COLUMNS,
    RAW_FEATURE_FIELDS,
    DataError,
    Encoders,
)
from recommender import Recommender
from sampled_softmax import NegativeSampler
from train import main as train_main

NEW_SONG, NEW_ALBUM, NEW_ARTIST = 990_000_001, 880_000_001, 770_000_001


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    """The demo songs table as preprocessing reads it."""
    return read_csv_songs(DEMO_DATA / "songs.csv")


def album_run(catalog: pd.DataFrame, size: int = 6) -> pd.DataFrame:
    """The tracks, in order, of the first demo album with at least ``size`` songs."""
    counts = catalog["album_id"].value_counts()
    album = counts[counts >= size].index.sort_values()[0]
    return catalog[catalog["album_id"] == album].sort_values(["disc_number", "track_number"])


def new_rows(catalog: pd.DataFrame) -> pd.DataFrame:
    """Three new releases: the next track of an album, a new album of a known artist, and a
    new album of a new artist with NULL features."""
    tracks = album_run(catalog)
    rows = tracks.iloc[[-1, -1, -1]].copy()
    rows["song_id"] = [NEW_SONG, NEW_SONG + 1, NEW_SONG + 2]
    rows["track_number"] = [tracks["track_number"].max() + 1, 1, 1]
    rows["album_id"] = [rows["album_id"].iloc[0], NEW_ALBUM, NEW_ALBUM + 1]
    rows["artist_id"] = [rows["artist_id"].iloc[0], rows["artist_id"].iloc[0], NEW_ARTIST]
    rows.loc[rows.index[2], ["danceability", "energy", "tempo", "key"]] = np.nan
    return rows


@pytest.mark.parametrize("index", ["exact", "approximate"])
def test_a_new_release_is_recommended_after_its_album_mates_and_old_songs_keep_their_scores(
    checkpoint: Path, catalog: pd.DataFrame, index: str
) -> None:
    recommender = Recommender.from_checkpoint(checkpoint, index=index)
    before = recommender.encoders.fingerprint
    extended = extend_recommender(recommender, pd.concat([catalog, new_rows(catalog)]))
    assert recommender.encoders.fingerprint == before and recommender.n_songs < extended.n_songs
    assert extended.n_songs == recommender.n_songs + 3
    known = catalog["song_id"].to_numpy()
    np.testing.assert_array_equal(extended.encoders.encode_songs(known),
                                  recommender.encoders.encode_songs(known))
    assert extended.encoders.derives_from(before)
    tracks = album_run(catalog)["song_id"].tolist()
    answer = extended.recommend([tracks], k=10)[0]
    assert NEW_SONG in answer.song_ids
    tokens = torch.tensor([[*recommender.encoders.encode_songs(tracks[:4]), 1]])
    with torch.inference_mode():
        old = recommender.model.predict_last(tokens)
        new = extended.model.predict_last(tokens)
    torch.testing.assert_close(new[:, : old.shape[1]], old)
    assert torch.isfinite(new[:, FIRST_SONG_INDEX:]).all()
    # a playlist holding a new song uses it as input instead of reporting it unknown
    assert not extended.recommend([[NEW_SONG + 2, *tracks[:2]]])[0].unknown_song_ids
    assert extend_recommender(extended, catalog) is extended


Answers = list[tuple[list[int], list[float]]]


def answers(recommender: Recommender, playlists: list[list[int]]) -> Answers:
    """Top-20 ids and scores of each playlist."""
    return [(found.song_ids, found.scores) for found in recommender.recommend(playlists, k=20)]


def assert_same_answers(got: Answers, expected: Answers) -> None:
    """The same songs in the same order, with the same scores up to float rounding."""
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    for (_, scores), (_, wanted) in zip(got, expected, strict=True):
        assert scores == pytest.approx(wanted, rel=1e-5)


def shares_tables(extended: Recommender, base: Recommender) -> bool:
    """True when the extension's big tables start at its base's: they grew in place."""
    pairs = [(extended.model.song_embedding.weight, base.model.song_embedding.weight),
             (extended.model.album_embedding.weight, base.model.album_embedding.weight),
             (torch.from_numpy(extended.encoders.song_features),
              torch.from_numpy(base.encoders.song_features))]
    if base.approximate is not None and extended.approximate is not None:
        pairs.append((extended.approximate.rows, base.approximate.rows))
    return all(new.data_ptr() == old.data_ptr() for new, old in pairs)


@pytest.mark.parametrize("index", ["exact", "approximate"])
def test_a_reserved_model_grows_in_place_and_never_changes_a_model_still_served(
    checkpoint: Path, catalog: pd.DataFrame, index: str
) -> None:
    loaded = Recommender.from_checkpoint(checkpoint, index=index)
    playlists = [album_run(catalog)["song_id"].tolist()[:4], catalog["song_id"].tolist()[:30],
                 [NEW_SONG, NEW_SONG + 1, *catalog["song_id"].tolist()[:3]]]
    reserved = with_reserve(loaded)
    assert reserved.model_version == loaded.model_version
    assert not shares_tables(reserved, loaded)
    assert_same_answers(answers(reserved, playlists), answers(loaded, playlists))
    rows = new_rows(catalog)
    one, all_three = pd.concat([catalog, rows.iloc[:1]]), pd.concat([catalog, rows])

    first = extend_recommender(reserved, one)
    second = extend_recommender(first, all_three)
    assert shares_tables(first, reserved) and shares_tables(second, first)
    copied_first = extend_recommender(loaded, one)
    copied_second = extend_recommender(copied_first, all_three)
    served = {name: answers(model, playlists) for name, model in
              (("reserved", reserved), ("first", first), ("second", second))}
    assert_same_answers(served["first"], answers(copied_first, playlists))
    assert_same_answers(served["second"], answers(copied_second, playlists))

    # extending `first` again (it is no longer the newest) copies: the rows `second` reads for
    # NEW_SONG + 1 would otherwise be overwritten by NEW_SONG + 2's
    other = extend_recommender(first, pd.concat([catalog, rows.iloc[[0, 2]]]))
    for name, model in (("reserved", reserved), ("first", first), ("second", second)):
        assert answers(model, playlists) == served[name], name
    assert not shares_tables(other, first) and other.n_songs == first.n_songs + 1


def test_new_albums_and_artists_get_rows_and_null_features_the_fitted_fill(
    checkpoint: Path, catalog: pd.DataFrame
) -> None:
    recommender = Recommender.from_checkpoint(checkpoint, index="exact")
    base = recommender.encoders
    encoders = extend_encoders(base, pd.concat([catalog, new_rows(catalog)]))
    tokens = encoders.encode_songs([NEW_SONG, NEW_SONG + 1, NEW_SONG + 2])
    np.testing.assert_array_equal(tokens, base.n_song_tokens + np.arange(3))
    albums, artists = encoders.song_album[tokens], encoders.song_artist[tokens]
    assert albums[0] < base.n_album_tokens and artists[0] == artists[1] < base.n_artist_tokens
    assert list(albums[1:]) == [base.n_album_tokens, base.n_album_tokens + 1]
    assert artists[2] == base.n_artist_tokens
    scaled = [NUMERIC_COLUMNS.index(name) for name in ("danceability", "energy", "tempo")]
    np.testing.assert_array_equal(encoders.song_features[tokens[2], scaled], 0.0)
    model = extend_recommender(recommender, pd.concat([catalog, new_rows(catalog)])).model
    album_rows = model.album_embedding.weight
    artist_albums = np.unique(base.song_album[base.song_artist == artists[1]])
    torch.testing.assert_close(album_rows[albums[1]],
                               album_rows[torch.from_numpy(artist_albums)].mean(dim=0))
    torch.testing.assert_close(album_rows[albums[2]], album_rows[1: base.n_album_tokens].mean(0))
    # a new track carries its album's popularity: the mean bias of the album's known songs
    mates = torch.from_numpy(np.flatnonzero(base.song_album == albums[0]))
    torch.testing.assert_close(model.head_bias[tokens[0]], model.head_bias[mates].mean())


def test_extended_encoders_holding_an_id_twice_are_refused(checkpoint: Path,
                                                           catalog: pd.DataFrame) -> None:
    base = Recommender.from_checkpoint(checkpoint, index="exact").encoders
    encoders = extend_encoders(base, pd.concat([catalog, new_rows(catalog)]))
    fields = ("song_ids", "album_ids", "artist_ids", "song_album", "song_artist",
              "song_features", "numeric_fill", "numeric_center", "numeric_scale",
              "has_side_info", "chain_fingerprints", "chain_sizes")
    for twice in (base.song_ids[5], NEW_SONG):  # a known id appended again, a new one twice
        ids = encoders.song_ids.copy()
        ids[-1] = twice
        with pytest.raises(DataError, match="song_ids must be unique"):
            Encoders(*(ids if name == "song_ids" else getattr(encoders, name)
                       for name in fields))


def test_an_extended_checkpoint_round_trips_and_its_chain_verifies(
    checkpoint: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    songs = pd.concat([catalog, new_rows(catalog)])
    recommender = Recommender.from_checkpoint(checkpoint, index="exact")
    extended = extend_recommender(recommender, songs)
    out = tmp_path / "extended.pt"
    assert extend_checkpoint(checkpoint, songs, out) == 3
    loaded = load_model(out, recommender.encoders)
    assert loaded.encoders.fingerprint == extended.encoders.fingerprint
    np.testing.assert_array_equal(loaded.encoders.chain_fingerprints,
                                  extended.encoders.chain_fingerprints)
    assert loaded.model_version == extended.model_version
    reloaded = Recommender.from_checkpoint(out, index="exact")
    playlists = [[NEW_SONG, *catalog["song_id"].iloc[:3]], album_run(catalog)["song_id"].tolist()]
    for ours, theirs in zip(extended.recommend(playlists), reloaded.recommend(playlists),
                            strict=True):
        assert ours.song_ids == theirs.song_ids
        np.testing.assert_allclose(ours.scores, theirs.scores, rtol=1e-5)
    again = tmp_path / "again.pt"
    assert main(["--checkpoint", str(out), "--songs", str(DEMO_DATA), "--out", str(again)]) == 0
    assert load_model(again).encoders.fingerprint == extended.encoders.fingerprint


def test_song_dropout_trains_the_unknown_row_and_is_off_at_evaluation() -> None:
    for objective in ("cloze", "causal"):
        model = pointer_model(song_dropout=0.5, objective=objective)
        tokens, labels = cloze_batch()
        sampler = NegativeSampler(popularity(), negatives=16, alpha=0.5)
        for loss_sampler in (None, sampler):
            model.train()
            model.zero_grad()
            torch.manual_seed(3)
            model.loss(tokens, labels, loss_sampler).backward()
            assert model.unknown_song.grad.abs().sum() > 0
            assert model.unknown_bias.grad.abs() > 0
        model.eval()
        with torch.no_grad():
            before = model.predict_last(tokens)
            model.unknown_song.add_(1.0)
            model.unknown_bias.add_(1.0)
            torch.testing.assert_close(model.predict_last(tokens), before)


@pytest.mark.parametrize("changes", [
    {}, {"side_pointer": "false", "objective": "causal"}, {"tie_head": "false"},
    {"side_features": "false"}, {"song_dropout": "0.3"},
    {"song_dropout": "0.3", "side_pointer": "false", "objective": "causal"},
])
def test_every_variant_extends_without_changing_known_scores(changes: dict[str, str]) -> None:
    encoders = make_encoders(side_info="side_features" not in changes)
    config = tiny_run_config(Path("data"), Path("run"),
                             **{f"model.{key}": value for key, value in changes.items()})
    model = build_model(config, encoders).eval()
    rows = pd.DataFrame({"song_id": [1, 99_999], "album_id": [200, None],
                         "artist_id": [10, None]})
    for field in RAW_FEATURE_FIELDS:
        rows[field] = np.nan
    extended = extend_encoders(encoders, rows)
    assert extended.n_songs == encoders.n_songs + 2
    assert extended.derives_from(encoders.fingerprint)
    assert extend_encoders(extended, rows) is extended
    network = extend_model(model, extended)
    known = torch.tensor([[2, 3, 4, 1]])
    with torch.no_grad():
        old, new = model.predict_last(known), network.predict_last(known)
        with_new = network.predict_last(torch.tensor([[2, extended.n_song_tokens - 1, 1]]))
    torch.testing.assert_close(new[:, : old.shape[1]], old)
    assert torch.isfinite(with_new[:, FIRST_SONG_INDEX:]).all()


def test_a_checkpoint_from_before_song_dropout_loads_and_extends(
    checkpoint: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    state = load_checkpoint(checkpoint)
    config = {**state["config"], "model": {
        key: value for key, value in state["config"]["model"].items() if key != "song_dropout"}}
    weights = {name: tensor for name, tensor in state["model"].items()
               if not name.startswith("unknown_")}
    old = tmp_path / "old.pt"
    save_checkpoint(old, {**state, "config": config, "model": weights})
    recommender = Recommender.from_checkpoint(old, index="exact")
    model = extend_recommender(recommender, pd.concat([catalog, new_rows(catalog)])).model
    assert not model.song_embedding.weight[-3:].any()
    torch.testing.assert_close(model.head_bias[-1],
                               recommender.model.head_bias[FIRST_SONG_INDEX:].mean())


def test_train_recommend_extends_by_the_catalog_and_says_so(
    checkpoint: Path, catalog: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "catalog"
    folder.mkdir()
    raw = pd.read_csv(DEMO_DATA / "songs.csv", dtype=str)
    release = raw[raw["song_id"] == str(album_run(catalog)["song_id"].iloc[-1])].assign(
        song_id=str(NEW_SONG), name="A New Release",
        track_number=str(int(album_run(catalog)["track_number"].max()) + 1))
    pd.concat([raw, release]).to_csv(folder / "songs.csv", index=False)
    for table in ("albums", "artists"):
        (folder / f"{table}.csv").write_bytes((DEMO_DATA / f"{table}.csv").read_bytes())
    sequence = tmp_path / "sequence.csv"
    pd.DataFrame({"pos": range(6), "song_id": album_run(catalog)["song_id"].iloc[:6]}).to_csv(
        sequence, index=False)
    assert train_main(["--recommend", str(checkpoint), "--sequence", str(sequence),
                       "--catalog", str(folder), "--index", "exact"]) == 0
    out = capsys.readouterr().out
    assert "catalog: 1 songs" in out and "A New Release" in out


@pytest.mark.parametrize("objective", ["cloze", "causal"])
def test_song_dropout_drops_the_same_songs_in_the_full_and_the_sampled_softmax(
    objective: str,
) -> None:
    tokens, labels = cloze_batch()
    losses = []
    for sampler in (None, NegativeSampler(popularity(), 10_000, alpha=0.0)):
        model = pointer_model(song_dropout=0.5, objective=objective).train()
        torch.manual_seed(7)
        losses.append(model.loss(tokens, labels, sampler).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.manual_seed(7)
    assert pointer_model(objective=objective).train().loss(tokens, labels).item() != (
        pytest.approx(losses[0], rel=1e-3))


def test_the_extension_keeps_the_recommender_settings(
    checkpoint: Path, catalog: pd.DataFrame
) -> None:
    for exclude_seen in (True, False):
        recommender = Recommender.from_checkpoint(checkpoint, index="exact")
        recommender.exclude_seen = exclude_seen
        extended = extend_recommender(recommender, pd.concat([catalog, new_rows(catalog)]))
        assert (extended.exclude_seen, extended.batch_size, extended.index_mode) == (
            exclude_seen, recommender.batch_size, "exact")
