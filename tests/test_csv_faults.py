"""CSV input that used to pass as something else (issue 15 F5, F6, F9, F10, F16).

Every case is bad input that must end as exit status 2 with one line naming the file, the
line (the physical line the row starts on) and, for a value, the field.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_preprocessing import run_main, song_line, write_tables

import csv_tables
import preprocessing
from config import REPO_ROOT
from preprocessing_utils import DataError

BIG = 2**63


def bad_run(tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Preprocess ``tables`` expecting bad input; returns the one-line message."""
    status, _, err = run_main(["--data", str(tables), "--out", str(tmp_path / "out")], capsys)
    assert status == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err.strip()


@pytest.mark.parametrize("playlist_id", [BIG, 2**64, -BIG - 1])
@pytest.mark.parametrize("with_songs", [True, False])
def test_playlist_ids_outside_bigint_name_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], playlist_id: int, with_songs: bool
) -> None:
    tables = write_tables(tmp_path / "tables",
                          playlist_songs=[(3, 0, 1000010), (playlist_id, 0, 1000020)])
    if not with_songs:
        (tables / "songs.csv").unlink()
    err = bad_run(tables, tmp_path, capsys)
    assert err == (f"error: playlist_songs.csv line 3: playlist_id = '{playlist_id}' is outside "
                   f"the bigint range [-9223372036854775808, 9223372036854775807]")
    assert not (tmp_path / "out").exists()


def test_bigint_bounds_themselves_are_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = write_tables(tmp_path / "tables", playlist_songs=[
        (BIG - 1, 0, 1000010), (-BIG, 0, 1000020), (-BIG, 1, 1000010)])
    status, summary, _ = run_main(["--data", str(tables), "--out", str(tmp_path / "out")],
                                  capsys)
    assert (status, summary["playlists"], summary["rows_kept"]) == (0, 2, 3)


@pytest.mark.parametrize(("field", "value"), [
    ("song_id", BIG), ("album_id", BIG), ("artist_id", -BIG - 1), ("song_id", 2**64)])
def test_song_ids_outside_bigint_are_errors_not_dropped_songs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: int
) -> None:
    bad = song_line(value) if field == "song_id" else song_line(1000020, **{field: value})
    songs = [song_line(1000010), bad, song_line(1000030)]
    tables = write_tables(tmp_path / "tables", songs=songs,
                          playlist_songs=[(3, 0, 1000010), (3, 1, 1000030)])
    assert bad_run(tables, tmp_path, capsys) == (
        f"error: songs.csv line 3: {field} = '{value}' is outside the bigint range "
        f"[-9223372036854775808, 9223372036854775807]")


@pytest.mark.parametrize("pos", [2**31, 2**63, -1])
def test_a_position_outside_integer_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pos: int
) -> None:
    tables = write_tables(tmp_path / "tables", playlist_songs=[(3, 0, 1000010), (3, pos, 1000020)])
    assert bad_run(tables, tmp_path, capsys) == (
        f"error: playlist_songs.csv line 3: pos = '{pos}' is outside the range [0, 2147483647]")


def test_the_largest_integer_position_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = write_tables(tmp_path / "tables",
                          playlist_songs=[(3, 0, 1000010), (3, 2**31 - 1, 1000020)])
    status, summary, _ = run_main(["--data", str(tables), "--out", str(tmp_path / "out")],
                                  capsys)
    assert (status, summary["rows_kept"], summary["renumbered_playlists"]) == (0, 2, 1)


