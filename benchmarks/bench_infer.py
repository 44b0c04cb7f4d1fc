"""Single-playlist inference latency through the Recommender (the service's path).

    python benchmarks/bench_infer.py --preset full --threads 1

A model of the preset's shape at full vocabulary sizes with random weights; one playlist of
5..60 catalog ids per call, top-10 with exclude_seen. The original design's inference is
re-implemented beside it and timed in the same run, in alternating blocks of calls so that both
see the same machine and each keeps its own data in cache within a block: the same encoder
with the original's separate d_model x songs output layer, applied with a softmax over the
whole vocabulary at every position, then a full sort of the last position's probabilities.
Prints one JSON object as the last line.
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

from checkpoint import build_model
from config import load_config
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, NUMERIC_COLUMNS, PAD_INDEX, Encoders
from recommender import Recommender

BLOCK = 25
WARMUP = 5


def original_recommend(
    model: BERT4Rec, encoders: Encoders, playlist: list[int], k: int
) -> list[int]:
    """The original design's top-k: softmax at every position, full sort of the last one."""
    tokens = encoders.encode_songs(playlist)
    window = torch.from_numpy(tokens[tokens >= FIRST_SONG_INDEX][-(model.seq_len - 1) :])
    inputs = torch.full((1, model.seq_len), PAD_INDEX, dtype=torch.long)
    inputs[0, -1] = MASK_INDEX
    inputs[0, model.seq_len - 1 - len(window) : -1] = window
    with torch.no_grad():
        probabilities = torch.softmax(model.logits(model.encode(inputs)), dim=-1)[0, -1]
        probabilities[torch.from_numpy(tokens)] = 0.0
        probabilities[:FIRST_SONG_INDEX] = 0.0
        order = torch.argsort(probabilities, descending=True)[:k]
    return encoders.decode_songs(order.numpy()).tolist()


def percentiles(timings: list[float]) -> dict[str, float]:
    """p50 and p99 of timings in milliseconds."""
    return {"p50_ms": float(np.percentile(timings, 50)),
            "p99_ms": float(np.percentile(timings, 99))}


def read_bandwidth_gb_s() -> float:
    """This machine's memory read bandwidth at the moment, in GB/s over a 256 MB sum.

    The head streams a 30 MB matrix per call, so on this shared machine this number moves
    the latency more than anything in the code; it is printed beside the timings.
    """
    values = torch.ones(64 * 1024 * 1024)
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        values.sum()
        timings.append(time.perf_counter() - started)
    return values.numel() * 4 / min(timings) / 1e9


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
    models = [build_model(load_config(args.preset, overrides=overrides), encoders).eval()
              for overrides in ([], ["model.tie_head=false"])]
    recommender = Recommender(models[0], encoders, torch.ones(tokens), "bench")
    playlists = [encoders.song_ids[rng.integers(0, args.songs, rng.integers(5, 61))].tolist()
                 for _ in range(args.calls * BLOCK // (BLOCK - WARMUP))]
    ours, original = [], []
    calls = ((ours, lambda playlist: recommender.recommend([playlist], args.k)),
             (original, lambda playlist: original_recommend(models[1], encoders, playlist,
                                                            args.k)))
    for block in range(0, len(playlists), BLOCK):
        for timings, call in calls:
            for index, playlist in enumerate(playlists[block : block + BLOCK]):
                started = time.perf_counter()
                call(playlist)
                if index >= WARMUP:
                    timings.append((time.perf_counter() - started) * 1000)
    result = {"preset": args.preset, "threads": args.threads, "calls": args.calls,
              **percentiles(ours), "original": percentiles(original),
              "speedup_p50": float(np.median(original) / np.median(ours)),
              "read_bandwidth_gb_s": read_bandwidth_gb_s()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
