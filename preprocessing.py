"""Read playlists from PostgreSQL or CSV tables, fit (or load) encoders, write training.npz.

Examples::

    python preprocessing.py --source csv --data "demo data" --out build/demo
    python preprocessing.py --load-csv "demo data" --dsn postgresql://postgres@127.0.0.1/music
    python preprocessing.py --source postgres --dsn postgresql://postgres@127.0.0.1/music

Both sources go through the same cleaning and encoding, so the same tables give byte-identical
output. Cleaning rules (each reported in the summary, never silent):

* positions: a playlist whose positions have gaps or do not start at 0 is renumbered in order;
  the same position twice in one playlist is an error naming the playlist and the position.
* a playlist row whose song is missing from songs.csv (or unknown to ``--encoders``) is dropped;
  a playlist left empty is dropped.
* song features: NULL -> fitted mean; out-of-range -> error naming table, row and field (see
  preprocessing_utils).
* CSV files (read by csv_tables.py): a missing column, a row with more or fewer fields than the
  header, a byte that is not UTF-8, a value that is not a number or an integer outside its
  column's type (bigint ids, integer pos) is an error naming the file, the line (where the row
  starts, counting newlines inside quoted fields) and the column.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg2
from psycopg2.extensions import connection as Connection

import db
from atomic_files import replace_folder
from config import (
    BUILD_DIR,
    DEFAULT_DATABASE_URL,
    DEMO_DATA_DIR,
    REPEAT_SHARE_LIMIT,
    decide_exclude_seen,
    default_database_url,
)
from csv_tables import DEFAULT_CHUNK_ROWS, read_csv_playlists, read_csv_songs, read_names_table
from preprocessing_utils import (
    SONG_COLUMNS,
    TRAINING_NPZ,
    DataError,
    Encoders,
    Sequences,
    count_feature_cleaning,
    repeat_share,
    save_training_file,
)

DEFAULT_ITERSIZE = 50_000
ENCODERS_SUBDIR = "encoders"


@dataclass
class SourceData:
    """Raw playlist rows as three aligned arrays, plus the songs catalog when there is one.

    playlist_ids and song_ids are int64 (bigint), positions int32 (the schema's ``integer``):
    20 bytes a row, the only memory that grows with the number of playlist entries.
    """

    playlist_ids: np.ndarray
    positions: np.ndarray
    song_ids: np.ndarray
    songs: pd.DataFrame | None


def read_csv_source(data_dir: Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> SourceData:
    """Playlists (and songs.csv, when present) of a folder of CSV tables.

    playlist_songs.csv is read ``chunk_rows`` rows at a time (see csv_tables.read_csv_playlists).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    playlist_ids, positions, song_ids = read_csv_playlists(data_dir / "playlist_songs.csv",
                                                           chunk_rows)
    songs_path = data_dir / "songs.csv"
    songs = read_csv_songs(songs_path) if songs_path.is_file() else None
    return SourceData(playlist_ids, positions, song_ids, songs)


def read_postgres_source(connection: Connection, itersize: int = DEFAULT_ITERSIZE) -> SourceData:
    """Stream playlists and the used songs' features through server-side cursors, one snapshot.

    The playlist rows fill three preallocated arrays ``itersize`` rows at a time, so the
    table is held once, at 20 bytes a row.
    """
    with db.read_snapshot(connection):
        with connection.cursor() as cursor:
            cursor.execute(db.sql_text("playlists_count"))
            total = int(db.fetch_one(cursor)[0])
        playlist_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int32)
        song_ids = np.empty(total, dtype=np.int64)
        filled = 0
        with connection.cursor(name="b4mr_playlist_songs") as cursor:
            cursor.itersize = itersize
            cursor.execute(db.sql_text("playlists"))
            while chunk := cursor.fetchmany(itersize):
                end = filled + len(chunk)
                if end > total:
                    break
                block = np.array(chunk, dtype=np.int64).reshape(-1, 3)
                playlist_ids[filled:end] = block[:, 0]
                positions[filled:end] = block[:, 1]
                song_ids[filled:end] = block[:, 2]
                filled = end
        columns: list[list[object]] = [[] for _ in SONG_COLUMNS]
        with connection.cursor(name="b4mr_songs") as cursor:
            cursor.itersize = itersize
            cursor.execute(db.sql_text("songs"))
            while chunk := cursor.fetchmany(itersize):
                for values, column in zip(columns, zip(*chunk, strict=True), strict=True):
                    values.extend(column)
    if filled != total:
        raise DataError(f"playlist_songs changed while reading ({filled} of {total} rows)")
    songs = songs_frame(columns) if columns[0] else None
    return SourceData(playlist_ids, positions, song_ids, songs)


