"""The packed catalog names answer as the dict of names they replace."""

from __future__ import annotations

import random

import pytest

import catalog_names
from catalog_names import CatalogNames


def test_packed_names_read_back_by_id_with_missing_ones_none() -> None:
    rows = [(30, "Zoë", "Björk", ""), (10, "One", None, "Debut"), (20, float("nan"), "B", "C"),
            (40, "", "", "")]
    names = CatalogNames(rows)
    assert len(names) == 4
    assert names.get(10) == ("One", None, "Debut")
    assert names.get(20) == (None, "B", "C")
    assert names.get(30) == ("Zoë", "Björk", None)
    assert names.get(40) == (None, None, None)
    for unknown in (5, 15, 99):
        assert names.get(unknown) == (None, None, None)


def test_an_empty_catalog_knows_no_song() -> None:
    names = CatalogNames(())
    assert len(names) == 0 and names.get(1) == (None, None, None)


def test_names_packed_in_chunks_and_grown_answer_as_one_dict(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setattr(catalog_names, "CHUNK_ROWS", 3)
    rows = [(song, f"song {song}", None if song % 4 == 0 else f"artist {song % 7}",
             "" if song % 5 == 0 else f"album {song % 11}") for song in range(1, 41)]
    random.Random(0).shuffle(rows)
    expected = {song: (name, artist, album or None) for song, name, artist, album in rows}
    names = CatalogNames(row for row in rows[:25])
    known = rows[0][0]
    grown = names.plus([(known, "renamed", "x", "y"), *rows[25:], (99, "new", None, "")])
    expected[99] = ("new", None, None)
    assert len(names) == 25 and len(grown) == 41
    for song, answer in expected.items():
        assert grown.get(song) == answer
        assert names.get(song) == (answer if any(row[0] == song for row in rows[:25])
                                   else (None, None, None))
    assert grown.plus(rows) is grown


def test_many_refreshes_keep_every_name_and_leave_older_caches_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_names, "MAX_LAYERS", 3)
    caches = [CatalogNames([(song, f"s{song}", f"a{song}", f"b{song}") for song in range(100)])]
    for step in range(6):  # each refresh adds songs above and below those known
        added = [(1000 + step, f"s{1000 + step}", None, "x"), (-1 - step, f"s{-1 - step}", "y", "")]
        caches.append(caches[-1].plus([*added, (5, "renamed", None, None)]))
    for count, cache in enumerate(caches):
        assert len(cache) == 100 + 2 * count
        assert cache.get(5) == ("s5", "a5", "b5")
        for step in range(6):
            expected = step < count
            assert (cache.get(1000 + step) == (f"s{1000 + step}", None, "x")) is expected
            assert (cache.get(-1 - step) == (f"s{-1 - step}", "y", None)) is expected
