"""The table generator at a small scale: COPY = CSV, chunk size changes nothing, exact catalog
sizes, atomic database loads and clear errors for bad options.

Byte identity with the committed demo tables is checked by tests/test_demo_data.py.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from training_support import load_generator

FILES = ("artists", "albums", "songs", "playlists", "playlist_songs", "sequence")
ORDER = {"artists": "artist_id", "albums": "album_id", "songs": "song_id",
         "playlists": "playlist_id", "playlist_songs": "playlist_id, pos"}


generate = load_generator()
SMALL = generate.Scale(playlists=2000, artists=300, albums=700, songs=3000, median_length=40.0)
TINY = generate.Scale(playlists=200, artists=100, albums=200, songs=600, median_length=20.0)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small scale generated once to CSV with the default chunk size."""
    folder = tmp_path_factory.mktemp("small")
    generate.generate(SMALL, out=folder)
    return folder


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one generated file."""
    with path.open(encoding="utf-8", newline="") as handle:
        header, *rows = csv.reader(handle)
    return header, rows


def as_stored(text: str, stored: object) -> object:
    """A CSV field parsed the way PostgreSQL stored it (0/1 booleans, numbers, text)."""
    if isinstance(stored, bool):
        return text == "1"
    if isinstance(stored, int | float):
        return type(stored)(text)
    return text


def table_rows(dsn: str, table: str, columns: list[str]) -> list[tuple[object, ...]]:
    """Every row of one table in key order."""
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {ORDER[table]}")
            return cursor.fetchall()
    finally:
        connection.close()


def scalar(dsn: str, query: str) -> object:
    """The one value a query answers."""
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            row = cursor.fetchone()
            assert row is not None
            return row[0]
    finally:
        connection.close()


def table_counts(dsn: str) -> dict[str, object]:
    """Rows per catalog table."""
    return {table: scalar(dsn, f"SELECT count(*) FROM {table}") for table in ORDER}


def test_copy_loads_the_rows_of_the_csv_files(small_csv: Path, pg_dsn: str) -> None:
    """Generated into PostgreSQL in chunks of 1,000 rows, every table holds the CSV's rows."""
    summary = generate.generate(SMALL, database=pg_dsn, chunk_rows=1000)
    for table in ORDER:
        header, rows = read_csv(small_csv / f"{table}.csv")
        stored = table_rows(pg_dsn, table, header)
        assert summary["rows"][table] == len(rows) == len(stored), table
        parsed = [tuple(as_stored(text, value) for text, value in zip(row, db_row, strict=True))
                  for row, db_row in zip(rows, stored, strict=True)]
        assert parsed == stored, table


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_chunk_size_changes_no_byte(small_csv: Path, tmp_path: Path, chunk_rows: int) -> None:
    """Chunks of 7 or 1,000 rows, which end inside playlists, give the default run's files."""
    generate.generate(SMALL, out=tmp_path, chunk_rows=chunk_rows)
    _, rows = read_csv(small_csv / "playlist_songs.csv")
    starts = [index for index, row in enumerate(rows) if row[1] == "0"]
    assert any(start % chunk_rows for start in starts), "no playlist spans two chunks"
    for name in FILES:
        assert (tmp_path / f"{name}.csv").read_bytes() == (small_csv / f"{name}.csv").read_bytes()


def test_small_tables_are_consistent(small_csv: Path) -> None:
    """Keys are unique, references resolve, positions run 0, 1, ... and no song repeats."""
    tables = {name: read_csv(small_csv / f"{name}.csv")[1] for name in FILES}
    song_ids = {row[0] for row in tables["songs"]}
    assert len(song_ids) == len(tables["songs"])
    assert {row[2] for row in tables["songs"]} <= {row[0] for row in tables["albums"]}
    assert {row[2] for row in tables["albums"]} <= {row[0] for row in tables["artists"]}
    assert len(tables["playlists"]) == SMALL.playlists
    playlists: dict[str, list[list[str]]] = {}
    for row in tables["playlist_songs"]:
        playlists.setdefault(row[0], []).append(row)
    assert set(playlists) == {row[0] for row in tables["playlists"]}
    for rows in playlists.values():
        assert [int(row[1]) for row in rows] == list(range(len(rows)))
        assert len({row[2] for row in rows}) == len(rows)
        assert {row[2] for row in rows} <= song_ids


