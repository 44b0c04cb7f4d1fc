"""The packed catalog names answer as the dict of names they replace."""

from __future__ import annotations

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
