"""Catalog extension at scale: how long extend_recommender takes, what it holds, and whether the
approximate index finds the added songs.

    python benchmarks/bench_extend.py [--songs 116293] [--added 1000] [--preset full]
                                      [--threads 1] [--playlists 200]
    python benchmarks/bench_extend.py --checkpoint best.pt --catalog songs.csv

With ``--checkpoint`` a trained model is extended by the songs of ``--catalog`` it lacks
instead (e.g. a run of bench_coldstart.py, whose held-out songs are exactly those).

A network of the preset's sizes with random weights and a synthetic catalog of ``--songs``
songs (the original's album and artist counts per song) is extended by ``--added`` songs:
half of them on known albums, 30% on new albums of known artists, 20% by new artists, the
features drawn like the catalog's. For ``exact`` and ``approximate`` (faiss; the added songs
go to a flat index beside the kept one, retrieval.py): the extension's seconds and the
process's peak RSS growth; for ``approximate`` also the top-10 recall against exact scoring of
the same extended model, over playlists made of one added song's album-mates, and the share of
the added songs that the exact top-10 holds which the approximate one misses.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from checkpoint import build_model, load_model  # noqa: E402
from cold_start import extend_recommender  # noqa: E402
from config import load_config  # noqa: E402
from csv_tables import read_csv_songs  # noqa: E402
from preprocessing_utils import (  # noqa: E402
    FIRST_SONG_INDEX,
    NUMERIC_COLUMNS,
    RAW_FEATURE_FIELDS,
    Encoders,
)
from recommender import Recommender  # noqa: E402


def catalog(songs: int, rng: np.random.Generator) -> Encoders:
    """Synthetic encoders of ``songs`` songs (ids from 1,000,000), as bench_infer.py makes."""
    albums = max(1, round(songs * 22_152 / 116_293))
    artists = max(1, round(songs * 12_561 / 116_293))
    special = np.zeros(FIRST_SONG_INDEX, dtype=np.int64)
    features = rng.normal(size=(songs + FIRST_SONG_INDEX, 21)).astype(np.float32)
    features[:FIRST_SONG_INDEX] = 0
    album_artist = rng.integers(1, artists + 1, albums + 1)
    song_album = rng.integers(1, albums + 1, songs)
    numeric = len(NUMERIC_COLUMNS)
    return Encoders(
        np.arange(1_000_000, 1_000_000 + songs, dtype=np.int64),
        np.arange(200_000, 200_000 + albums, dtype=np.int64),
        np.arange(5_000, 5_000 + artists, dtype=np.int64),
        np.concatenate([special, song_album]), np.concatenate([special, album_artist[song_album]]),
        features, np.zeros(numeric), np.zeros(numeric), np.ones(numeric), True,
    )


def new_songs(encoders: Encoders, added: int, rng: np.random.Generator) -> pd.DataFrame:
    """``added`` song rows: on known albums, new albums of known artists, new artists."""
    kinds = rng.choice(3, added, p=[0.5, 0.3, 0.2])
    known = rng.integers(FIRST_SONG_INDEX, encoders.n_song_tokens, added)
    album = encoders.album_ids[encoders.song_album[known] - 1]
    artist = encoders.artist_ids[encoders.song_artist[known] - 1]
    album = np.where(kinds == 0, album, 900_000 + np.arange(added) // 4)
    artist = np.where(kinds == 2, 800_000 + np.arange(added) // 8, artist)
    rows = pd.DataFrame({"song_id": 5_000_000 + np.arange(added), "album_id": album,
                         "artist_id": artist})
    for field in RAW_FEATURE_FIELDS:
        rows[field] = np.nan
    rows["danceability"] = rng.random(added)
    rows["tempo"] = rng.uniform(60, 180, added)
    rows["track_number"] = rng.integers(1, 12, added)
    return rows


def peak_rss_mb() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Extend exact and approximate recommenders; print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--songs", type=int, default=116_293)
    parser.add_argument("--added", type=int, default=1000)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--playlists", type=int, default=200)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--catalog", type=Path, help="songs.csv (with --checkpoint)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.checkpoint is not None:
        loaded = load_model(args.checkpoint)
        model, encoders = loaded.model, loaded.encoders
        rows = read_csv_songs(args.catalog)
        rows = rows[encoders.find_songs(rows["song_id"].to_numpy()) < 0]
        args.songs, args.added, args.preset = encoders.n_songs, len(rows), str(args.checkpoint)
    else:
        encoders = catalog(args.songs, rng)
        model = build_model(load_config(args.preset, overrides=["model.song_dropout=0.1"]),
                            encoders).eval()
        rows = new_songs(encoders, args.added, rng)
    result: dict[str, object] = {"songs": args.songs, "added": args.added,
                                 "preset": args.preset, "threads": args.threads}
    extended = {}
    for index in ("exact", "approximate"):
        recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "bench",
                                  index=index)
        before = peak_rss_mb()
        started = time.perf_counter()
        extended[index] = extend_recommender(recommender, rows)
        result[f"{index}_seconds"] = round(time.perf_counter() - started, 3)
        result[f"{index}_peak_rss_growth_mb"] = round(peak_rss_mb() - before, 1)
    exact, approximate = extended["exact"], extended["approximate"]
    added_ids = set(rows["song_id"].tolist())
    picks = rng.choice(args.added, min(args.playlists, args.added), replace=False)
    tokens = exact.encoders.encode_songs(rows["song_id"].to_numpy()[picks])
    playlists = []
    for token in tokens:
        mates = np.flatnonzero(exact.encoders.song_album[:encoders.n_song_tokens]
                               == exact.encoders.song_album[token])
        mates = mates[mates >= FIRST_SONG_INDEX][:10]
        playlists.append(exact.encoders.decode_songs(mates).tolist() or
                         encoders.song_ids[:3].tolist())
    truth = exact.recommend(playlists, k=10)
    found = approximate.recommend(playlists, k=10)
    recall = np.mean([len(set(a.song_ids) & set(b.song_ids)) / len(b.song_ids)
                      for a, b in zip(found, truth, strict=True)])
    new_in_truth = sum(len(added_ids & set(b.song_ids)) for b in truth)
    new_missed = sum(len((added_ids & set(b.song_ids)) - set(a.song_ids))
                     for a, b in zip(found, truth, strict=True))
    result.update({"approximate_recall@10": round(float(recall), 4),
                   "added_in_exact_top10": new_in_truth, "added_missed_by_approximate": new_missed,
                   "flat_index_songs": int(approximate.approximate.added.ntotal)
                   if approximate.approximate is not None and approximate.approximate.added
                   is not None else 0,
                   "max_rss_mb": round(peak_rss_mb(), 1)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
