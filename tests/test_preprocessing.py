"""preprocessing.py: CSV and PostgreSQL paths, cleaning rules, bad input, the demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import db
import preprocessing
from config import DEMO_DATA_DIR, DEMO_ENCODERS_DIR, REPO_ROOT
from preprocessing_utils import Encoders, load_training_file

SONG_HEADER = ("song_id,name,album_id,artist_id,explicit,danceability,energy,key,loudness,mode,"
               "speechiness,acousticness,instrumentalness,liveness,valence,tempo,duration_ms,"
               "time_signature,disc_number,track_number")
# Playlist 9 has gapped positions (1, 4, 6); ids are deliberately not contiguous.
PLAYLIST_SONGS = [(3, 0, 1000030), (3, 1, 1000010), (3, 2, 1000020), (9, 6, 1000040),
                  (9, 1, 1000010), (9, 4, 1000020), (5, 0, 1000040)]


def song_line(song_id: int, **values: object) -> str:
    """One songs.csv line; keyword arguments override single fields ('' for NULL)."""
    row: dict[str, object] = {
        "song_id": song_id, "name": f'"Song {song_id}, live"', "album_id": 20001,
        "artist_id": 501, "explicit": 0, "danceability": 0.123456789, "energy": 0.5, "key": 2,
        "loudness": -7.25, "mode": 1, "speechiness": 0.04, "acousticness": 0.3,
        "instrumentalness": 0.0, "liveness": 0.12, "valence": 0.6, "tempo": 118.5,
        "duration_ms": 201_000, "time_signature": 4, "disc_number": 1, "track_number": 2,
    }
    row.update(values)
    return ",".join(str(row[column]) for column in SONG_HEADER.split(","))


def write_tables(folder: Path, songs: list[str] | None = None,
                 playlist_songs: list[tuple[int, int, int]] | None = None) -> Path:
    """Write a small, valid set of the five CSV tables into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "artists.csv").write_text("artist_id,name,genre\n501,Alpha,rock\n502,Beta,\n")
    (folder / "albums.csv").write_text(
        "album_id,name,artist_id,release_year\n20001,First,501,1999\n20002,Second,502,\n")
    songs = songs if songs is not None else [
        song_line(1000010, track_number=1, key=0, danceability=0.9, explicit="true"),
        song_line(1000020, album_id=20002, artist_id=502, key="", time_signature=1),
        song_line(1000030, energy="", duration_ms=99_999),
        song_line(1000040, album_id="", tempo=97.123456),
        song_line(1000050),
    ]
    (folder / "songs.csv").write_text("\n".join([SONG_HEADER, *songs]) + "\n")
    (folder / "playlists.csv").write_text("playlist_id,name\n3,Morning\n5,Solo\n9,Gaps\n11,Empty\n")
    rows = playlist_songs if playlist_songs is not None else PLAYLIST_SONGS
    (folder / "playlist_songs.csv").write_text(
        "playlist_id,pos,song_id\n" + "".join(f"{p},{q},{s}\n" for p, q, s in rows))
    return folder


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    """Run the CLI in-process; returns exit status, the final JSON line (or {}) and stderr."""
    status = preprocessing.main(args)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1]) if status == 0 else {}
    return status, summary, captured.err


def decoded_playlists(folder: Path) -> dict[int, list[int]]:
    """The training file of ``folder`` as catalog song ids per playlist id."""
    encoders = Encoders.load(folder / "encoders")
    sequences = load_training_file(folder, n_song_tokens=encoders.n_song_tokens)
    return {int(playlist_id): encoders.decode_songs(
                sequences.songs[sequences.offsets[p]:sequences.offsets[p + 1]]).tolist()
            for p, playlist_id in enumerate(sequences.playlist_ids)}


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """A folder holding the small valid CSV tables."""
    return write_tables(tmp_path / "tables")


