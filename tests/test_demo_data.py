"""The committed demo tables: headers, scale, integrity, value ranges and reproducibility."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo data"
TABLE_FILES = (
    "artists.csv",
    "albums.csv",
    "songs.csv",
    "playlists.csv",
    "playlist_songs.csv",
    "sequence.csv",
)
HEADERS = {
    "artists.csv": ["artist_id", "name", "genre"],
    "albums.csv": ["album_id", "name", "artist_id", "release_year"],
    "songs.csv": [
        "song_id", "name", "album_id", "artist_id", "explicit", "danceability", "energy",
        "key", "loudness", "mode", "speechiness", "acousticness", "instrumentalness",
        "liveness", "valence", "tempo", "duration_ms", "time_signature", "disc_number",
        "track_number",
    ],
    "playlists.csv": ["playlist_id", "name"],
    "playlist_songs.csv": ["playlist_id", "pos", "song_id"],
    "sequence.csv": ["pos", "song_id"],
}
UNIT_FEATURES = (
    "danceability", "energy", "speechiness", "acousticness", "instrumentalness", "liveness",
    "valence",
)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    """Load every committed demo table once for the module."""
    return {name: pd.read_csv(DEMO_DIR / name) for name in TABLE_FILES}


@pytest.mark.parametrize("name", TABLE_FILES)
def test_header_is_exact(name: str) -> None:
    """Each file starts with exactly the agreed header row."""
    with (DEMO_DIR / name).open(encoding="utf-8") as handle:
        assert handle.readline().rstrip("\n").split(",") == HEADERS[name]


def test_tables_are_clean(tables: dict[str, pd.DataFrame]) -> None:
    """The demo data has no missing values and no duplicate keys."""
    for name, frame in tables.items():
        assert not frame.isna().any().any(), name
    assert tables["artists.csv"].artist_id.is_unique
    assert tables["albums.csv"].album_id.is_unique
    assert tables["songs.csv"].song_id.is_unique
    assert tables["playlists.csv"].playlist_id.is_unique
    assert not tables["playlist_songs.csv"].duplicated(["playlist_id", "pos"]).any()


def test_scale_matches_the_original_sample(tables: dict[str, pd.DataFrame]) -> None:
    """Row counts and playlist lengths stay within the agreed tolerances."""
    assert len(tables["playlists.csv"]) == 3000
    assert 10_500 <= len(tables["songs.csv"]) <= 12_500
    assert 2_000 <= len(tables["artists.csv"]) <= 2_600
    assert 3_500 <= len(tables["albums.csv"]) <= 4_300
    lengths = tables["playlist_songs.csv"].groupby("playlist_id").size()
    assert lengths.min() >= 5
    assert lengths.max() <= 250
    assert 35 <= lengths.median() <= 45
    assert 5 <= len(tables["sequence.csv"]) <= 30


def test_ids_are_catalog_ids_not_indices(tables: dict[str, pd.DataFrame]) -> None:
    """Ids are positive and start far from zero, so they cannot pass for model indices."""
    assert tables["artists.csv"].artist_id.min() >= 5_000
    assert tables["albums.csv"].album_id.min() >= 200_000
    assert tables["songs.csv"].song_id.min() >= 1_000_000
    assert tables["playlists.csv"].playlist_id.min() >= 1


def test_referential_integrity(tables: dict[str, pd.DataFrame]) -> None:
    """Every reference points at an existing row, and songs agree with their album's artist."""
    songs, albums = tables["songs.csv"], tables["albums.csv"]
    artist_ids = set(tables["artists.csv"].artist_id)
    song_ids = set(songs.song_id)
    assert set(tables["playlist_songs.csv"].song_id) <= song_ids
    assert set(tables["playlist_songs.csv"].playlist_id) == set(tables["playlists.csv"].playlist_id)
    assert set(tables["sequence.csv"].song_id) <= song_ids
    assert set(songs.album_id) <= set(albums.album_id)
    assert set(songs.artist_id) <= artist_ids
    assert set(albums.artist_id) <= artist_ids
    album_artist = songs.album_id.map(albums.set_index("album_id").artist_id)
    assert (album_artist == songs.artist_id).all()


def test_positions_are_contiguous_from_zero(tables: dict[str, pd.DataFrame]) -> None:
    """Positions run 0, 1, 2, ... within every playlist and in the demo sequence."""
    rows = tables["playlist_songs.csv"].sort_values(["playlist_id", "pos"])
    expected = rows.groupby("playlist_id").cumcount()
    assert (rows.pos.to_numpy() == expected.to_numpy()).all()
    assert tables["sequence.csv"].pos.tolist() == list(range(len(tables["sequence.csv"])))


def test_no_song_repeats_within_a_playlist(tables: dict[str, pd.DataFrame]) -> None:
    """A playlist never contains the same song twice."""
    assert not tables["playlist_songs.csv"].duplicated(["playlist_id", "song_id"]).any()
    assert tables["sequence.csv"].song_id.is_unique


def test_feature_ranges(tables: dict[str, pd.DataFrame]) -> None:
    """Audio features and track metadata lie in their valid ranges."""
    songs = tables["songs.csv"]
    for feature in UNIT_FEATURES:
        assert songs[feature].between(0.0, 1.0).all(), feature
    assert set(songs.explicit) <= {0, 1}
    assert set(songs["mode"]) <= {0, 1}
    assert songs.key.between(0, 11).all()
    assert songs.loudness.between(-35.0, 0.0).all()
    assert songs.tempo.between(50.0, 220.0).all()
    assert (songs.duration_ms > 0).all()
    assert songs.duration_ms.between(120_000, 420_000).mean() > 0.8
    assert set(songs.time_signature) <= {1, 3, 4, 5, 7}
    assert (songs.time_signature == 4).mean() > 0.8
    assert (songs.disc_number >= 1).all()
    assert (songs.disc_number == 1).mean() > 0.9
    assert (songs.track_number >= 1).all()


def test_track_numbers_are_ordered_within_each_disc(tables: dict[str, pd.DataFrame]) -> None:
    """No two songs of one album disc share a track number."""
    songs = tables["songs.csv"]
    assert not songs.duplicated(["album_id", "disc_number", "track_number"]).any()


def test_generator_reproduces_the_committed_files(tmp_path: Path) -> None:
    """Running the generator with its default seed gives the committed bytes."""
    subprocess.run(
        [sys.executable, str(DEMO_DIR / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name in TABLE_FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name