@pytest.mark.parametrize("name", ["small", "full"])
def test_catalog_has_the_asked_sizes(name: str) -> None:
    """The catalog drawn has exactly the artists, albums and songs asked for (the full
    scale's are the original's), albums in artist order and songs in album order."""
    scale = SMALL if name == "small" else generate.SCALES["full"]
    catalog = generate.make_catalog(np.random.default_rng(1), scale)
    assert catalog.artist_ids.size == scale.artists
    assert catalog.album_ids.size == scale.albums
    assert catalog.song_ids.size == scale.songs
    assert np.all(np.diff(catalog.album_artist) >= 0)
    assert np.all(np.diff(catalog.song_album) >= 0)
    assert len(set(catalog.artist_names)) == scale.artists


def test_fit_total_hits_the_total_and_keeps_every_count() -> None:
    """Fitting up and down reaches the total exactly and never leaves a count below 1."""
    rng = np.random.default_rng(2)
    counts = 1 + rng.poisson(2.0, size=500)
    for total in (500, 700, int(counts.sum()), 5000):
        fitted = generate.fit_total(rng, counts, total)
        assert fitted.sum() == total
        assert fitted.min() >= 1


@pytest.fixture
def failing_playlist_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the playlist_songs COPY fail after its first chunk has gone to the server."""
    original = generate.playlist_song_chunks

    def one_chunk_then_fail(*args: object) -> Iterator[object]:
        yield next(original(*args))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(generate, "playlist_song_chunks", one_chunk_then_fail)


def test_a_failed_load_leaves_nothing_and_a_rerun_loads(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, failing_playlist_rows: None
) -> None:
    """An interrupted load rolls every table back with its constraints; the rerun then loads
    everything, and a third run refuses the filled tables naming --database."""
    with pytest.raises(RuntimeError, match="interrupted"):
        generate.generate(TINY, database=pg_dsn, chunk_rows=100)
    assert set(table_counts(pg_dsn).values()) == {0}
    monkeypatch.undo()
    summary = generate.generate(TINY, database=pg_dsn, chunk_rows=100)
    assert table_counts(pg_dsn) == {table: summary["rows"][table] for table in ORDER}
    assert scalar(pg_dsn, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                          "AND conrelid = 'playlist_songs'::regclass") == 2
    assert scalar(pg_dsn, "SELECT to_regclass('playlist_songs_song_id_idx') IS NOT NULL")
    with pytest.raises(generate.OptionError, match="--database"):
        generate.generate(TINY, database=pg_dsn)


@pytest.mark.parametrize(("arguments", "option"), [
    (["--playlists", "-5"], "--playlists"),
    (["--playlists", "ten"], "--playlists"),
    (["--songs", "0"], "--songs"),
    (["--artists", "10"], "--artists"),
    (["--artists", "14", "--playlists", "10"], "--artists"),
    (["--artists", "200", "--albums", "100"], "--albums"),
    (["--artists", "100", "--albums", "500", "--songs", "400"], "--songs"),
    (["--artists", "5000", "--songs", "4000"], "--songs"),
    (["--chunk-rows", "0"], "--chunk-rows"),
    (["--scale", "huge"], "--scale"),
])
def test_bad_options_exit_2_naming_the_option(
    arguments: list[str], option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Impossible sizes stop before any work with exit status 2 and the option's name."""
    with pytest.raises(SystemExit) as stopped:
        generate.main([*arguments, "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert option in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_beyond_the_demo_sizes_a_destination_is_required(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --out or --database, only the demo sizes may write to the committed folder."""
    with pytest.raises(SystemExit) as stopped:
        generate.main(["--scale", "full"])
    assert stopped.value.code == 2
    assert "--out" in capsys.readouterr().err
