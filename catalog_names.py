"""The service's cache of song, artist and album names by catalog song id, packed into numpy
arrays, and grown (as a new object) when a catalog refresh adds songs.

At 2.26M songs a dict of str tuples takes ~750 MB in every worker; packed, each name is its
UTF-8 bytes in one buffer per field plus an offset, and a lookup is a binary search.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

Names = tuple[str | None, str | None, str | None]
NameRow = tuple[Any, Any, Any, Any]


class CatalogNames:
    """Song, artist and album names by catalog song id; never changed once built.

    Rows are stored in the order they were given; ``song_ids`` is sorted for the lookup and
    ``_rows`` maps its positions to stored rows (None while both orders agree, as they do for
    names read by id and for refreshes that add higher ids).
    """

    def __init__(self, rows: Iterable[NameRow]) -> None:
        """Pack (song_id, song, artist, album) rows; a missing name (None, empty, NaN) stays
        None."""
        ids: list[int] = []
        fields: tuple[list[bytes | None], ...] = ([], [], [])
        for song_id, *names in rows:
            ids.append(int(song_id))
            for column, name in zip(fields, names, strict=True):
                text = _text(name)
                column.append(None if text is None else text.encode())
        stored = np.asarray(ids, dtype=np.int64)
        order = np.argsort(stored, kind="stable")
        self.song_ids = stored[order]
        self._rows: np.ndarray | None = None if (np.diff(stored) > 0).all() else order
        self._blobs: list[bytes] = []
        self._offsets: list[np.ndarray] = []
        self._missing: list[np.ndarray] = []
        for column in fields:
            lengths = np.fromiter((len(name or b"") for name in column), np.int64, len(column))
            self._offsets.append(np.concatenate([[0], np.cumsum(lengths)]))
            self._missing.append(np.fromiter((name is None for name in column), bool,
                                             len(column)))
            self._blobs.append(b"".join(name for name in column if name))

    def __len__(self) -> int:
        """Number of songs with names."""
        return len(self.song_ids)

    def get(self, song_id: int) -> Names:
        """(song, artist, album) of a song, (None, None, None) when it has no entry."""
        position = int(np.searchsorted(self.song_ids, song_id))
        if position == len(self.song_ids) or self.song_ids[position] != song_id:
            return None, None, None
        row = position if self._rows is None else int(self._rows[position])
        names = [None if missing[row] else
                 blob[int(offsets[row]):int(offsets[row + 1])].decode()
                 for blob, offsets, missing in zip(self._blobs, self._offsets, self._missing,
                                                   strict=True)]
        return names[0], names[1], names[2]

    def plus(self, rows: Iterable[NameRow]) -> CatalogNames:
        """A new cache that also holds the songs of ``rows`` it lacks (the names it has stay)."""
        added = CatalogNames(row for row in rows if not self._has(int(row[0])))
        if not len(added):
            return self
        merged = CatalogNames(())
        count = len(self)
        stored = np.concatenate([self._stored_rows(), added._stored_rows() + count])
        ids = np.concatenate([self.song_ids, added.song_ids])
        order = np.argsort(ids, kind="stable")
        merged.song_ids = ids[order]
        rows_in_order = stored[order]
        identity = (rows_in_order == np.arange(len(ids))).all()
        merged._rows = None if identity else rows_in_order
        merged._blobs = [old + new for old, new in zip(self._blobs, added._blobs, strict=True)]
        merged._offsets = [np.concatenate([old, new[1:] + old[-1]]) for old, new in
                           zip(self._offsets, added._offsets, strict=True)]
        merged._missing = [np.concatenate([old, new]) for old, new in
                           zip(self._missing, added._missing, strict=True)]
        return merged

    def _has(self, song_id: int) -> bool:
        """True when the cache holds a song's names."""
        position = int(np.searchsorted(self.song_ids, song_id))
        return position < len(self.song_ids) and int(self.song_ids[position]) == song_id

    def _stored_rows(self) -> np.ndarray:
        """The stored row of each position of ``song_ids``."""
        return np.arange(len(self), dtype=np.int64) if self._rows is None else self._rows


def _text(value: Any) -> str | None:
    """A name as text, None for missing values (None, empty, or NaN from pandas)."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)