def songs_frame(columns: Sequence[Sequence[object]]) -> pd.DataFrame:
    """The songs catalog from the value lists of songs.sql's columns (SONG_COLUMNS), typed as
    the CSV reader types them: int64 song ids, nullable album and artist ids, float64 features
    (NaN for NULL)."""
    songs = pd.DataFrame({"song_id": np.asarray(columns[0], dtype=np.int64),
                          "album_id": pd.array(columns[1], dtype="Int64"),
                          "artist_id": pd.array(columns[2], dtype="Int64")})
    for name, values in zip(SONG_COLUMNS[3:], columns[3:], strict=True):
        songs[name] = np.asarray(values, dtype=np.float64)
    return songs


def read_catalog_names(source: Path | Connection) -> pd.DataFrame:
    """Song, artist and album names indexed by song_id, for printing (empty without songs)."""
    empty = pd.DataFrame({"song": [], "artist": [], "album": []},
                         index=pd.Index([], dtype=np.int64, name="song_id"), dtype=object)
    if isinstance(source, Connection):
        names = pd.DataFrame(list(db.catalog_names(source)),
                             columns=["song_id", "song", "artist", "album"])
    else:
        folder = Path(source)
        if not (folder / "songs.csv").is_file():
            return empty
        names = read_names_table(folder / "songs.csv", "song_id", "song",
                                 ("album_id", "artist_id"))
        for table, key, label in (("albums", "album_id", "album"),
                                  ("artists", "artist_id", "artist")):
            path = folder / f"{table}.csv"
            if path.is_file() and key in names:
                names = names.merge(read_names_table(path, key, label, ()), on=key, how="left")
            else:
                names[label] = None
    if names.empty:
        return empty
    names["song_id"] = names["song_id"].astype(np.int64)
    names = names.set_index("song_id")[["song", "artist", "album"]]
    return names.astype(object).where(names.notna(), "").sort_index()


def build_sequences(
    data: SourceData, encoders: Encoders | None = None
) -> tuple[Encoders, Sequences, dict[str, object]]:
    """Order, check and encode playlist rows (fitting encoders when none are given).

    Returns the encoders, the CSR playlists and a report of every cleaning rule applied.
    Rows already in (playlist, pos) order, as the database and the generator give them, are
    not copied; temporaries are a few bytes a row.
    """
    order = _playlist_order(data.playlist_ids, data.positions)
    playlist_ids, positions, song_ids = (
        (data.playlist_ids, data.positions, data.song_ids) if order is None else
        (data.playlist_ids[order], data.positions[order], data.song_ids[order]))
    del order
    rows = len(playlist_ids)
    same_playlist = playlist_ids[1:] == playlist_ids[:-1]
    duplicate = same_playlist & (positions[1:] == positions[:-1])
    if duplicate.any():
        row = int(np.flatnonzero(duplicate)[0])
        raise DataError(f"playlist_songs: playlist {playlist_ids[row]} has pos "
                        f"{positions[row]} more than once")
    del duplicate
    starts = np.flatnonzero(np.concatenate([[True], ~same_playlist])) if rows else (
        np.zeros(0, dtype=np.int64))
    del same_playlist
    lengths = np.diff(np.append(starts, rows))
    # positions rise strictly within a playlist here, so they are 0..n-1 exactly when the
    # first is 0 and the last n-1: a check per playlist, not per row
    renumbered = int(((positions[starts] != 0) | (positions[starts + lengths - 1] != lengths - 1))
                     .sum()) if rows else 0

    fitted = encoders is None
    if encoders is None:
        encoders = Encoders.fit(pd.DataFrame({"song_id": song_ids}, copy=False), data.songs)
    tokens = encoders.encode_songs(song_ids)
    keep = tokens >= 0
    reason = "song_not_in_catalog" if fitted else "song_unknown_to_encoders"
    kept_ids, tokens = (playlist_ids, tokens) if keep.all() else (playlist_ids[keep],
                                                                  tokens[keep])
    if not len(tokens):
        raise DataError(f"playlist_songs: no usable rows ({rows} read, "
                        f"{int((~keep).sum())} with songs missing from the catalog or encoders)")
    new_playlist = np.concatenate([[True], kept_ids[1:] != kept_ids[:-1]])
    kept_starts = np.flatnonzero(new_playlist)
    sequences = Sequences(kept_ids[kept_starts].astype(np.int64),
                          np.append(kept_starts, len(tokens)).astype(np.int64),
                          tokens.astype(np.int64, copy=False))
    report: dict[str, object] = {
        "rows_read": rows,
        "rows_kept": len(tokens),
        "playlists_read": len(starts),
        "playlists": len(sequences),
        "dropped_rows": {reason: int((~keep).sum())} if (~keep).any() else {},
        "dropped_distinct_songs": len(np.unique(song_ids[~keep])),
        "dropped_empty_playlists": len(starts) - len(sequences),
        "renumbered_playlists": renumbered,
    }
    if fitted and data.songs is not None:
        used = data.songs[np.isin(data.songs["song_id"].to_numpy(), encoders.song_ids)]
        report["feature_cleaning"] = count_feature_cleaning(used)
    return encoders, sequences, report