def test_a_fraction_in_an_integer_column_is_refused_as_postgresql_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'7.0' once parsed the whole column as floats, which rounds ids above 2**53."""
    tables = write_tables(tmp_path / "tables", playlist_songs=[(2**53 + 1, 0, 1000010),
                                                               (3, "1.0", 1000020)])
    assert bad_run(tables, tmp_path, capsys) == (
        "error: playlist_songs.csv line 3: pos = '1.0' is not an integer")


@pytest.mark.parametrize("where", ["middle", "last line"])
def test_a_songs_row_cut_to_ten_fields_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    tables = write_tables(tmp_path / "tables")
    lines = (tables / "songs.csv").read_text().splitlines()
    cut = 3 if where == "middle" else len(lines) - 1
    cut_row = io.StringIO()
    csv.writer(cut_row, lineterminator="").writerow(next(csv.reader([lines[cut]]))[:10])
    lines[cut] = cut_row.getvalue()
    text = "\n".join(lines) + ("\n" if where == "middle" else "")
    (tables / "songs.csv").write_text(text)
    assert bad_run(tables, tmp_path, capsys) == (
        f"error: songs.csv line {cut + 1}: the row starting on this line has 10 fields, the "
        f"header 20 (too few: a short or cut-off row)")


@pytest.mark.parametrize(("table", "row"), [
    ("playlist_songs.csv", "3,7"), ("playlist_songs.csv", "3,7,1000010,oops"),
    ("songs.csv", song_line(1000060) + ",1"), ("albums.csv", "20003,Third"),
    ("artists.csv", "503,Gamma,pop,extra")])
def test_short_and_long_rows_of_every_table_are_errors_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, row: str
) -> None:
    tables = write_tables(tmp_path / "tables")
    lines = (tables / table).read_text().splitlines()
    (tables / table).write_text("\n".join([*lines[:2], row, *lines[2:]]) + "\n")
    found, expected = len(next(csv.reader([row]))), lines[0].count(",") + 1
    message = (f"{table} line 3: the row starting on this line has {found} fields, the header "
               f"{expected}")
    if table in ("albums.csv", "artists.csv"):
        with pytest.raises(DataError, match=message):
            preprocessing.read_catalog_names(tables)
    else:
        assert message in bad_run(tables, tmp_path, capsys)


@pytest.mark.parametrize(("table", "line"), [("songs.csv", 4), ("playlist_songs.csv", 3),
                                             ("songs.csv", 1)])
def test_a_byte_that_is_not_utf8_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, line: int
) -> None:
    tables = write_tables(tmp_path / "tables")
    lines = (tables / table).read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b",", b"\xe9,", 1)
    (tables / table).write_bytes(b"\n".join(lines))
    assert bad_run(tables, tmp_path, capsys) == (
        f"error: {table} line {line}: not valid UTF-8 (byte 0xe9); save the file as UTF-8")


def test_non_utf8_from_the_command_line_is_one_line_without_traceback(tmp_path: Path) -> None:
    tables = write_tables(tmp_path / "tables")
    (tables / "songs.csv").write_bytes((tables / "songs.csv").read_bytes() + b"\xff\xfe\n")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "preprocessing.py"), "--data",
                             str(tables), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("error: songs.csv line 7: not valid UTF-8 (byte 0xff); save the "
                             "file as UTF-8\n")


def test_line_numbers_stay_right_after_quoted_newlines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    songs = [song_line(1000010, name='"Two\nlines"'), song_line(1000020, name='"Three\n\nlines"'),
             song_line(1000030), song_line(1000040, key=12)]
    tables = write_tables(tmp_path / "tables", songs=songs)
    # header 1, first song 2-3, second 4-6, third 7, fourth 8
    assert "error: songs.csv line 8 (song_id 1000040): key = 12" in bad_run(tables, tmp_path,
                                                                            capsys)
    songs[3] = song_line(1000040, danceability="high")
    write_tables(tables, songs=songs)
    assert bad_run(tables, tmp_path, capsys) == (
        "error: songs.csv line 8: danceability = 'high' is not a number")
    songs[3] = ",".join(song_line(1000040, name="plain").split(",")[:19])
    write_tables(tables, songs=songs)
    assert "songs.csv line 8: the row starting on this line has 19 fields" in bad_run(
        tables, tmp_path, capsys)


@pytest.mark.parametrize(("text", "message"), [
    ('a,b\n1,"2\n3,4\n', "line 2: a quoted field in the row starting on this line is never "
                         "closed"),
    ('a,b\n1,2\n3,4"x\n', "line 3: a quote inside an unquoted field"),
    ('a,b\n1,2\n 3,"x"\n', None),
    ('a,b\n1,2\r3,4\n', "line 2: carriage return without a line feed"),
    ('a,b\n1,2\n\n3,4\n', None),
    ('a,b\r\n1,2\r\n\r\n"3\r\n",4\r\n5,6\r', None),
    ('\ufeff"a","b"\n"1","2"""\n', None),
    ('a,b\n1,2\n3,4\n5\n', "line 4: the row starting on this line has 1 fields, the header 2"),
])
def test_scan_csv_quoting_rules(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode())
    if message is None:
        csv_tables.scan_csv(path)
    else:
        with pytest.raises(DataError, match=f"^t.csv {message}"):
            csv_tables.scan_csv(path)


def _reference_start_lines(text: str) -> list[int]:
    """Physical start line of every data row, from Python's csv module (a second parser)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    starts, previous = [], 0
    for _ in reader:
        starts.append(previous + 1)
        previous = reader.line_num
    return starts[1:]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 8, 13, 1 << 24])
def test_row_start_lines_match_pythons_csv_module_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    random = np.random.default_rng(chunk_bytes)
    cells = ["plain", '"a,b"', '"one\ntwo"', '"x""y"', '"\r\n\n"', "é", '"ü\n"', "", '""']
    rows = [",".join(cells[i] for i in random.integers(0, len(cells), 3)) for _ in range(60)]
    text = "\r\n".join(["a,b,c", *rows]) + "\r\n"
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode())
    monkeypatch.setattr(csv_tables, "SCAN_CHUNK_BYTES", chunk_bytes)
    layout = csv_tables.scan_csv(path)
    assert layout.start_lines().tolist() == _reference_start_lines(text)
    path.write_bytes(text.encode()[:-2] + b"\xc3")
    with pytest.raises(DataError, match=f"line {text.count(chr(10))}: not valid UTF-8"):
        csv_tables.scan_csv(path)

