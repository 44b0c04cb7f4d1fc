"""Encoders and the training file: vocabularies, feature transforms, cleaning, safe round trips."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pytest

from atomic_files import atomic_write
from preprocessing_utils import (
    FEATURE_NAMES,
    FIRST_SONG_INDEX,
    MASK_INDEX,
    PAD_INDEX,
    SONG_COLUMNS,
    DataError,
    Encoders,
    count_feature_cleaning,
    load_training_file,
    save_training_file,
)


def song_row(song_id: int, **values: float | None) -> dict[str, float | None]:
    """One valid raw song row; keyword arguments override single fields."""
    row: dict[str, float | None] = {
        "song_id": song_id, "album_id": 200, "artist_id": 50, "explicit": 0, "danceability": 0.5,
        "energy": 0.5, "key": 0, "loudness": -8.0, "mode": 1, "speechiness": 0.1,
        "acousticness": 0.2, "instrumentalness": 0.0, "liveness": 0.1, "valence": 0.5,
        "tempo": 120.0, "duration_ms": 200_000, "time_signature": 4, "disc_number": 1,
        "track_number": 1,
    }
    row.update(values)
    return row


def songs_frame(rows: list[dict[str, float | None]]) -> pd.DataFrame:
    """Songs catalog in the canonical column types (nullable album/artist ids)."""
    frame = pd.DataFrame(rows, columns=list(SONG_COLUMNS))
    frame["song_id"] = frame["song_id"].astype(np.int64)
    for column in ("album_id", "artist_id"):
        frame[column] = frame[column].astype("Int64")
    for column in SONG_COLUMNS[3:]:
        frame[column] = frame[column].astype(np.float64)
    return frame


def interactions(song_ids: list[int]) -> pd.DataFrame:
    """One playlist holding ``song_ids`` in order."""
    return pd.DataFrame({"playlist_id": 1, "pos": range(len(song_ids)), "song_id": song_ids})


@pytest.fixture
def catalog() -> pd.DataFrame:
    """Four songs, two albums, two artists, one song not in any playlist (id 40)."""
    return songs_frame([
        song_row(30, album_id=201, artist_id=51, danceability=0.9, key=3, time_signature=3,
                 explicit=1, track_number=5),
        song_row(10, danceability=0.1, key=6, time_signature=7, duration_ms=100_000),
        song_row(20, album_id=None, danceability=0.5),
        song_row(40, album_id=202, artist_id=52),
    ])


@pytest.fixture
def fitted(catalog: pd.DataFrame) -> Encoders:
    """Encoders fitted on one playlist of songs 30, 10, 20, 30."""
    return Encoders.fit(interactions([30, 10, 20, 30]), catalog)


def test_vocabulary_is_played_songs_in_catalog_order_after_pad_and_mask(fitted: Encoders) -> None:
    assert (PAD_INDEX, MASK_INDEX, FIRST_SONG_INDEX) == (0, 1, 2)
    assert fitted.song_ids.tolist() == [10, 20, 30]
    assert fitted.n_song_tokens == 5
    assert fitted.encode_songs([10, 20, 30]).tolist() == [2, 3, 4]
    assert fitted.album_ids.tolist() == [200, 201]
    assert fitted.song_album.tolist() == [0, 0, 1, 0, 2]
    assert fitted.artist_ids.tolist() == [50, 51]
    assert fitted.song_artist.tolist() == [0, 0, 1, 1, 2]
    assert (fitted.n_album_tokens, fitted.n_artist_tokens, fitted.n_features) == (3, 3, 21)
    assert not fitted.song_features[[PAD_INDEX, MASK_INDEX]].any()


def test_features_follow_the_documented_transforms(fitted: Encoders) -> None:
    features = pd.DataFrame(fitted.song_features[2:], columns=FEATURE_NAMES,
                            index=fitted.song_ids)
    assert features["explicit"].tolist() == [0, 0, 1]
    assert features.loc[10, "key_sin"] == pytest.approx(0.0, abs=1e-6)
    assert features.loc[10, "key_cos"] == pytest.approx(-1.0)
    assert features.loc[30, "key_sin"] == pytest.approx(1.0)
    one_hot = features[[f"time_signature_{value}" for value in range(3, 8)]]
    assert one_hot.loc[30].tolist() == [1, 0, 0, 0, 0]
    assert one_hot.loc[10].tolist() == [0, 0, 0, 0, 1]
    for column in ("danceability", "duration_ms_log1p", "track_number"):
        assert features[column].mean() == pytest.approx(0.0, abs=1e-6)
        assert features[column].std(ddof=0) == pytest.approx(1.0, abs=1e-5)
    durations = np.log1p([100_000, 200_000, 200_000])
    expected = (math.log1p(100_000) - durations.mean()) / durations.std()
    assert features.loc[10, "duration_ms_log1p"] == pytest.approx(expected, rel=1e-5)
    assert (features["energy"] == 0).all()


def test_null_features_get_the_fitted_mean_and_are_counted(catalog: pd.DataFrame) -> None:
    catalog.loc[catalog["song_id"] == 20, ["danceability", "key", "time_signature"]] = np.nan
    encoders = Encoders.fit(interactions([10, 20, 30]), catalog)
    row = pd.Series(encoders.song_features[encoders.encode_songs([20])[0]], index=FEATURE_NAMES)
    assert row["danceability"] == 0.0
    assert row["key_sin"] == row["key_cos"] == 0.0
    assert not row[[f"time_signature_{value}" for value in range(3, 8)]].any()
    assert count_feature_cleaning(catalog) == {
        "null_danceability": 1, "null_key": 1, "null_time_signature": 1}


def test_time_signature_below_three_is_counted_and_encoded_as_zeros(
    catalog: pd.DataFrame,
) -> None:
    catalog.loc[catalog["song_id"] == 10, "time_signature"] = 1
    encoders = Encoders.fit(interactions([10, 20]), catalog)
    assert not encoders.song_features[2, -5:].any()
    assert count_feature_cleaning(catalog) == {"time_signature_below_3": 1}


@pytest.mark.parametrize(("field", "value"), [
    ("danceability", 1.7), ("energy", -0.1), ("duration_ms", -5), ("duration_ms", 0),
    ("key", 12), ("key", -1), ("time_signature", 9), ("mode", 2), ("explicit", 3),
    ("track_number", 0), ("tempo", float("inf")), ("disc_number", 1.5),
])
def test_out_of_range_feature_is_an_error_naming_row_and_field(
    catalog: pd.DataFrame, field: str, value: float
) -> None:
    catalog.loc[catalog["song_id"] == 20, field] = value
    with pytest.raises(DataError, match=rf"songs \(song_id 20\): {field} = "):
        Encoders.fit(interactions([10, 20]), catalog)


def test_duplicate_song_id_in_catalog_is_an_error(catalog: pd.DataFrame) -> None:
    doubled = pd.concat([catalog, catalog.iloc[[1]]], ignore_index=True)
    with pytest.raises(DataError, match=r"song_id 10\): song_id appears more than once"):
        Encoders.fit(interactions([10]), doubled)


def test_without_side_information_only_song_ids_are_encoded() -> None:
    encoders = Encoders.fit(interactions([7, 5, 9, 5]), None)
    assert encoders.song_ids.tolist() == [5, 7, 9]
    assert not encoders.has_side_info
    assert encoders.n_features == 0
    assert encoders.song_features.shape == (5, 0)
    assert encoders.song_album.tolist() == encoders.song_artist.tolist() == [0] * 5
    assert (encoders.n_album_tokens, encoders.n_artist_tokens) == (1, 1)
    assert encoders.transform(pd.DataFrame(index=range(3))).shape == (3, 0)


def test_unknown_ids_encode_to_minus_one_and_specials_do_not_decode(fitted: Encoders) -> None:
    assert fitted.encode_songs([40, 10, 999, 5]).tolist() == [-1, 2, -1, -1]
    assert fitted.decode_songs([4, 2]).tolist() == [30, 10]
    for token in (PAD_INDEX, MASK_INDEX, fitted.n_song_tokens, -1):
        with pytest.raises(ValueError, match="is not a song"):
            fitted.decode_songs([token])
    empty = Encoders.fit(interactions([]), None)
    assert empty.encode_songs([1, 2]).tolist() == [-1, -1]


def test_save_and_load_round_trip_bit_identically(fitted: Encoders, tmp_path: Path) -> None:
    fitted.save(tmp_path / "a")
    fitted.save(tmp_path / "b")
    loaded = Encoders.load(tmp_path / "a")
    assert loaded.fingerprint == fitted.fingerprint
    for name, array in fitted.to_arrays().items():
        assert np.array_equal(loaded.to_arrays()[name], array)
        assert loaded.to_arrays()[name].dtype == array.dtype
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [
        "encoders.json", "encoders.npz"]
    for name in ("encoders.json", "encoders.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_arrays_round_trip_for_checkpoints(fitted: Encoders) -> None:
    arrays = fitted.to_arrays()
    assert all(array.dtype != object for array in arrays.values())
    rebuilt = Encoders.from_arrays({name: array.tolist() for name, array in arrays.items()})
    assert rebuilt.fingerprint == fitted.fingerprint
    with pytest.raises(DataError, match="missing array 'song_ids'"):
        Encoders.from_arrays({name: a for name, a in arrays.items() if name != "song_ids"})


def test_load_refuses_missing_or_inconsistent_files(fitted: Encoders, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="encoders file not found"):
        Encoders.load(tmp_path)
    fitted.save(tmp_path)
    other = Encoders.fit(interactions([10, 20]), None)
    other.save(tmp_path / "other")
    (tmp_path / "encoders.npz").write_bytes((tmp_path / "other" / "encoders.npz").read_bytes())
    with pytest.raises(DataError, match="fingerprint mismatch"):
        Encoders.load(tmp_path)
    arrays = {**fitted.to_arrays(), "song_ids": np.array([{"pickled": 1}], dtype=object)}
    np.savez(tmp_path / "encoders.npz", **arrays)
    with pytest.raises(DataError, match="cannot read"):
        Encoders.load(tmp_path)
    (tmp_path / "encoders.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        Encoders.load(tmp_path)


def test_training_file_round_trips_and_is_validated(tmp_path: Path) -> None:
    path = save_training_file(tmp_path, np.array([7, 3]), np.array([0, 2, 5]),
                              np.array([2, 3, 4, 2, 5]))
    sequences = load_training_file(tmp_path, n_song_tokens=6)
    assert path.name == "training.npz"
    assert sequences.playlist_ids.tolist() == [7, 3]
    assert sequences.lengths.tolist() == [2, 3]
    assert sequences.songs[sequences.offsets[1]:sequences.offsets[2]].tolist() == [4, 2, 5]
    with pytest.raises(DataError, match="must be < 5"):
        load_training_file(tmp_path, n_song_tokens=5)
    for offsets, songs, message in (([0, 2, 4], [2, 3, 4, 2, 5], "offsets must run"),
                                    ([0, 0, 5], [2, 3, 4, 2, 5], "at least one song"),
                                    ([0, 2, 5], [2, 3, 1, 2, 5], "must be >= 2")):
        with pytest.raises(DataError, match=message):
            save_training_file(tmp_path, np.array([7, 3]), np.array(offsets), np.array(songs))
    with pytest.raises(DataError, match="training file not found"):
        load_training_file(tmp_path / "missing")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "file.bin"
    atomic_write(path, lambda file: file.write(b"first"))
    assert path.read_bytes() == b"first"

    def fail_halfway(file: BinaryIO) -> None:
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"first"
    assert [item.name for item in path.parent.iterdir()] == ["file.bin"]
    atomic_write(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second"
    assert [item.name for item in path.parent.iterdir()] == ["file.bin"]
