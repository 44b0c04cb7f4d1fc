"""Reading the catalog's CSV tables exactly, with errors naming file, line and field.

A byte scan in bounded memory checks every file as PostgreSQL's COPY would read it (UTF-8,
quotes, line endings, the same number of fields in every row) and finds the physical line each
row starts on; pandas then reads the columns, and integers are parsed exactly (bigint ids,
integer pos), never through floats. Every refusal is a DataError naming the file, the line (where
the row starts, counting newlines inside quoted fields), the column and the value.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from db import CSV_COLUMNS
from preprocessing_utils import RAW_FEATURE_FIELDS, SONG_COLUMNS, DataError, check_songs

INTEGER_FEATURES = ("explicit", "key", "mode", "duration_ms", "time_signature", "disc_number",
                    "track_number")
BOOLEAN_WORDS = {"true": "1", "false": "0", "t": "1", "f": "0"}

QUOTE, COMMA, NEWLINE, CARRIAGE_RETURN = (ord(char) for char in '",\n\r')
UTF8_BOM = b"\xef\xbb\xbf"
SCAN_CHUNK_BYTES = 1 << 24
# rows per piece when reading playlist_songs.csv (~100 MB of parser memory at a time)
DEFAULT_CHUNK_ROWS = 1_000_000
# songs.csv rows parsed at a time: its cells are read as strings (~20 per row)
SONG_CHUNK_ROWS = 100_000
BIGINT = (-(2**63), 2**63 - 1)
# playlist_songs.pos is `integer NOT NULL CHECK (pos >= 0)` in sql/schema.sql
POSITION_RANGE = (0, 2**31 - 1)
INTEGER_LITERAL = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class CsvLayout:
    """Where each row of a CSV file starts, from a byte scan that parses quotes as COPY does.

    Row r (0 = the header) starts on physical line r + 1 plus the newlines inside quoted
    fields of the rows before it; only rows holding such newlines are stored.
    """

    rows: int
    multiline_rows: np.ndarray
    quoted_newlines: np.ndarray

    def start_lines(self) -> np.ndarray:
        """The physical line (1-based) on which each data row (after the header) starts."""
        shift = np.zeros(self.rows + 1, dtype=np.int64)
        np.add.at(shift, self.multiline_rows + 1, self.quoted_newlines)
        lines = np.arange(self.rows, dtype=np.int64) + 1 + np.cumsum(shift)[:self.rows]
        return lines[1:]


def _line_of(newlines: np.ndarray, first_line: int, position: int) -> int:
    """Physical line of a byte: the chunk's first line plus the newlines before it."""
    return first_line + int(np.searchsorted(newlines, position))


def _quoted(quotes: np.ndarray, parity: int, positions: np.ndarray) -> np.ndarray:
    """Which positions lie inside a quoted field (an odd number of quotes before them)."""
    if not len(quotes):
        return np.full(len(positions), bool(parity))
    return ((np.searchsorted(quotes, positions) + parity) & 1).astype(bool)


def _field_count_error(name: str, line: int, found: int, expected: int) -> DataError:
    """The error for a row with more or fewer fields than the header."""
    why = ("too few: a short or cut-off row" if found < expected
           else "too many: an extra field or an unquoted comma")
    return DataError(f"{name} line {line}: the row starting on this line has {found} fields, "
                     f"the header {expected} ({why})")