def test_csv_run_orders_playlists_and_reports_every_cleaning_rule(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, summary, _ = run_main(["--source", "csv", "--data", str(tables),
                                   "--out", str(tmp_path / "out")], capsys)
    assert status == 0
    assert decoded_playlists(tmp_path / "out") == {
        3: [1000030, 1000010, 1000020], 5: [1000040], 9: [1000010, 1000020, 1000040]}
    assert summary["renumbered_playlists"] == 1
    assert summary["feature_cleaning"] == {"null_energy": 1, "null_key": 1,
                                           "time_signature_below_3": 1}
    assert (summary["songs"], summary["albums"], summary["artists"]) == (4, 2, 2)
    assert summary["has_side_info"] is True
    assert summary["n_features"] == 21
    assert summary["dropped_rows"] == {}


def test_playlist_songs_alone_is_enough(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    (folder / "playlist_songs.csv").write_text("playlist_id,pos,song_id\n1,0,7\n1,1,8\n2,0,7\n")
    status, summary, _ = run_main(["--data", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert status == 0
    assert summary["has_side_info"] is False
    assert summary["n_features"] == 0
    assert decoded_playlists(tmp_path / "out") == {1: [7, 8], 2: [7]}
    assert Encoders.load(tmp_path / "out" / "encoders").song_features.shape == (4, 0)


def test_songs_missing_from_the_catalog_are_dropped_and_reported(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tables(tables, playlist_songs=[*PLAYLIST_SONGS, (3, 3, 1000099), (7, 0, 1000098)])
    status, summary, _ = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert status == 0
    assert summary["dropped_rows"] == {"song_not_in_catalog": 2}
    assert summary["dropped_distinct_songs"] == 2
    assert summary["dropped_empty_playlists"] == 1
    assert summary["playlists"] == 3
    assert decoded_playlists(tmp_path / "out")[3] == [1000030, 1000010, 1000020]


def test_loaded_encoders_drop_and_count_songs_they_do_not_know(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["--data", str(tables), "--out", str(tmp_path / "first"),
                     "--refit-encoders", str(tmp_path / "fitted")], capsys)[0] == 0
    fitted = Encoders.load(tmp_path / "fitted")
    write_tables(tables, playlist_songs=[*PLAYLIST_SONGS, (3, 3, 1000050), (3, 4, 1000077)])
    status, summary, _ = run_main(["--data", str(tables), "--out", str(tmp_path / "second"),
                                   "--encoders", str(tmp_path / "fitted")], capsys)
    assert status == 0
    assert summary["dropped_rows"] == {"song_unknown_to_encoders": 2}
    assert summary["encoders_fingerprint"] == fitted.fingerprint
    assert Encoders.load(tmp_path / "second" / "encoders").fingerprint == fitted.fingerprint


@pytest.mark.parametrize(("rows", "message"), [
    ([*PLAYLIST_SONGS, (9, 4, 1000030)], "playlist 9 has pos 4 more than once"),
    ([(3, -1, 1000010)], "playlist_songs.csv line 2: pos = '-1' is outside the range [0, "),
    ([(3, 0, 1000010), (3, "x", 1000020)], r"playlist_songs.csv line 3: pos = 'x' is not an"),
    ([(3, 0, "1000010.5")], "line 2: song_id = '1000010.5' is not an integer"),
    ([(3, 0, "")], "line 2: song_id is empty"),
    ([(3, 0, 1000099)], "no usable rows (1 read, 1 with songs missing"),
    ([], "no usable rows (0 read"),
])
def test_bad_playlist_rows_are_errors_naming_where(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    rows: list[tuple[object, object, object]], message: str,
) -> None:
    write_tables(tables, playlist_songs=rows)
    status, _, err = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert err.startswith("error: ")
    assert message in err or pytest.fail(err)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("danceability", 1.7, "danceability = 1.7 must be in [0, 1]"),
    ("duration_ms", -5, "duration_ms = -5 must be an integer in"),
    ("key", 12, "key = 12 must be an integer in [0, 11]"),
    ("time_signature", 9, "time_signature = 9 must be an integer in [0, 7]"),
    ("mode", "minor", "mode = 'minor' is not an integer"),
])
def test_out_of_range_features_are_errors_naming_file_line_and_field(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    field: str, value: object, message: str,
) -> None:
    write_tables(tables, songs=[song_line(1000010), song_line(1000020, **{field: value}),
                                song_line(1000030), song_line(1000040)])
    status, _, err = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert "songs.csv line 3" in err
    assert message in err


def test_missing_column_and_malformed_row_name_the_file(
    tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    songs = (tables / "songs.csv").read_text().splitlines()
    (tables / "songs.csv").write_text("\n".join([songs[0].replace(",tempo", ""),
                                                 *(line.rsplit(",", 1)[0] for line in songs[1:])]))
    status, _, err = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert (status, err.strip()) == (2, "error: songs.csv: missing column 'tempo' (required: "
                                        + ", ".join(preprocessing.SONG_COLUMNS) + ")")
    write_tables(tables)
    with (tables / "playlist_songs.csv").open("a") as file:
        file.write("3,7,1000010,oops\n")
    status, _, err = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert "playlist_songs.csv line 9: the row starting on this line has 4 fields" in err


def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--source",
                             "csv", "--data", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "data folder not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_postgres_path_equals_csv_path_and_loading_is_idempotent(
    tables: Path, tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["--load-csv", str(tables), "--dsn", pg_dsn], capsys)[0] == 0
    status, summary, _ = run_main(["--load-csv", str(tables), "--dsn", pg_dsn], capsys)
    assert (status, set(summary["inserted"].values())) == (0, {0})
    csv_status, csv_summary, _ = run_main(["--data", str(tables), "--out",
                                           str(tmp_path / "csv")], capsys)
    pg_status, pg_summary, _ = run_main(["--source", "postgres", "--dsn", pg_dsn, "--out",
                                         str(tmp_path / "pg"), "--itersize", "2"], capsys)
    assert csv_status == pg_status == 0
    for name in ("training.npz", "encoders/encoders.npz", "encoders/encoders.json"):
        assert (tmp_path / "csv" / name).read_bytes() == (tmp_path / "pg" / name).read_bytes()
    ignored = {"source", "seconds", "training_file"}
    assert ({k: v for k, v in csv_summary.items() if k not in ignored}
            == {k: v for k, v in pg_summary.items() if k not in ignored})
    from_csv = preprocessing.read_catalog_names(tables)
    connection = db.connect(pg_dsn)
    try:
        # One snapshot per read, inside a caller's open transaction or under autocommit alike.
        from_pg = preprocessing.read_catalog_names(connection)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert preprocessing.read_catalog_names(connection).equals(from_pg)
        connection.rollback()
        connection.autocommit = True
        assert preprocessing.read_catalog_names(connection).equals(from_pg)
        assert connection.autocommit
    finally:
        connection.close()
    assert from_pg.equals(from_csv)
    assert from_csv.loc[1000040].tolist() == ["Song 1000040, live", "Alpha", ""]


def test_load_refuses_rows_the_schema_rejects(
    tables: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tables(tables, songs=[song_line(1000010, danceability=1.7)])
    status, _, err = run_main(["--load-csv", str(tables), "--dsn", pg_dsn], capsys)
    assert status == 2
    assert err.startswith("error: songs.csv: ") and "songs_danceability_check" in err


def test_postgres_errors_are_one_line_messages(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(["--source", "postgres", "--dsn", pg_dsn, "--out",
                               str(tmp_path / "pg")], capsys)
    assert status == 2
    assert "playlist_songs" in err and "--create-schema" in err
    status, _, err = run_main(["--source", "postgres", "--out", str(tmp_path / "pg"),
                               "--dsn", "postgresql://nobody:secret@127.0.0.1:1/none"], capsys)
    assert status == 2
    assert "cannot use PostgreSQL at nobody@127.0.0.1:1/none" in err
    assert "secret" not in err


def test_read_catalog_names_without_songs_is_empty(tmp_path: Path) -> None:
    names = preprocessing.read_catalog_names(tmp_path)
    assert names.empty
    assert list(names.columns) == ["song", "artist", "album"]


@pytest.fixture(scope="module")
def demo_database(module_pg_dsn: str) -> str:
    """A database holding the committed demo tables."""
    with db.connected(module_pg_dsn) as connection:
        db.create_schema(connection)
        db.load_csv_tables(connection, DEMO_DATA_DIR)
    return module_pg_dsn


def test_a_load_leaves_planner_statistics_of_every_table_it_loaded(demo_database: str) -> None:
    """Right after a load, before autovacuum runs, the planner must know the tables: without
    statistics it read a queue batch's playlists by scanning all of playlist_songs (253 ms a
    batch at 2.26M rows, against 0.5 ms by its index)."""
    with db.connected(demo_database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename, count(*) FROM pg_stats WHERE schemaname = 'public' "
                       "GROUP BY tablename")
        columns_with_statistics = dict(cursor.fetchall())
    for table in db.CSV_COLUMNS:
        assert columns_with_statistics.get(table, 0) > 0, table


def test_demo_data_gives_identical_files_from_postgres_and_csv(
    demo_database: str, tmp_path: Path
) -> None:
    csv = preprocessing.preprocess("csv", tmp_path / "csv", data_dir=DEMO_DATA_DIR)
    pg = preprocessing.preprocess("postgres", tmp_path / "pg", dsn=demo_database)
    assert csv["training_sha256"] == pg["training_sha256"]
    assert csv["encoders_fingerprint"] == pg["encoders_fingerprint"]
    assert (tmp_path / "csv" / "training.npz").read_bytes() == (
        tmp_path / "pg" / "training.npz").read_bytes()
    assert csv["playlists"] == 3000
    assert csv["dropped_rows"] == {}


def test_fitting_does_not_depend_on_numpys_vector_instructions(tmp_path: Path) -> None:
    """The same fit with NumPy's AVX-512 code paths switched off (a no-op on CPUs without)."""
    command = [sys.executable, "preprocessing.py", "--source", "csv", "--data",
               str(DEMO_DATA_DIR), "--refit-encoders", str(tmp_path / "encoders"),
               "--out", str(tmp_path / "out")]
    environment = {**os.environ, "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
    output = subprocess.run(command, cwd=REPO_ROOT, env=environment, check=True,
                            capture_output=True, text=True).stdout
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["encoders_fingerprint"] == Encoders.load(DEMO_ENCODERS_DIR).fingerprint


def test_committed_encoders_equal_a_fresh_fit_on_the_demo_data(tmp_path: Path) -> None:
    summary = preprocessing.preprocess("csv", tmp_path / "out", data_dir=DEMO_DATA_DIR)
    committed = Encoders.load(DEMO_ENCODERS_DIR)
    assert committed.fingerprint == summary["encoders_fingerprint"], (
        "preprocessing encoders/ is stale: run `make encoders` and commit it")
    sequences = load_training_file(tmp_path / "out", n_song_tokens=committed.n_song_tokens)
    assert np.array_equal(np.unique(sequences.songs),
                          np.arange(2, committed.n_song_tokens))
