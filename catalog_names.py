"""The service's cache of song, artist and album names by catalog song id, packed into numpy
arrays, and grown (as a new object) when a catalog refresh adds songs.

At 2.26M songs a dict of str tuples takes ~750 MB in every worker; packed, each name is its
UTF-8 bytes in one buffer per field plus an offset, and a lookup is a binary search. Rows are
packed a chunk at a time, so a read of the whole catalog never holds more than one chunk of
Python strings; the gunicorn master builds the cache once before it forks (service.py), and a
refresh adds a layer of its own songs instead of copying the shared one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Names = tuple[str | None, str | None, str | None]
NameRow = tuple[Any, Any, Any, Any]

# rows turned into Python bytes at a time while packing
CHUNK_ROWS = 65_536
# packed layers a cache may have before the ones that refreshes added are merged
MAX_LAYERS = 8


@dataclass(frozen=True)
class _Column:
    """One name field of the stored rows: their UTF-8 bytes end to end, where each row's
    bytes start (one more entry than rows), and which rows have no name."""

    blob: bytes
    offsets: np.ndarray
    missing: np.ndarray

    @staticmethod
    def pack(names: Sequence[Any]) -> _Column:
        """The column of ``names``; a missing name (None, empty, NaN) is marked missing."""
        encoded = [None if text is None else text.encode() for text in map(_text, names)]
        lengths = np.fromiter((len(name or b"") for name in encoded), np.int64, len(encoded))
        return _Column(b"".join(name for name in encoded if name),
                       np.concatenate([[0], np.cumsum(lengths)]),
                       np.fromiter((name is None for name in encoded), bool, len(encoded)))

    @staticmethod
    def joined(parts: Sequence[_Column]) -> _Column:
        """The rows of ``parts`` one after the other."""
        starts = np.cumsum([0, *(len(part.blob) for part in parts)])[:-1]
        return _Column(b"".join(part.blob for part in parts),
                       np.concatenate([[0], *(part.offsets[1:] + start
                                              for part, start in zip(parts, starts,
                                                                     strict=True))]),
                       np.concatenate([np.zeros(0, bool), *(part.missing for part in parts)]))

    def get(self, row: int) -> str | None:
        """The name of stored row ``row``, None when it has none."""
        if self.missing[row]:
            return None
        return self.blob[int(self.offsets[row]):int(self.offsets[row + 1])].decode()


class _Packed:
    """Names of some songs, packed: rows are stored in the order they were given;
    ``song_ids`` is sorted for the lookup and ``_rows`` maps its positions to stored rows (None
    while both orders agree, as they do for names read by id and for refreshes that add higher
    ids)."""

    def __init__(self, stored_ids: np.ndarray, columns: list[_Column]) -> None:
        """Keep the columns of rows ``stored_ids`` (in stored order) and their sorted lookup."""
        order = np.argsort(stored_ids, kind="stable")
        self.song_ids = stored_ids[order]
        in_order = (order == np.arange(len(order))).all()
        self._rows: np.ndarray | None = None if in_order else order
        self.columns = columns

    @staticmethod
    def of(rows: Iterable[NameRow]) -> _Packed:
        """Pack (song_id, song, artist, album) rows, read one chunk at a time."""
        ids: list[np.ndarray] = []
        fields: tuple[list[_Column], ...] = ([], [], [])
        iterator = iter(rows)
        while chunk := list(itertools.islice(iterator, CHUNK_ROWS)):
            ids.append(np.fromiter((int(row[0]) for row in chunk), np.int64, len(chunk)))
            for field, parts in enumerate(fields, start=1):
                parts.append(_Column.pack([row[field] for row in chunk]))
            del chunk
        return _Packed(np.concatenate([np.zeros(0, np.int64), *ids]),
                       [_Column.joined(parts) for parts in fields])

    @staticmethod
    def merged(parts: Sequence[_Packed]) -> _Packed:
        """The rows of ``parts`` in one."""
        return _Packed(np.concatenate([part.stored_ids() for part in parts]),
                       [_Column.joined([part.columns[field] for part in parts])
                        for field in range(3)])

    def get(self, song_id: int) -> Names | None:
        """(song, artist, album) of a song, None when it has no entry here."""
        position = self.position(song_id)
        if position is None:
            return None
        row = position if self._rows is None else int(self._rows[position])
        song, artist, album = (column.get(row) for column in self.columns)
        return song, artist, album

    def position(self, song_id: int) -> int | None:
        """Where ``song_id`` is in ``song_ids``, None when these names lack it."""
        position = int(np.searchsorted(self.song_ids, song_id))
        if position == len(self.song_ids) or int(self.song_ids[position]) != song_id:
            return None
        return position

    def stored_ids(self) -> np.ndarray:
        """The song id of each stored row, in stored order."""
        if self._rows is None:
            return self.song_ids
        stored = np.empty_like(self.song_ids)
        stored[self._rows] = self.song_ids
        return stored


class CatalogNames:
    """Song, artist and album names by catalog song id; never changed once built.

    The names read at start are one packed layer, which the gunicorn workers share with the
    master; each refresh that adds songs adds a small layer instead of copying that one (the
    layers after the first are merged once there are more than ``MAX_LAYERS``).
    """

    def __init__(self, rows: Iterable[NameRow] = ()) -> None:
        """Pack (song_id, song, artist, album) rows, read one chunk at a time; a missing name
        (None, empty, NaN) stays None."""
        self._layers: tuple[_Packed, ...] = (_Packed.of(rows),)

    def __len__(self) -> int:
        """Number of songs with names."""
        return sum(len(layer.song_ids) for layer in self._layers)

    def get(self, song_id: int) -> Names:
        """(song, artist, album) of a song, (None, None, None) when it has no entry."""
        for layer in self._layers:
            names = layer.get(song_id)
            if names is not None:
                return names
        return None, None, None

    def plus(self, rows: Iterable[NameRow]) -> CatalogNames:
        """A new cache that also holds the songs of ``rows`` it lacks (the names it has stay)."""
        added = _Packed.of(row for row in rows if not self._has(int(row[0])))
        if not len(added.song_ids):
            return self
        layers = (*self._layers, added)
        if len(layers) > MAX_LAYERS:
            layers = (layers[0], _Packed.merged(layers[1:]))
        grown = CatalogNames()
        grown._layers = layers
        return grown

    def _has(self, song_id: int) -> bool:
        """True when the cache holds a song's names."""
        return any(layer.position(song_id) is not None for layer in self._layers)


def _text(value: Any) -> str | None:
    """A name as text, None for missing values (None, empty, or NaN from pandas)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)
