"""Fitted encoders (song/album/artist indices, 21 song features) and the training file format.

Token layout: song index 0 = [PAD], 1 = [MASK], songs from 2 in catalog-id order; album and
artist index 0 = [PAD]/[MASK]/unknown, real ones from 1.

Features per song (``FEATURE_NAMES``, 21 float32 values):

====================  ===============================================================
explicit, mode        0/1 as given (NULL -> fitted share of 1s)
disc_number,          log1p(number), then standard-scaled (track numbers are skewed:
track_number          log keeps track 1 vs 2 apart more than 30 vs 31)
9 audio features      danceability, energy, loudness, speechiness, acousticness,
                      instrumentalness, liveness, valence, tempo: standard-scaled
duration_ms_log1p     log1p(duration_ms), standard-scaled
key_sin, key_cos      key on the circle of 12 pitch classes; NULL key -> (0, 0)
time_signature_3..7   one-hot; NULL or 0..2 -> all zeros (counted)
====================  ===============================================================

Cleaning rules: a NULL numeric value is replaced by the mean fitted on the vocabulary songs
(so a scaled feature becomes exactly 0); every NULL is counted per field by
``count_feature_cleaning``. A value outside the range the database's CHECK constraints allow
(``FEATURE_RANGES``) is an error naming the table, the row and the field, so the CSV path
accepts exactly what PostgreSQL accepts. Raw values pass through float32 first (the database's
``real``), so the CSV and the PostgreSQL path give bit-identical features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from atomic_files import atomic_write
from npz_files import read_npz_arrays, write_npz

logger = logging.getLogger(__name__)

# song token indices, defined here only (the lowest module that needs them)
PAD_INDEX = 0
MASK_INDEX = 1
FIRST_SONG_INDEX = 2
FORMAT_VERSION = 1

ENCODERS_JSON = "encoders.json"
ENCODERS_NPZ = "encoders.npz"
TRAINING_NPZ = "training.npz"

BINARY_FIELDS = ("explicit", "mode")
NUMBER_FIELDS = ("disc_number", "track_number")
AUDIO_FIELDS = ("danceability", "energy", "loudness", "speechiness", "acousticness",
                "instrumentalness", "liveness", "valence", "tempo")
TIME_SIGNATURES = (3, 4, 5, 6, 7)
# key (pitch class 0..11) on the circle, from libm per class so every CPU agrees; last: NULL
KEY_SIN = np.array([math.sin(2 * math.pi * pitch / 12) for pitch in range(12)] + [0.0])
KEY_COS = np.array([math.cos(2 * math.pi * pitch / 12) for pitch in range(12)] + [0.0])
NUMERIC_COLUMNS = (*BINARY_FIELDS, *NUMBER_FIELDS, *AUDIO_FIELDS, "duration_ms_log1p")
FEATURE_NAMES = (*NUMERIC_COLUMNS, "key_sin", "key_cos",
                 *(f"time_signature_{value}" for value in TIME_SIGNATURES))
# the raw fields of a song row, in the order of the songs table (sql/schema.sql)
RAW_FEATURE_FIELDS = ("explicit", "danceability", "energy", "key", "loudness", "mode",
                      "speechiness", "acousticness", "instrumentalness", "liveness", "valence",
                      "tempo", "duration_ms", "time_signature", "disc_number", "track_number")
_ARRAY_NAMES = ("format_version", "has_side_info", "song_ids", "album_ids", "artist_ids",
                "song_album", "song_artist", "song_features", "numeric_fill", "numeric_center",
                "numeric_scale")
SONG_COLUMNS = ("song_id", "album_id", "artist_id", *RAW_FEATURE_FIELDS)
# arrays only extended encoders hold (cold_start.py): per earlier link, its fingerprint's 32
# bytes and its (songs, albums, artists) counts, base first
_CHAIN_NAMES = ("chain_fingerprints", "chain_sizes")

# (low, high, integer?) inclusive bounds; mirrors the CHECK constraints in sql/schema.sql.
FEATURE_RANGES: dict[str, tuple[float, float, bool]] = {
    "explicit": (0, 1, True),
    "danceability": (0, 1, False),
    "energy": (0, 1, False),
    "key": (0, 11, True),
    "loudness": (-100, 20, False),
    "mode": (0, 1, True),
    "speechiness": (0, 1, False),
    "acousticness": (0, 1, False),
    "instrumentalness": (0, 1, False),
    "liveness": (0, 1, False),
    "valence": (0, 1, False),
    "tempo": (0, 1000, False),
    "duration_ms": (1, 2**31 - 1, True),
    "time_signature": (0, 7, True),
    "disc_number": (1, 32767, True),
    "track_number": (1, 32767, True),
}


class DataError(ValueError):
    """Input data that cannot be used as given; the message names the table, row and field."""


def _row_name(table: str, songs: pd.DataFrame, row: int, line_numbers: np.ndarray | None) -> str:
    """Human-readable location of one song row, e.g. ``songs.csv line 12 (song_id 1000004)``."""
    where = f"{table} line {int(line_numbers[row])}" if line_numbers is not None else table
    return f"{where} (song_id {int(songs['song_id'].iloc[row])})"


def check_songs(
    songs: pd.DataFrame, table: str = "songs", line_numbers: np.ndarray | None = None
) -> None:
    """Raise DataError for a missing column, duplicate song_id or out-of-range feature value."""
    missing = [column for column in SONG_COLUMNS if column not in songs.columns]
    if missing:
        raise DataError(f"{table}: missing column {missing[0]!r}")
    ids = songs["song_id"].to_numpy()
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        row = int(np.sort(first[counts > 1])[0])
        duplicates = np.flatnonzero(ids == ids[row])
        raise DataError(f"{_row_name(table, songs, int(duplicates[1]), line_numbers)}: "
                        f"song_id appears more than once")
    for field in RAW_FEATURE_FIELDS:
        low, high, integer = FEATURE_RANGES[field]
        values = songs[field].to_numpy(dtype=np.float64, na_value=np.nan)
        present = ~np.isnan(values)
        bad = present & ((values < low) | (values > high))
        if integer:
            bad |= present & (np.floor(values) != values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            kind = "an integer in" if integer else "in"
            raise DataError(f"{_row_name(table, songs, row, line_numbers)}: {field} = "
                            f"{values[row]:g} must be {kind} [{low:g}, {high:g}]")


def count_feature_cleaning(songs: pd.DataFrame) -> dict[str, int]:
    """Counts of the cleaning rules applied to these songs: NULLs per field, odd time signatures."""
    counts: dict[str, int] = {}
    for field in RAW_FEATURE_FIELDS:
        missing = int(songs[field].isna().sum())
        if missing:
            counts[f"null_{field}"] = missing
    signature = songs["time_signature"].to_numpy(dtype=np.float64, na_value=np.nan)
    outside = int(np.sum(signature < TIME_SIGNATURES[0]))
    if outside:
        counts["time_signature_below_3"] = outside
    return counts


def _raw_column(songs: pd.DataFrame, field: str) -> np.ndarray:
    """One raw feature as float64 after a float32 round (the database's ``real``); NULL = NaN."""
    values = songs[field].to_numpy(dtype=np.float64, na_value=np.nan)
    return values.astype(np.float32).astype(np.float64)


def libm_log1p(values: np.ndarray) -> np.ndarray:
    """log1p of each value through the C library (NaN stays NaN), the same on every CPU.

    NumPy's vectorized log1p takes a different code path with AVX-512 than with AVX2 and
    differs in the last bit, which changed the fitted features and the encoders' fingerprint.
    """
    return np.array([math.log1p(value) for value in values.tolist()], dtype=np.float64)


def _numeric_matrix(songs: pd.DataFrame) -> np.ndarray:
    """The 14 ``NUMERIC_COLUMNS`` before imputation and scaling, shape (n, 14), NaN = NULL."""
    columns = [_raw_column(songs, field) for field in (*BINARY_FIELDS, *AUDIO_FIELDS)]
    binary, audio = columns[: len(BINARY_FIELDS)], columns[len(BINARY_FIELDS):]
    numbers = [libm_log1p(_raw_column(songs, field)) for field in NUMBER_FIELDS]
    duration = libm_log1p(_raw_column(songs, "duration_ms"))
    return np.column_stack([*binary, *numbers, *audio, duration])


def read_npz(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """Every array of an .npz file, never unpickling (see npz_files); DataError when bad."""
    try:
        return read_npz_arrays(path, mmap)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: cannot read: {error}") from None


def exact_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation from correctly rounded sums (``math.fsum``).

    NumPy's reductions round differently depending on the CPU's vector width, which changed
    the fitted scale in the last bit between machines; these sums are the same everywhere,
    so fitting the same data gives the same encoders and fingerprint on every CPU.
    """
    mean = math.fsum(values.tolist()) / len(values)
    return mean, math.sqrt(math.fsum(((values - mean) ** 2).tolist()) / len(values))


class Encoders:
    """Song/album/artist vocabularies and the per-song side tables, fitted once on the data."""

    def __init__(
        self,
        song_ids: np.ndarray,
        album_ids: np.ndarray,
        artist_ids: np.ndarray,
        song_album: np.ndarray,
        song_artist: np.ndarray,
        song_features: np.ndarray,
        numeric_fill: np.ndarray,
        numeric_center: np.ndarray,
        numeric_scale: np.ndarray,
        has_side_info: bool,
        chain_fingerprints: np.ndarray | None = None,
        chain_sizes: np.ndarray | None = None,
    ) -> None:
        """``chain_*``: the encoders this one extends (see ``derives_from``), none when fitted."""
        self.song_ids = np.asarray(song_ids, dtype=np.int64)
        self.album_ids = np.asarray(album_ids, dtype=np.int64)
        self.artist_ids = np.asarray(artist_ids, dtype=np.int64)
        self.song_album = np.asarray(song_album, dtype=np.int64)
        self.song_artist = np.asarray(song_artist, dtype=np.int64)
        self.song_features = np.asarray(song_features, dtype=np.float32)
        self.numeric_fill = np.asarray(numeric_fill, dtype=np.float64)
        self.numeric_center = np.asarray(numeric_center, dtype=np.float64)
        self.numeric_scale = np.asarray(numeric_scale, dtype=np.float64)
        self.has_side_info = bool(has_side_info)
        self.chain_fingerprints = np.asarray(
            np.zeros((0, 32)) if chain_fingerprints is None else chain_fingerprints, np.uint8)
        self.chain_sizes = np.asarray(
            np.zeros((0, 3)) if chain_sizes is None else chain_sizes, np.int64)
        self._validate()
        # extended encoders' song ids in order and their positions, built at the first lookup
        self._song_lookup: tuple[np.ndarray, np.ndarray] | None = None

    def _validate(self) -> None:
        """Refuse inconsistent arrays (e.g. a hand-edited or truncated encoders file)."""
        n_tokens = self.n_song_tokens
        problems = []
        links = len(self.chain_sizes)
        if self.chain_fingerprints.shape != (links, 32) or self.chain_sizes.shape != (links, 3):
            problems.append("chain_fingerprints and chain_sizes must be (links, 32) and (links, 3)")
            links = 0
        sizes = np.array([self.n_songs, len(self.album_ids), len(self.artist_ids)])
        if links and ((np.diff(self.chain_sizes, axis=0) < 0).any()
                      or (self.chain_sizes[-1] > sizes).any()):
            problems.append("chain_sizes must grow up to the encoders' own sizes")
            links = 0
        # fitted ids are sorted; an extension appends (cold_start.py), so only unique after
        base = self.chain_sizes[0] if links else sizes
        for name, fitted in zip(("song_ids", "album_ids", "artist_ids"), base, strict=True):
            ids = getattr(self, name)
            if (np.diff(ids[:fitted]) <= 0).any():
                problems.append(f"{name} must be strictly increasing")
            elif links and not _unique_after(ids, fitted):
                problems.append(f"{name} must be unique")
        for name, limit in (("song_album", self.n_album_tokens),
                            ("song_artist", self.n_artist_tokens)):
            table = getattr(self, name)
            if table.shape != (n_tokens,) or (table < 0).any() or (table >= limit).any():
                problems.append(f"{name} must have {n_tokens} indices in [0, {limit})")
        expected = (n_tokens, len(FEATURE_NAMES) if self.has_side_info else 0)
        if self.song_features.shape != expected:
            problems.append(f"song_features must have shape {expected}")
        for name in ("numeric_fill", "numeric_center", "numeric_scale"):
            if getattr(self, name).shape != (len(NUMERIC_COLUMNS),):
                problems.append(f"{name} must have {len(NUMERIC_COLUMNS)} values")
        if problems:
            raise DataError("invalid encoders: " + "; ".join(problems))

    @property
    def n_songs(self) -> int:
        """Number of real songs (without [PAD] and [MASK])."""
        return len(self.song_ids)

    @property
    def n_song_tokens(self) -> int:
        """Size of the song embedding table: songs + [PAD] + [MASK]."""
        return self.n_songs + FIRST_SONG_INDEX

    @property
    def n_album_tokens(self) -> int:
        """Size of the album embedding table: albums + [PAD]/[MASK]."""
        return len(self.album_ids) + 1

    @property
    def n_artist_tokens(self) -> int:
        """Size of the artist embedding table: artists + [PAD]/[MASK]."""
        return len(self.artist_ids) + 1

    @property
    def n_features(self) -> int:
        """Numeric features per song: 21 with side information, else 0."""
        return int(self.song_features.shape[1])

    @classmethod
    def fit(cls, interactions: pd.DataFrame, songs: pd.DataFrame | None = None) -> Encoders:
        """Fit on playlist rows (playlist_id, pos, song_id) and optionally the songs catalog.

        The song vocabulary is the songs that occur in playlists and, when a catalog is given,
        exist in it, sorted by catalog id; the scaler statistics are fitted on those songs.
        """
        used = np.unique(interactions["song_id"].to_numpy(dtype=np.int64))
        n_numeric = len(NUMERIC_COLUMNS)
        if songs is None:
            tokens = len(used) + FIRST_SONG_INDEX
            empty = np.zeros(0, dtype=np.int64)
            return cls(used, empty, empty, np.zeros(tokens, np.int64), np.zeros(tokens, np.int64),
                       np.zeros((tokens, 0), np.float32), np.zeros(n_numeric),
                       np.zeros(n_numeric), np.ones(n_numeric), has_side_info=False)
        check_songs(songs)
        catalog = songs["song_id"].to_numpy(dtype=np.int64)
        vocab = songs.iloc[np.argsort(catalog, kind="stable")]
        vocab = vocab[np.isin(vocab["song_id"].to_numpy(dtype=np.int64), used)]
        album_ids, song_album = _index_column(vocab["album_id"])
        artist_ids, song_artist = _index_column(vocab["artist_id"])
        numeric = _numeric_matrix(vocab)
        fill = np.zeros(n_numeric)
        center = np.zeros(n_numeric)
        scale = np.ones(n_numeric)
        for column in range(n_numeric):
            values = numeric[:, column]
            values = values[~np.isnan(values)]
            if len(values):
                fill[column], spread = exact_mean_std(values)
            if column >= len(BINARY_FIELDS) and len(values):
                center[column] = fill[column]
                scale[column] = spread if spread > 0 else 1.0
        pad = np.zeros(FIRST_SONG_INDEX, dtype=np.int64)
        encoders = cls(vocab["song_id"].to_numpy(dtype=np.int64), album_ids, artist_ids,
                       np.concatenate([pad, song_album]), np.concatenate([pad, song_artist]),
                       np.zeros((len(vocab) + FIRST_SONG_INDEX, len(FEATURE_NAMES)), np.float32),
                       fill, center, scale, has_side_info=True)
        encoders.song_features[FIRST_SONG_INDEX:] = encoders.transform(vocab)
        return encoders

    def transform(self, songs: pd.DataFrame) -> np.ndarray:
        """Feature matrix (n, 21) float32 of raw song rows, with fitted imputation and scaling."""
        if not self.has_side_info:
            return np.zeros((len(songs), 0), dtype=np.float32)
        numeric = _numeric_matrix(songs)
        numeric = np.where(np.isnan(numeric), self.numeric_fill, numeric)
        numeric = (numeric - self.numeric_center) / self.numeric_scale
        key = _raw_column(songs, "key")
        pitch_class = np.where(np.isnan(key), len(KEY_SIN) - 1, key).astype(np.int64)
        key_sin, key_cos = KEY_SIN[pitch_class], KEY_COS[pitch_class]
        signature = _raw_column(songs, "time_signature")
        one_hot = signature[:, None] == np.asarray(TIME_SIGNATURES, dtype=np.float64)[None, :]
        features = np.column_stack([numeric, key_sin, key_cos, one_hot.astype(np.float64)])
        return features.astype(np.float32)

    def encode_songs(self, catalog_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Song token indices of catalog ids; unknown ids give -1 (callers drop and count them)."""
        tokens = self.find_songs(catalog_ids)
        unknown = int((tokens < 0).sum())
        if unknown:
            logger.info("%d of %d song ids are unknown to the encoders", unknown, len(tokens))
        return tokens

    def find_songs(self, catalog_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """``encode_songs`` without logging the unknown ones (-1)."""
        ids = np.asarray(catalog_ids, dtype=np.int64).reshape(-1)
        if not len(self.chain_sizes):
            found = find_ids(self.song_ids, ids)
            return np.where(found < 0, -1, found + FIRST_SONG_INDEX)
        if self._song_lookup is None:
            order = np.argsort(self.song_ids, kind="stable")
            self._song_lookup = self.song_ids[order], order
        sorted_ids, order = self._song_lookup
        found = find_ids(sorted_ids, ids)
        return np.where(found < 0, -1, order[found] + FIRST_SONG_INDEX)

    def decode_songs(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Catalog ids of song token indices; ValueError for [PAD], [MASK] or out of range."""
        tokens = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = (tokens < FIRST_SONG_INDEX) | (tokens >= self.n_song_tokens)
        if bad.any():
            raise ValueError(f"song index {int(tokens[bad][0])} is not a song "
                             f"(songs are {FIRST_SONG_INDEX}..{self.n_song_tokens - 1})")
        return self.song_ids[tokens - FIRST_SONG_INDEX]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every fitted value as a numeric array, so a checkpoint can embed them without pickle.

        The chain arrays only when extended, so fitted encoders keep their fingerprint.
        """
        chain: dict[str, np.ndarray] = (
            {"chain_fingerprints": self.chain_fingerprints, "chain_sizes": self.chain_sizes}
            if len(self.chain_sizes) else {})
        return {**chain,
            "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
            "has_side_info": np.asarray(int(self.has_side_info), dtype=np.int64),
            "song_ids": self.song_ids,
            "album_ids": self.album_ids,
            "artist_ids": self.artist_ids,
            "song_album": self.song_album,
            "song_artist": self.song_artist,
            "song_features": self.song_features,
            "numeric_fill": self.numeric_fill,
            "numeric_center": self.numeric_center,
            "numeric_scale": self.numeric_scale,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Encoders:
        """Rebuild encoders from ``to_arrays`` output (numpy arrays or anything array-like)."""
        values = {name: np.asarray(value) for name, value in arrays.items()}
        missing = [name for name in _ARRAY_NAMES if name not in values]
        if missing:
            raise DataError(f"invalid encoders: missing array {missing[0]!r}")
        if int(values["format_version"]) != FORMAT_VERSION:
            raise DataError(f"invalid encoders: format_version {int(values['format_version'])}, "
                            f"this code reads {FORMAT_VERSION}")
        tables = {name: values[name] for name in (*_ARRAY_NAMES[2:], *_CHAIN_NAMES)
                  if name in values}
        return cls(**tables, has_side_info=bool(int(values["has_side_info"])))

    def prefix(self, link: int) -> Encoders:
        """The encoders this one extends at chain link ``link`` (0: the fitted base): the first
        songs, albums and artists and their tables, with the chain before that link."""
        songs, albums, artists = (int(size) for size in self.chain_sizes[link])
        tokens = songs + FIRST_SONG_INDEX
        return Encoders(self.song_ids[:songs], self.album_ids[:albums], self.artist_ids[:artists],
                        self.song_album[:tokens], self.song_artist[:tokens],
                        self.song_features[:tokens], self.numeric_fill, self.numeric_center,
                        self.numeric_scale, self.has_side_info, self.chain_fingerprints[:link],
                        self.chain_sizes[:link])

    def derives_from(self, fingerprint: str) -> bool:
        """Whether these encoders are those of ``fingerprint`` (itself or a chain link) with
        songs, albums and artists appended: every index of those means the same here."""
        if fingerprint == self.fingerprint:
            return True
        links = [link for link, digest in enumerate(self.chain_fingerprints)
                 if digest.tobytes().hex() == fingerprint]
        return bool(links) and self.prefix(links[0]).fingerprint == fingerprint

    @property
    def fingerprint(self) -> str:
        """sha256 over the arrays' names, dtypes, shapes and bytes; equal after save and load."""
        digest = hashlib.sha256()
        for name, array in sorted(self.to_arrays().items()):
            array = np.require(array, requirements="C")
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict[str, object]:
        """The human-readable description written to encoders.json."""
        extends = [{"fingerprint": digest.tobytes().hex(), "n_songs": int(sizes[0]),
                    "n_albums": int(sizes[1]), "n_artists": int(sizes[2])}
                   for digest, sizes in zip(self.chain_fingerprints, self.chain_sizes,
                                            strict=True)]
        return {
            **({"extends": extends} if extends else {}),
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "has_side_info": self.has_side_info,
            "n_songs": self.n_songs,
            "n_albums": len(self.album_ids),
            "n_artists": len(self.artist_ids),
            "feature_names": list(FEATURE_NAMES) if self.has_side_info else [],
            "numeric_columns": list(NUMERIC_COLUMNS),
            "special_song_tokens": {"PAD": PAD_INDEX, "MASK": MASK_INDEX,
                                    "first_song": FIRST_SONG_INDEX},
        }

    def save(self, folder: Path) -> None:
        """Write folder/encoders.npz then folder/encoders.json, each atomically."""
        folder = Path(folder)
        write_npz(folder / ENCODERS_NPZ, self.to_arrays())
        text = json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n"
        atomic_write(folder / ENCODERS_JSON, lambda file: file.write(text.encode("utf-8")))

    @classmethod
    def load(cls, folder: Path) -> Encoders:
        """Read encoders saved by ``save``; DataError if missing, damaged or the files disagree."""
        folder = Path(folder)
        json_path, npz_path = folder / ENCODERS_JSON, folder / ENCODERS_NPZ
        for path in (json_path, npz_path):
            if not path.is_file():
                raise DataError(f"{path}: encoders file not found")
        try:
            metadata = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{json_path}: not valid JSON: {error}") from None
        encoders = cls.from_arrays(read_npz(npz_path))
        if metadata.get("fingerprint") != encoders.fingerprint:
            raise DataError(f"{folder}: {ENCODERS_JSON} and {ENCODERS_NPZ} disagree "
                            f"(fingerprint mismatch); refit the encoders")
        return encoders


def _unique_after(ids: np.ndarray, fitted: int) -> bool:
    """True when ``ids``, strictly increasing up to ``fitted``, holds no id twice; only the
    appended part is sorted (a refresh of a 2.26M-song catalog would otherwise sort it all)."""
    appended = np.sort(ids[fitted:])
    return (not (np.diff(appended) == 0).any()
            and bool((find_ids(ids[:fitted], appended) < 0).all()))


def find_ids(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in the strictly increasing ``sorted_ids``, -1 if absent."""
    where = np.searchsorted(sorted_ids, ids)
    known = where < len(sorted_ids)
    known[known] = sorted_ids[where[known]] == ids[known]
    return np.where(known, where, -1).astype(np.int64)


def _index_column(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct non-NULL ids and each row's index into them plus 1 (NULL -> 0)."""
    present = ids.notna().to_numpy()
    values = ids.to_numpy(dtype=np.int64, na_value=0)
    vocabulary = np.unique(values[present])
    indices = np.searchsorted(vocabulary, values) + 1
    return vocabulary, np.where(present, indices, 0).astype(np.int64)


@dataclass(frozen=True)
class Sequences:
    """Playlists as CSR arrays: playlist p is songs[offsets[p]:offsets[p + 1]], in order.

    ``repeat_share``: the share of playlists holding some song more than once, as the training
    file records it (None: a file written before it was recorded, or no file).
    """

    playlist_ids: np.ndarray
    offsets: np.ndarray
    songs: np.ndarray
    repeat_share: float | None = None

    def __len__(self) -> int:
        """Number of playlists."""
        return len(self.playlist_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Songs per playlist."""
        return np.diff(self.offsets)

    def validate(self, n_song_tokens: int | None = None) -> None:
        """Raise DataError unless the arrays form valid, non-empty playlists of song tokens."""
        ids, offsets, songs = self.playlist_ids, self.offsets, self.songs
        problems = []
        for name, array in (("playlist_ids", ids), ("offsets", offsets), ("songs", songs)):
            if array.dtype != np.int64 or array.ndim != 1:
                problems.append(f"{name} must be a 1-d int64 array")
        if not problems:
            if len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != len(songs):
                problems.append("offsets must run from 0 to len(songs) with one per playlist + 1")
            elif (np.diff(offsets) <= 0).any():
                problems.append("every playlist must have at least one song")
            if len(np.unique(ids)) != len(ids):
                problems.append("playlist_ids must be unique")
            if (songs < FIRST_SONG_INDEX).any():
                problems.append(f"song tokens must be >= {FIRST_SONG_INDEX}")
            if n_song_tokens is not None and (songs >= n_song_tokens).any():
                problems.append(f"song tokens must be < {n_song_tokens} (the encoders' size)")
        if problems:
            raise DataError("invalid training file: " + "; ".join(problems))


def repeat_share(offsets: np.ndarray, songs: np.ndarray, chunk_rows: int = 1 << 22) -> float:
    """Share of the CSR sequences that hold some song more than once, from sorted
    (sequence, song) keys of about ``chunk_rows`` rows at a time (bounded temporaries)."""
    count, repeating, start = len(offsets) - 1, 0, 0
    while start < count:
        stop = int(np.searchsorted(offsets, offsets[start] + chunk_rows, side="right")) - 1
        stop = min(count, max(start + 1, stop))
        chunk = np.asarray(songs[offsets[start]:offsets[stop]], dtype=np.int64)
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(offsets[start:stop + 1]))
        width = int(chunk.max()) + 1
        keys = np.sort(rows * width + chunk)
        repeated = keys[1:][keys[1:] == keys[:-1]] // width
        repeating += len(np.unique(repeated))
        start = stop
    return repeating / count if count else 0.0


def save_training_file(
    folder: Path, playlist_ids: np.ndarray, offsets: np.ndarray, songs: np.ndarray,
    share: float | None = None,
) -> Path:
    """Validate and atomically write folder/training.npz (byte-deterministic); returns its path.
    It records ``share`` (default: computed), which ``train.exclude_seen = auto`` decides by."""
    sequences = Sequences(np.asarray(playlist_ids, dtype=np.int64),
                          np.asarray(offsets, dtype=np.int64), np.asarray(songs, dtype=np.int64))
    sequences.validate()
    if share is None:
        share = repeat_share(sequences.offsets, sequences.songs)
    path = Path(folder) / TRAINING_NPZ
    write_npz(path, {"playlist_ids": sequences.playlist_ids, "offsets": sequences.offsets,
                     "songs": sequences.songs,
                     "repeat_share": np.asarray(share, dtype=np.float64)})
    return path


def load_training_file(
    folder: Path, n_song_tokens: int | None = None, mmap: bool = False
) -> Sequences:
    """Read and validate folder/training.npz (optionally against the encoders' song count).

    A file without ``repeat_share`` (written before it was recorded) loads with None.

    ``mmap`` maps the arrays copy-on-write instead of reading them (fast at millions of rows,
    pages shared between processes); the validation still reads them once.
    """
    path = Path(folder) / TRAINING_NPZ
    if not path.is_file():
        raise DataError(f"{path}: training file not found; run preprocessing.py first")
    arrays = read_npz(path, mmap)
    missing = [name for name in ("playlist_ids", "offsets", "songs") if name not in arrays]
    if missing:
        raise DataError(f"{path}: missing array {missing[0]!r}")
    share = arrays.get("repeat_share")
    if share is not None and (share.shape != () or not 0 <= float(share) <= 1):
        raise DataError(f"{path}: repeat_share must be one number in [0, 1]")
    sequences = Sequences(arrays["playlist_ids"], arrays["offsets"], arrays["songs"],
                          None if share is None else float(share))
    sequences.validate(n_song_tokens)
    return sequences
