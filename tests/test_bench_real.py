"""bench_real.py's parsing of an atomic .inter file: ties kept in file order, users grouped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_real import parse_interactions, to_playlist_rows, write_training_folder

from dataset import load_data

LINES = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n",
    "7\t30\t4\t300\n",
    "5\t11\t3\t200\n",
    "7\t31\t5\t100\n",
    "5\t12\t1\t200\n",
    "7\t32\t2\t300\n",
    "5\t10\t5\t100\n",
    "\n",
    "5\t12\t4\t250\n",
]


def test_interactions_are_grouped_by_user_in_time_order_with_ties_in_file_order() -> None:
    rows = to_playlist_rows(parse_interactions(LINES))
    by_user = {user: group.sort_values("pos")["song_id"].tolist()
               for user, group in rows.groupby("playlist_id")}
    assert by_user == {5: [10, 11, 12, 12], 7: [31, 30, 32]}
    assert rows.groupby("playlist_id")["pos"].apply(list).tolist() == [[0, 1, 2, 3], [0, 1, 2]]


def test_every_rating_is_one_interaction_whatever_its_value() -> None:
    interactions = parse_interactions(LINES)
    assert len(interactions) == 7
    assert list(interactions.columns) == ["user", "item", "timestamp"]


def test_the_training_folder_has_ids_only_and_the_same_sequences(tmp_path: Path) -> None:
    write_training_folder(to_playlist_rows(parse_interactions(LINES)), tmp_path)
    encoders, sequences = load_data(tmp_path)
    assert not encoders.has_side_info
    assert sequences.playlist_ids.tolist() == [5, 7]
    decoded = encoders.decode_songs(sequences.songs)
    assert np.array_equal(decoded, [10, 11, 12, 12, 31, 30, 32])
    assert sequences.offsets.tolist() == [0, 4, 7]
