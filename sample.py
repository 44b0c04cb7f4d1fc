"""Using a trained checkpoint: evaluate it beside the baselines, continue a playlist CSV.

``train.py --evaluate`` and ``train.py --recommend`` call these; the notebook does too.
Nothing here trains, so the module sits beside train.py rather than inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoint import load_model
from cold_start import extend_recommender, read_catalog_songs
from dataset import load_data, split_for
from evaluation import evaluate_split, keep_freed_memory
from preprocessing_utils import DataError
from recommender import Recommendation, Recommender


def run_evaluate(
    checkpoint_path: Path, data_dir: Path, which: str, exclude_seen: bool | None, threads: int,
) -> dict[str, Any]:
    """Evaluate a checkpoint and both baselines on the split it was trained with."""
    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    encoders, sequences = load_data(data_dir)
    loaded = load_model(checkpoint_path, encoders, where=Path(data_dir) / "encoders")
    split = split_for(loaded.config, sequences)
    results = evaluate_split(loaded.model, split, loaded.config, torch.device("cpu"), which,
                             exclude_seen)
    results["checkpoint"] = str(checkpoint_path)
    results["model_version"] = loaded.model_version
    return results


def with_catalog(recommender: Recommender, catalog: Path | None) -> Recommender:
    """The recommender extended by the songs of ``catalog``/songs.csv it lacks (cold_start.py),
    saying how many were added; unchanged without a songs table or new songs."""
    if catalog is None or not (Path(catalog) / "songs.csv").is_file():
        return recommender
    extended = extend_recommender(recommender, read_catalog_songs(Path(catalog)))
    if extended is not recommender:
        print(f"catalog: {extended.n_songs - recommender.n_songs} songs of {catalog}/songs.csv "
              f"added to the model's {recommender.n_songs} (no retraining; cold_start.py)")
    return extended


def read_sequence_csv(path: Path) -> list[int]:
    """Song ids of a ``pos,song_id`` CSV in position order."""
    import pandas as pd

    frame = pd.read_csv(path)
    if not {"pos", "song_id"} <= set(frame.columns):
        raise DataError(f"{path}: expected columns pos,song_id")
    return frame.sort_values("pos")["song_id"].astype(np.int64).tolist()


def print_recommendations(
    sequence: list[int], recommendation: Recommendation, catalog: Path | None
) -> None:
    """The playlist and its recommendations as tables, with names when the catalog has them."""
    names = None
    if catalog is not None:
        from preprocessing import read_catalog_names

        names = read_catalog_names(Path(catalog))

    def describe(song_id: int) -> str:
        if names is None or song_id not in names.index:
            return f"{song_id:>10}"
        song, artist, album = (str(names.at[song_id, column])
                               for column in ("song", "artist", "album"))
        return f"{song_id:>10}  {song[:32]:<32}  {artist[:24]:<24}  {album[:28]}"

    heading = f"{'song_id':>10}  {'song':<32}  {'artist':<24}  album"
    print(f"Playlist ({len(sequence)} songs):")
    print(f"{'#':>3}  {heading}")
    for position, song_id in enumerate(sequence, start=1):
        print(f"{position:>3}  {describe(song_id)}")
    if recommendation.unknown_song_ids:
        print(f"unknown to the model (ignored): {recommendation.unknown_song_ids}")
    print(f"\nTop {len(recommendation.song_ids)} next songs:")
    print(f"{'#':>3}  {'score':>7}  {heading}")
    for rank, (song_id, score) in enumerate(
        zip(recommendation.song_ids, recommendation.scores, strict=True), start=1
    ):
        print(f"{rank:>3}  {score:>7.4f}  {describe(song_id)}")
