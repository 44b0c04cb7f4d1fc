"""sql/schema.sql: idempotent, and its CHECK ranges agree with the CSV validation and MAX_K."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pandas as pd
import psycopg2
import pytest
from psycopg2 import errors

import db
from config import MAX_K
from preprocessing_utils import FEATURE_RANGES, SONG_COLUMNS, DataError, check_songs

VALID_SONG = {
    "song_id": 10, "album_id": None, "artist_id": None, "explicit": 1, "danceability": 0.5,
    "energy": 0.5, "key": 5, "loudness": -6.0, "mode": 0, "speechiness": 0.1,
    "acousticness": 0.1, "instrumentalness": 0.0, "liveness": 0.1, "valence": 0.5,
    "tempo": 100.0, "duration_ms": 180_000, "time_signature": 4, "disc_number": 1,
    "track_number": 3,
}
OUT_OF_RANGE = [
    ("danceability", 1.7), ("valence", -0.01), ("key", 12), ("mode", 2), ("time_signature", 9),
    ("duration_ms", -5), ("duration_ms", 0), ("tempo", -1.0), ("loudness", 30.0),
    ("disc_number", 0), ("track_number", 0),
]


@pytest.fixture(scope="module")
def schema_dsn(module_pg_dsn: str) -> str:
    """A database where the schema was created twice."""
    with db.connected(module_pg_dsn) as connection:
        db.create_schema(connection)
        db.create_schema(connection)
    db.init_database(module_pg_dsn)
    return module_pg_dsn


@pytest.fixture
def cursor(schema_dsn: str) -> Iterator[psycopg2.extensions.cursor]:
    """A cursor whose work is rolled back after the test."""
    connection = db.connect(schema_dsn)
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.rollback()
        connection.close()


def insert_song(cursor: psycopg2.extensions.cursor, **values: object) -> None:
    """Insert VALID_SONG with some fields overridden."""
    row = {**VALID_SONG, **values}
    row["explicit"] = bool(row["explicit"])
    columns = ", ".join(["name", *row])
    placeholders = ", ".join(["'a song'", *(f"%({name})s" for name in row)])
    cursor.execute(f"INSERT INTO songs ({columns}) VALUES ({placeholders})", row)


def test_schema_twice_creates_every_table_and_index(cursor: psycopg2.extensions.cursor) -> None:
    cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert {name for (name,) in cursor.fetchall()} == {
        "artists", "albums", "songs", "playlists", "playlist_songs", "recommendations",
        "recommendation_jobs"}
    cursor.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    indexes = {name for (name,) in cursor.fetchall()}
    assert {"playlist_songs_song_id_idx", "songs_album_id_idx", "songs_artist_id_idx",
            "albums_artist_id_idx", "recommendation_jobs_one_active_idx",
            "recommendation_jobs_status_run_after_idx"} <= indexes


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_database_and_csv_validation_reject_the_same_values(
    cursor: psycopg2.extensions.cursor, field: str, value: float
) -> None:
    with pytest.raises(errors.CheckViolation, match=f"songs_{field}_check"):
        insert_song(cursor, **{field: value})
    frame = pd.DataFrame([{**VALID_SONG, field: value}], columns=list(SONG_COLUMNS))
    with pytest.raises(DataError, match=field):
        check_songs(frame)


def test_boundary_values_are_accepted_by_both(cursor: psycopg2.extensions.cursor) -> None:
    for song_id, bound in ((1, 0), (2, 1)):
        values = {field: limits[bound] for field, limits in FEATURE_RANGES.items()}
        insert_song(cursor, song_id=song_id, **values)
        check_songs(pd.DataFrame([{**VALID_SONG, **values}], columns=list(SONG_COLUMNS)))
    insert_song(cursor, song_id=3, **dict.fromkeys(VALID_SONG.keys() - {"song_id"}, None))


def test_playlist_rows_need_a_song_and_one_song_per_position(
    cursor: psycopg2.extensions.cursor,
) -> None:
    insert_song(cursor)
    cursor.execute("INSERT INTO playlists (playlist_id) VALUES (1)")
    cursor.execute("INSERT INTO playlist_songs VALUES (1, 0, 10)")
    for row, error in (((1, 0, 10), errors.UniqueViolation), ((1, -1, 10), errors.CheckViolation),
                       ((1, 1, 99), errors.ForeignKeyViolation)):
        cursor.execute("SAVEPOINT attempt")
        with pytest.raises(error):
            cursor.execute("INSERT INTO playlist_songs VALUES (%s, %s, %s)", row)
        cursor.execute("ROLLBACK TO SAVEPOINT attempt")
    cursor.execute("DELETE FROM playlists WHERE playlist_id = 1")
    cursor.execute("SELECT count(*) FROM playlist_songs")
    assert cursor.fetchone()[0] == 0


def test_one_active_job_per_playlist(cursor: psycopg2.extensions.cursor) -> None:
    cursor.execute("INSERT INTO recommendation_jobs (playlist_id, k, status) "
                   "VALUES (1, 10, 'done'), (1, 10, 'queued')")
    with pytest.raises(errors.UniqueViolation):
        cursor.execute("INSERT INTO recommendation_jobs (playlist_id, k, status) "
                       "VALUES (1, 5, 'running')")


def test_sql_limits_on_k_and_rank_agree_with_max_k(cursor: psycopg2.extensions.cursor) -> None:
    for table, column in (("recommendation_jobs", "k"), ("recommendations", "rank")):
        cursor.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                       "WHERE conrelid = %s::regclass AND conname = %s",
                       (table, f"{table}_{column}_check"))
        definition = cursor.fetchone()[0]
        assert re.findall(r"\d+", definition) == ["1", str(MAX_K)], definition
    cursor.execute("INSERT INTO playlists (playlist_id) VALUES (1), (2)")
    cursor.execute("SELECT request_recommendations(1, %s)", (MAX_K,))
    for k in (0, MAX_K + 1):
        cursor.execute("SAVEPOINT attempt")
        with pytest.raises(errors.InvalidParameterValue, match=f"between 1 and {MAX_K}"):
            cursor.execute("SELECT request_recommendations(2, %s)", (k,))
        cursor.execute("ROLLBACK TO SAVEPOINT attempt")