def _playlist_order(playlist_ids: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    """The permutation into (playlist, pos) order, or None when the rows are in it already."""
    if len(playlist_ids) < 2:
        return None
    later = playlist_ids[1:] > playlist_ids[:-1]
    later |= (playlist_ids[1:] == playlist_ids[:-1]) & (positions[1:] >= positions[:-1])
    if later.all():
        return None
    return np.lexsort((positions, playlist_ids))


def _sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in pieces."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _check_output_folder(out_dir: Path) -> None:
    """DataError unless ``out_dir`` is new or holds only a previous run's output.

    The folder is replaced as a whole (see ``atomic_files.replace_folder``), so anything
    else in it would be lost.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out is not a folder")
    foreign = sorted(entry.name for entry in out_dir.iterdir()
                     if entry.name not in (TRAINING_NPZ, ENCODERS_SUBDIR))
    if foreign:
        raise DataError(f"{out_dir}: --out holds {foreign[0]!r}, which is not preprocessing "
                        f"output; the folder is replaced as a whole, so choose a new or empty "
                        f"folder")


def preprocess(
    source: str,
    out_dir: Path,
    data_dir: Path | None = None,
    dsn: str | None = None,
    encoders_dir: Path | None = None,
    refit_dir: Path | None = None,
    itersize: int = DEFAULT_ITERSIZE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, object]:
    """Read a source, fit or load encoders, write out_dir/training.npz and out_dir/encoders/.

    ``out_dir`` is replaced as a whole (a reader sees the old set or the new one, never the new
    training file beside old encoders). ``itersize`` (PostgreSQL) and ``chunk_rows`` (CSV) set
    how many playlist rows are read at a time; the output does not depend on them. Returns the
    summary (counts, cleaning report, fingerprints, seconds).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_output_folder(out_dir)
    encoders = Encoders.load(Path(encoders_dir)) if encoders_dir is not None else None
    if source == "csv":
        data = read_csv_source(Path(data_dir if data_dir is not None else DEMO_DATA_DIR),
                               chunk_rows)
    elif source == "postgres":
        connection = db.connect(dsn or default_database_url())
        try:
            data = read_postgres_source(connection, itersize)
        finally:
            connection.close()
    else:
        raise DataError(f"unknown source {source!r} (use csv or postgres)")
    encoders, sequences, report = build_sequences(data, encoders)
    share = repeat_share(sequences.offsets, sequences.songs)

    def write(folder: Path) -> None:
        save_training_file(folder, sequences.playlist_ids, sequences.offsets, sequences.songs,
                           share)
        encoders.save(folder / ENCODERS_SUBDIR)

    replace_folder(out_dir, write)
    training_path = out_dir / TRAINING_NPZ
    if refit_dir is not None:
        encoders.save(Path(refit_dir))
    lengths = sequences.lengths
    summary: dict[str, object] = {
        "source": source,
        **report,
        "songs": encoders.n_songs,
        "albums": encoders.n_album_tokens - 1,
        "artists": encoders.n_artist_tokens - 1,
        "has_side_info": encoders.has_side_info,
        "n_features": encoders.n_features,
        "playlist_length": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                            "max": int(lengths.max())},
        "repeat_share": share,
        "exclude_seen_default": decide_exclude_seen("auto", share),
        "encoders": f"loaded from {encoders_dir}" if encoders_dir is not None else "fitted",
        "encoders_fingerprint": encoders.fingerprint,
        "training_file": str(training_path),
        "training_sha256": _sha256(training_path),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """Readable multi-line summary of a preprocessing run."""
    dropped = ", ".join(f"{reason} {count}" for reason, count in summary["dropped_rows"].items())
    lines = [
        f"source: {summary['source']}",
        f"playlists: {summary['playlists']} kept of {summary['playlists_read']} read "
        f"({summary['dropped_empty_playlists']} dropped as empty, "
        f"{summary['renumbered_playlists']} renumbered for gapped positions)",
        f"playlist rows: {summary['rows_kept']} kept of {summary['rows_read']} read; dropped: "
        f"{dropped or 'none'} ({summary['dropped_distinct_songs']} distinct songs)",
        f"vocabulary: {summary['songs']} songs, {summary['albums']} albums, "
        f"{summary['artists']} artists, {summary['n_features']} features per song "
        f"(side information: {'yes' if summary['has_side_info'] else 'no'})",
        "playlist length: min {min}, median {median:g}, max {max}".format(
            **summary["playlist_length"]),
    ]
    excluded = summary["exclude_seen_default"]
    lines.append(
        f"playlists repeating a song: {summary['repeat_share']:.2%}, "
        f"{'under' if excluded else 'at least'} {REPEAT_SHARE_LIMIT:.0%}: by default songs "
        f"already in a playlist are {'excluded from' if excluded else 'kept in'} its "
        f"recommendations and evaluation (train.exclude_seen=true|false overrides)")
    cleaning = summary.get("feature_cleaning")
    if cleaning is not None:
        applied = ", ".join(f"{rule} {count}" for rule, count in cleaning.items()) or "none"
        lines.append(f"feature cleaning (NULL -> fitted mean; time signature < 3 -> zeros): "
                     f"{applied}")
    lines += [
        f"encoders: {summary['encoders']}, fingerprint {summary['encoders_fingerprint'][:16]}",
        f"training file: {summary['training_file']} (sha256 {summary['training_sha256'][:16]})",
        f"time: {summary['seconds']:.2f} s",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of preprocessing.py."""
    parser = argparse.ArgumentParser(
        description="Turn playlists (PostgreSQL or CSV tables) into encoders and a training file.",
        epilog="Database setup: --create-schema creates the tables in --dsn; --load-csv DIR also "
               "COPYs DIR's artists, albums, songs, playlists and playlist_songs CSV files "
               "(idempotent: loading twice leaves the same rows). Without --source they exit "
               "after the setup; with --source postgres they continue with the preprocessing. "
               "Exit status 2 means bad input; the message names the file, line or field.")
    parser.add_argument("--source", choices=("csv", "postgres"), default=None,
                        help="where the playlists come from (default: csv)")
    parser.add_argument("--data", type=Path, default=DEMO_DATA_DIR,
                        help="folder of CSV tables; only playlist_songs.csv is required "
                             "(default: the repository's 'demo data')")
    parser.add_argument("--dsn", default=default_database_url(),
                        help=f"PostgreSQL DSN (default: $DATABASE_URL, else "
                             f"{DEFAULT_DATABASE_URL})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder for training.npz and encoders/ "
                             "(default: build/<source>)")
    encoders = parser.add_mutually_exclusive_group()
    encoders.add_argument("--encoders", type=Path, default=None, metavar="FOLDER",
                          help="load these fitted encoders instead of fitting; playlist songs "
                               "unknown to them are dropped and counted")
    encoders.add_argument("--refit-encoders", type=Path, default=None, metavar="FOLDER",
                          help="fit the encoders and also write them into FOLDER")
    parser.add_argument("--create-schema", action="store_true",
                        help="create the schema (sql/schema.sql) in --dsn")
    parser.add_argument("--load-csv", type=Path, default=None, metavar="DIR",
                        help="create the schema and COPY DIR's CSV tables into --dsn")
    parser.add_argument("--itersize", type=int, default=DEFAULT_ITERSIZE,
                        help="rows per round trip when streaming from PostgreSQL "
                             "(default: %(default)s)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="playlist_songs.csv rows read at a time (default: %(default)s)")
    return parser


def _setup_database(dsn: str, load_dir: Path | None) -> None:
    """Create the schema in ``dsn`` and, with ``load_dir``, load its CSV tables; print counts."""
    with db.connected(dsn) as connection:
        db.create_schema(connection)
        print(f"schema ready in {db.describe_dsn(dsn)}")
        if load_dir is not None:
            inserted = db.load_csv_tables(connection, load_dir)
            print("rows inserted: " + ", ".join(f"{t} {n}" for t, n in inserted.items()))
            print(json.dumps({"dsn": db.describe_dsn(dsn), "inserted": inserted}))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    if args.itersize < 1 or args.chunk_rows < 1:
        print("error: --itersize and --chunk-rows must be positive", file=sys.stderr)
        return 2
    try:
        if args.create_schema or args.load_csv is not None:
            _setup_database(args.dsn, args.load_csv)
            if args.source is None:
                return 0
        source = args.source or "csv"
        summary = preprocess(source, args.out if args.out is not None else BUILD_DIR / source,
                             data_dir=args.data, dsn=args.dsn, encoders_dir=args.encoders,
                             refit_dir=args.refit_encoders, itersize=args.itersize,
                             chunk_rows=args.chunk_rows)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except psycopg2.OperationalError as error:
        print(f"error: cannot use PostgreSQL at {db.describe_dsn(args.dsn)}: {db.one_line(error)}",
              file=sys.stderr)
        return 2
    except psycopg2.Error as error:
        print(f"error: PostgreSQL at {db.describe_dsn(args.dsn)}: {db.one_line(error)} "
              f"(create the tables with --create-schema or --load-csv)", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
