"""Preprocessing read in pieces: boundaries inside playlists, any chunk size, CSV = PostgreSQL.

The tables are generated at a small scale (2,000 playlists, ~80k rows) so many chunk
boundaries fall inside playlists; memory and time are benchmark figures, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from training_support import load_generator

import db
import preprocessing
from csv_tables import read_csv_playlists, read_csv_songs
from preprocessing_utils import DataError, load_training_file, read_npz

OUTPUT_FILES = ("training.npz", "encoders/encoders.npz", "encoders/encoders.json")


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated catalog and its playlists as CSV tables."""
    generate = load_generator()
    folder = tmp_path_factory.mktemp("small_tables")
    scale = generate.Scale(playlists=2000, artists=300, albums=700, songs=3000,
                           median_length=40.0)
    generate.generate(scale, out=folder)
    return folder


@pytest.fixture(scope="module")
def reference(tables: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of one run reading the whole file as one chunk."""
    out = tmp_path_factory.mktemp("reference") / "out"
    preprocessing.preprocess("csv", out, data_dir=tables, chunk_rows=10**9)
    return out


def output_bytes(folder: Path) -> dict[str, bytes]:
    """The bytes of every file a run writes."""
    return {name: (folder / name).read_bytes() for name in OUTPUT_FILES}


def playlist_starts(folder: Path) -> np.ndarray:
    """Row offsets (in the sorted file) where each playlist starts, plus the end."""
    return np.asarray(load_training_file(folder).offsets)


@pytest.mark.parametrize("chunk_rows", [997, 4096, 25_000])
def test_any_chunk_size_gives_the_same_files(
    tables: Path, reference: Path, tmp_path: Path, chunk_rows: int
) -> None:
    offsets = playlist_starts(reference)
    boundaries = np.arange(chunk_rows, offsets[-1], chunk_rows)
    # the generator writes playlists in order, so file rows and training rows coincide
    inside = ~np.isin(boundaries, offsets)
    assert inside.any(), "some chunk boundary must cut a playlist"
    preprocessing.preprocess("csv", tmp_path / "out", data_dir=tables, chunk_rows=chunk_rows)
    assert output_bytes(tmp_path / "out") == output_bytes(reference)


def test_a_playlist_spanning_many_chunks_is_read_whole(tables: Path, tmp_path: Path) -> None:
    path = tables / "playlist_songs.csv"
    whole = read_csv_playlists(path, chunk_rows=10**9)
    lengths = np.diff(np.flatnonzero(np.diff(whole[0], prepend=-1, append=-1)))
    chunk_rows = int(lengths.max()) // 3
    assert chunk_rows >= 1
    pieces = read_csv_playlists(path, chunk_rows=chunk_rows)
    for expected, got in zip(whole, pieces, strict=True):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert pieces[1].dtype == np.int32


def test_rows_out_of_order_across_chunks_give_the_same_files(
    tables: Path, reference: Path, tmp_path: Path
) -> None:
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for table in tables.iterdir():
        (shuffled / table.name).write_bytes(table.read_bytes())
    header, *rows = (tables / "playlist_songs.csv").read_text().splitlines(keepends=True)
    order = np.random.default_rng(7).permutation(len(rows))
    (shuffled / "playlist_songs.csv").write_text(header + "".join(rows[i] for i in order))
    preprocessing.preprocess("csv", tmp_path / "out", data_dir=shuffled, chunk_rows=1000)
    assert output_bytes(tmp_path / "out") == output_bytes(reference)


def test_songs_read_in_pieces_equal_songs_read_whole(tables: Path) -> None:
    whole = read_csv_songs(tables / "songs.csv", chunk_rows=10**9)
    pd.testing.assert_frame_equal(read_csv_songs(tables / "songs.csv", chunk_rows=333), whole)
    assert len(whole) > 333


@pytest.mark.parametrize("bad", ["", "x", "1.5", "99999999999999999999"])
def test_a_bad_value_in_a_late_chunk_is_named_as_in_one_piece(
    tables: Path, tmp_path: Path, bad: str
) -> None:
    lines = (tables / "playlist_songs.csv").read_text().splitlines(keepends=True)
    row = len(lines) - 5
    playlist, _, song = lines[row].rstrip("\n").split(",")
    lines[row] = f"{playlist},{bad},{song}\n"
    path = tmp_path / "playlist_songs.csv"
    path.write_text("".join(lines))
    messages = []
    for chunk_rows in (10**9, 1000):
        with pytest.raises(DataError) as error:
            read_csv_playlists(path, chunk_rows=chunk_rows)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert f"line {row + 1}: pos" in messages[0]


def test_postgres_equals_csv_at_small_scale(
    tables: Path, reference: Path, tmp_path: Path, pg_dsn: str
) -> None:
    with db.connected(pg_dsn) as connection:
        db.create_schema(connection)
        db.load_csv_tables(connection, tables)
    summary = preprocessing.preprocess("postgres", tmp_path / "pg", dsn=pg_dsn, itersize=333)
    assert output_bytes(tmp_path / "pg") == output_bytes(reference)
    assert summary["playlists"] == 2000


def test_memory_mapped_training_file_equals_the_read_one(reference: Path) -> None:
    read = load_training_file(reference)
    mapped = load_training_file(reference, mmap=True)
    for name in ("playlist_ids", "offsets", "songs"):
        got, expected = getattr(mapped, name), getattr(read, name)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    mapped.songs[0] = -1  # copy-on-write: private to this process, the file is unchanged
    assert load_training_file(reference).songs[0] == read.songs[0]


def test_memory_mapping_refuses_pickles_and_reads_compressed_members(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", values=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="object arrays are refused"):
        read_npz(tmp_path / "objects.npz", mmap=True)
    np.savez_compressed(tmp_path / "small.npz", values=np.arange(5), empty=np.zeros(0))
    arrays = read_npz(tmp_path / "small.npz", mmap=True)
    np.testing.assert_array_equal(arrays["values"], np.arange(5))
    assert arrays["empty"].shape == (0,)