def scan_csv(path: Path) -> CsvLayout:
    """Check a CSV file's bytes in bounded memory and find where its rows start.

    Quotes are read as PostgreSQL's COPY reads them (a newline or comma inside a quoted field
    is data), so the line numbers in every later message are the physical lines a text editor
    shows. DataError, naming the file and line, for: a byte that is not UTF-8, a row with more
    or fewer fields than the header (a truncated line too), a quote inside an unquoted field
    (parsers disagree on it), a carriage return not followed by a line feed, an unclosed quote.
    """
    name = path.name
    decoder = codecs.getincrementaldecoder("utf-8")()
    multiline: list[np.ndarray] = []
    extra: list[np.ndarray] = []
    offset, parity, previous, line = 0, 0, NEWLINE, 1
    row, row_start, row_line, row_commas, fields = 0, 0, 1, 0, -1
    pending_return = False
    with path.open("rb") as file:
        head = file.read(len(UTF8_BOM))
        chunk = head[len(UTF8_BOM):] if head == UTF8_BOM else head
        offset = len(head) - len(chunk)
        row_start = offset
        while True:
            chunk += file.read(SCAN_CHUNK_BYTES)
            if not chunk:
                break
            data = np.frombuffer(chunk, dtype=np.uint8)
            newlines = np.flatnonzero(data == NEWLINE)
            pending = len(decoder.getstate()[0])
            if pending or not chunk.isascii():
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    at = max(error.start - pending, 0)
                    raise DataError(f"{name} line {_line_of(newlines, line, at)}: not valid "
                                    f"UTF-8 (byte 0x{chunk[at]:02x}); save the file as "
                                    f"UTF-8") from None
            if pending_return and data[0] != NEWLINE:
                raise DataError(f"{name} line {line}: carriage return without a line feed "
                                f"(use \\n or \\r\\n line endings)")
            quotes = np.flatnonzero(data == QUOTE)
            opening = quotes[(np.arange(len(quotes)) + parity) % 2 == 0]
            before = np.where(opening > 0, data[np.maximum(opening - 1, 0)], previous)
            stray = opening[~np.isin(before, (COMMA, NEWLINE, QUOTE))]
            if len(stray):
                raise DataError(f"{name} line {_line_of(newlines, line, int(stray[0]))}: a quote "
                                f"inside an unquoted field (quote the whole field and double "
                                f"the quotes in it)")
            returns = np.flatnonzero(data == CARRIAGE_RETURN)
            returns = returns[~_quoted(quotes, parity, returns)]
            pending_return = bool(len(returns)) and int(returns[-1]) == len(data) - 1
            inner = returns[:-1] if pending_return else returns
            bare = inner[data[inner + 1] != NEWLINE]
            if len(bare):
                raise DataError(f"{name} line {_line_of(newlines, line, int(bare[0]))}: carriage "
                                f"return without a line feed (use \\n or \\r\\n line endings)")
            inside = _quoted(quotes, parity, newlines)
            ends = newlines[~inside]
            commas = np.flatnonzero(data == COMMA)
            commas = commas[~_quoted(quotes, parity, commas)]
            if len(ends):
                before_end = np.searchsorted(commas, ends)
                counts = np.diff(before_end, prepend=0)
                counts[0] += row_commas
                starts = np.concatenate([[row_start - offset], ends[:-1] + 1])
                last = np.where(ends > 0, data[np.maximum(ends - 1, 0)], previous)
                blank = (ends == starts) | ((ends - starts == 1) & (last == CARRIAGE_RETURN))
                if fields < 0:
                    fields = int(counts[0]) + 1
                    blank[0] = False
                wrong = np.flatnonzero(~blank & (counts + 1 != fields))
                if len(wrong):
                    at = int(wrong[0])
                    first = row_line if at == 0 else _line_of(newlines, line, int(starts[at]))
                    raise _field_count_error(name, first, int(counts[at]) + 1, fields)
                rows_here = np.searchsorted(ends, newlines[inside]) + row
                if len(rows_here):
                    found, times = np.unique(rows_here, return_counts=True)
                    multiline.append(found)
                    extra.append(times)
                row += len(ends)
                row_start = offset + int(ends[-1]) + 1
                row_line = line + int(np.searchsorted(newlines, ends[-1])) + 1
                row_commas = len(commas) - int(before_end[-1])
            else:
                row_commas += len(commas)
                if inside.any():
                    multiline.append(np.array([row]))
                    extra.append(np.array([int(inside.sum())]))
            line += len(newlines)
            parity = (parity + len(quotes)) & 1
            previous = int(data[-1])
            offset += len(chunk)
            chunk = b""
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{name} line {line}: not valid UTF-8 (the file ends inside a "
                        f"character); save the file as UTF-8") from None
    if parity:
        raise DataError(f"{name} line {row_line}: a quoted field in the row starting on this "
                        f"line is never closed")
    if offset > row_start:
        blank = offset - row_start == 1 and previous == CARRIAGE_RETURN
        if fields < 0:
            fields = row_commas + 1
        elif not blank and row_commas + 1 != fields:
            raise _field_count_error(name, row_line, row_commas + 1, fields)
        row += 1
    if not row:
        raise DataError(f"{path}: empty file (expected a header line)")
    rows_with_newlines = np.concatenate(multiline) if multiline else np.zeros(0, np.int64)
    newline_counts = np.concatenate(extra) if extra else np.zeros(0, np.int64)
    return CsvLayout(row, rows_with_newlines.astype(np.int64), newline_counts.astype(np.int64))


