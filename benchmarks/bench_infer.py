"""Single-playlist inference latency through the Recommender (the service's path).

    python benchmarks/bench_infer.py --preset full --threads 1

A model of the preset's shape at full vocabulary sizes with random weights; one playlist of
5..60 catalog ids per call, top-10 with exclude_seen. Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_config
from model import FIRST_SONG_INDEX, BERT4Rec
from preprocessing_utils import NUMERIC_COLUMNS, Encoders
from train import Recommender


def main() -> None:
    """Parse flags, time the calls, print percentiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--songs", type=int, default=116_293)
    parser.add_argument("--albums", type=int, default=22_152)
    parser.add_argument("--artists", type=int, default=12_561)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tokens = args.songs + FIRST_SONG_INDEX
    numeric = len(NUMERIC_COLUMNS)
    special = np.zeros(FIRST_SONG_INDEX, dtype=np.int64)
    features = rng.normal(size=(tokens, 21)).astype(np.float32)
    features[:FIRST_SONG_INDEX] = 0
    encoders = Encoders(
        np.arange(1_000_000, 1_000_000 + args.songs, dtype=np.int64),
        np.arange(200_000, 200_000 + args.albums, dtype=np.int64),
        np.arange(5_000, 5_000 + args.artists, dtype=np.int64),
        np.concatenate([special, rng.integers(1, args.albums + 1, args.songs)]),
        np.concatenate([special, rng.integers(1, args.artists + 1, args.songs)]),
        features, np.zeros(numeric), np.zeros(numeric), np.ones(numeric), True,
    )
    config = load_config(args.preset)
    model = BERT4Rec(config.model, tokens, encoders.n_album_tokens, encoders.n_artist_tokens,
                     encoders.n_features, config.data.seq_len)
    model.set_side_tables(torch.from_numpy(encoders.song_album),
                          torch.from_numpy(encoders.song_artist),
                          torch.from_numpy(encoders.song_features))
    recommender = Recommender(model, encoders, torch.ones(tokens), "bench")
    playlists = [encoders.song_ids[rng.integers(0, args.songs, rng.integers(5, 61))].tolist()
                 for _ in range(args.calls + 20)]
    timings = []
    for index, playlist in enumerate(playlists):
        started = time.perf_counter()
        recommender.recommend([playlist], k=args.k, exclude_seen=True)
        if index >= 20:
            timings.append((time.perf_counter() - started) * 1000)
    result = {"preset": args.preset, "threads": args.threads, "calls": args.calls,
              "p50_ms": float(np.percentile(timings, 50)),
              "p99_ms": float(np.percentile(timings, 99))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