def _csv_header(path: Path) -> list[str]:
    """Column names of a CSV file (after ``scan_csv`` has checked its bytes)."""
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
        return [str(column).strip() for column in header]
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (expected a header line)") from None


def _open_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], CsvLayout]:
    """Scan a CSV file and read its header; DataError when it is missing, bad or lacks a column."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    layout = scan_csv(path)
    header = _csv_header(path)
    for column in required:
        if column not in header:
            raise DataError(f"{path.name}: missing column {column!r} "
                            f"(required: {', '.join(required)})")
    return header, layout


def _read_columns(
    path: Path, header: list[str], columns: list[str], **options: Any
) -> pd.DataFrame:
    """The named columns of a scanned CSV file through pandas' C parser, in the order asked."""
    positions = sorted({header.index(column) for column in columns})
    try:
        frame = pd.read_csv(path, usecols=positions, encoding="utf-8-sig", **options)
    except pd.errors.ParserError as error:
        raise _malformed(path, error) from None
    frame.columns = [header[position] for position in positions]
    return frame[columns]


def _malformed(path: Path, error: pd.errors.ParserError) -> DataError:
    """The error for a row pandas' parser refuses (after the byte scan accepted the file)."""
    detail = str(error).replace("Error tokenizing data. C error: ", "").strip()
    return DataError(f"{path.name}: malformed row: {detail}")


def _column_chunks(
    path: Path, header: list[str], columns: list[str], chunk_rows: int, **options: Any
) -> Iterator[pd.DataFrame]:
    """``_read_columns`` in pieces of ``chunk_rows`` rows, so a large table is never whole.

    A header-only file gives one empty piece.
    """
    positions = sorted({header.index(column) for column in columns})
    names = [header[position] for position in positions]
    try:
        with pd.read_csv(path, usecols=positions, encoding="utf-8-sig", chunksize=chunk_rows,
                         **options) as reader:
            for frame in reader:
                frame.columns = names
                yield frame[columns]
    except pd.errors.ParserError as error:
        raise _malformed(path, error) from None


def _read_csv_strings(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, np.ndarray]:
    """Cells of a CSV file's columns as stripped strings, and the line each row starts on.

    ``optional`` columns are read when the header has them. Rows whose cells are all empty
    (blank lines) are left out.
    """
    header, layout = _open_csv(path, required)
    return _strings(path, header, layout,
                    [*required, *(column for column in optional if column in header)])


def _strings(
    path: Path, header: list[str], layout: CsvLayout, columns: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """The stripped string cells and start lines of ``_read_csv_strings``, file already open."""
    frame = _read_columns(path, header, columns, dtype=str, keep_default_na=False,
                          skip_blank_lines=False)
    lines = layout.start_lines()
    if len(lines) != len(frame):
        raise _row_count_error(path, len(frame), len(lines))
    return _filled_rows(frame, lines)


def _string_chunks(
    path: Path, header: list[str], layout: CsvLayout, columns: list[str], chunk_rows: int
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """``_strings`` piece by piece: each piece's stripped cells and the lines its rows start on."""
    lines = layout.start_lines()
    done = 0
    for frame in _column_chunks(path, header, columns, chunk_rows, dtype=str,
                                keep_default_na=False, skip_blank_lines=False):
        if done + len(frame) > len(lines):
            raise _row_count_error(path, done + len(frame), len(lines))
        yield _filled_rows(frame, lines[done:done + len(frame)])
        done += len(frame)
    if done != len(lines):
        raise _row_count_error(path, done, len(lines))


def _row_count_error(path: Path, read: int, rows: int) -> DataError:
    """The error for pandas and the byte scan disagreeing on the number of rows."""
    return DataError(f"{path.name}: pandas read {read} rows where the file has {rows}; "
                     f"check its quoting")


def _filled_rows(frame: pd.DataFrame, lines: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Stripped cells and start lines of the rows that are not blank (some cell non-empty)."""
    frame = frame.apply(lambda column: column.str.strip())
    filled = (frame != "").any(axis=1).to_numpy()
    return frame[filled].reset_index(drop=True), lines[filled]


def _exact_integers(
    text: pd.Series, empty: np.ndarray, column: str, file: str, lines: np.ndarray,
    bounds: tuple[int, int],
) -> pd.Series:
    """Integer cells as Int64, refusing anything but an integer literal within ``bounds``.

    pandas parses the column first; only when it could not give int64 (a value too large for
    bigint, a fraction) are the cells read one by one, so every value is exact and the first
    bad one is named with its line.
    """
    low, high = bounds
    kind = "bigint range" if bounds == BIGINT else "range"
    values = pd.to_numeric(text.mask(empty), errors="coerce", dtype_backend="numpy_nullable")
    if values.dtype == "Int64":
        numbers = values.to_numpy(dtype=np.int64, na_value=low)
        bad = (values.isna().to_numpy() & ~empty) | (numbers < low) | (numbers > high)
        if not bad.any():
            return values
        row = int(np.flatnonzero(bad)[0])
    else:
        parsed: list[int | None] = []
        for cell, blank in zip(text.tolist(), empty.tolist(), strict=True):
            if blank:
                parsed.append(None)
            elif INTEGER_LITERAL.fullmatch(cell) and low <= int(cell) <= high:
                parsed.append(int(cell))
            else:
                break
        else:
            return pd.Series(pd.array(parsed, dtype="Int64"))
        row = len(parsed)
    cell = text.iloc[row]
    where = f"{file} line {lines[row]}: {column} = {cell!r}"
    if not INTEGER_LITERAL.fullmatch(cell):
        raise DataError(f"{where} is not an integer")
    raise DataError(f"{where} is outside the {kind} [{low}, {high}]")


def _parse_column(
    frame: pd.DataFrame, column: str, file: str, lines: np.ndarray, integer: bool,
    required: bool, bounds: tuple[int, int] = BIGINT,
) -> pd.Series:
    """Parse one text column into Int64 (within ``bounds``) or float64 values.

    DataError names file, line, column and value.
    """
    text = frame[column]
    if column == "explicit":
        text = text.str.lower().replace(BOOLEAN_WORDS)
    empty = (text == "").to_numpy()
    if required and empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(f"{file} line {lines[row]}: {column} is empty")
    if integer:
        return _exact_integers(text, empty, column, file, lines, bounds)
    values = pd.to_numeric(text.mask(empty), errors="coerce", dtype_backend="numpy_nullable")
    bad = values.isna().to_numpy() & ~empty
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{file} line {lines[row]}: {column} = {text.iloc[row]!r} is not a number")
    return pd.Series(values.to_numpy(dtype=np.float64, na_value=np.nan))


def read_csv_playlists(
    path: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """playlist_id (int64), pos (int32) and song_id (int64) of a playlist_songs.csv, in file order.

    The file is read ``chunk_rows`` rows at a time into arrays sized from the byte scan, so
    memory is the three arrays plus one piece. Pieces pandas reads as int64 directly (with pos
    within ``integer`` and not negative) are copied as they are; the first that does not fit
    (empty, not an integer, outside bigint) sends the file through the string reader, which
    names the first bad row.
    """
    columns = list(CSV_COLUMNS["playlist_songs"])
    header, layout = _open_csv(path, tuple(columns))
    table = _PlaylistRows(layout.rows)
    low, high = POSITION_RANGE
    for frame in _column_chunks(path, header, columns, chunk_rows):
        positions = frame["pos"].to_numpy()
        if not all(frame[column].dtype == np.int64 for column in columns) or (
                len(positions) and (positions.min() < low or positions.max() > high)):
            break
        table.append(*(frame[column].to_numpy(dtype=np.int64) for column in columns))
    else:
        return table.arrays()
    table = _PlaylistRows(layout.rows)
    for strings, lines in _string_chunks(path, header, layout, columns, chunk_rows):
        table.append(*(_parse_column(strings, column, path.name, lines, integer=True,
                                     required=True,
                                     bounds=POSITION_RANGE if column == "pos" else BIGINT)
                       .to_numpy(dtype=np.int64) for column in columns))
    return table.arrays()


class _PlaylistRows:
    """Preallocated playlist_id, pos and song_id arrays filled piece by piece."""

    def __init__(self, capacity: int) -> None:
        """Room for ``capacity`` rows (the byte scan's row count bounds the data rows)."""
        self.playlist_ids = np.empty(capacity, dtype=np.int64)
        self.positions = np.empty(capacity, dtype=np.int32)
        self.song_ids = np.empty(capacity, dtype=np.int64)
        self.filled = 0

    def append(self, playlist_ids: np.ndarray, positions: np.ndarray,
               song_ids: np.ndarray) -> None:
        """Copy one piece's rows (positions already checked to fit int32) after the others."""
        end = self.filled + len(playlist_ids)
        self.playlist_ids[self.filled:end] = playlist_ids
        self.positions[self.filled:end] = positions
        self.song_ids[self.filled:end] = song_ids
        self.filled = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The filled rows (views, no copy)."""
        end = self.filled
        return self.playlist_ids[:end], self.positions[:end], self.song_ids[:end]


def read_csv_songs(path: Path, chunk_rows: int = SONG_CHUNK_ROWS) -> pd.DataFrame:
    """The songs catalog of a songs.csv file, validated (see preprocessing_utils.check_songs).

    The cells are read as strings ``chunk_rows`` rows at a time and parsed piece by piece, so
    a Million-Playlist catalog (2.26M songs) never holds all its cells as Python strings.
    """
    header, layout = _open_csv(path, SONG_COLUMNS)
    pieces, line_pieces = [], []
    for frame, lines in _string_chunks(path, header, layout, list(SONG_COLUMNS), chunk_rows):
        pieces.append(pd.DataFrame({
            column: _parse_column(frame, column, path.name, lines,
                                  integer=column in ("song_id", "album_id", "artist_id",
                                                     *INTEGER_FEATURES),
                                  required=column == "song_id")
            for column in SONG_COLUMNS
        }))
        line_pieces.append(lines)
    songs = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0]
    lines = np.concatenate(line_pieces)
    songs["song_id"] = songs["song_id"].to_numpy(dtype=np.int64)
    for column in RAW_FEATURE_FIELDS:
        songs[column] = songs[column].to_numpy(dtype=np.float64, na_value=np.nan)
    check_songs(songs, table=path.name, line_numbers=lines)
    return songs


def read_names_table(path: Path, key: str, label: str, links: tuple[str, ...]) -> pd.DataFrame:
    """Ids and names of one CSV table (``name`` renamed to ``label``), ids parsed as integers."""
    frame, lines = _read_csv_strings(path, (key, "name"), links)
    table = pd.DataFrame({label: frame["name"]})
    for column in frame.columns.drop("name"):
        table[column] = _parse_column(frame, column, path.name, lines, integer=True,
                                      required=column == key)
    return table
