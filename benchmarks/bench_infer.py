"""Single-playlist inference latency through the Recommender (the service's path).

    python benchmarks/bench_infer.py --preset full --threads 1
    python benchmarks/bench_infer.py --index approximate --songs 2262292 --threads 1
    python benchmarks/bench_infer.py --index approximate --real runs/demo/best.pt
    python benchmarks/bench_infer.py --index approximate --real RUN/best.pt --real-data DATA \
        --nprobe 64,128,256

A model of the preset's shape at full vocabulary sizes (``--songs``; albums and artists scale
with it as in the original catalog) with random weights, seeded so that every run measures the
same model; one playlist of 5..60 catalog ids per call, top-10 with exclude_seen, through the
``--index`` given. ``recall@10`` is the share of the
exact top-10 that the same call finds, over the timed playlists; with ``--real CHECKPOINT``
also over real playlists for a trained model: the demo data's (each without its last song), or
with ``--real-data DIR`` (the preprocessing.py folder the checkpoint was trained on) the inputs
of its test split, the held-out playlists without their last song, at each ``--nprobe``. The
original design's inference is re-implemented beside it and timed in the same run, in
alternating blocks of calls so that both see the same machine and each keeps its own data in
cache within a block: the same encoder
with the original's separate d_model x songs output layer, applied with a softmax over the
whole vocabulary at every position, then a full sort of the last position's probabilities
(with ``--index exact`` only). Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoint import build_model, load_checkpoint
from config import DEMO_DATA_DIR, Config, load_config
from dataset import load_data, split_for
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, NUMERIC_COLUMNS, PAD_INDEX, Encoders
from recommender import Recommendation, Recommender
from retrieval import INDEX_MODES, NPROBE

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


def recall_at_10(found: list[Recommendation], exact: list[Recommendation]) -> float:
    """Mean share of each exact top-10 that ``found`` holds too."""
    shares = [len(set(mine.song_ids[:10]) & set(truth.song_ids[:10])) / len(truth.song_ids[:10])
              for mine, truth in zip(found, exact, strict=True) if truth.song_ids]
    return float(np.mean(shares))


def score_error(found: list[Recommendation], exact: list[Recommendation]) -> float:
    """Largest relative difference of a song's probability between ``found`` and exact."""
    errors = [abs(mine_score / exact_score - 1.0)
              for mine, truth in zip(found, exact, strict=True)
              for song, exact_score in zip(truth.song_ids, truth.scores, strict=True)
              for mine_song, mine_score in zip(mine.song_ids, mine.scores, strict=True)
              if song == mine_song and exact_score > 0]
    return float(max(errors, default=0.0))


def timed(recommender: Recommender, playlists: Sequence[list[int]], k: int
          ) -> tuple[list[Recommendation], list[float]]:
    """Each playlist's recommendation, one call each, and the calls' milliseconds."""
    answers, timings = [], []
    for playlist in playlists:
        started = time.perf_counter()
        answers.append(recommender.recommend([playlist], k)[0])
        timings.append((time.perf_counter() - started) * 1000)
    return answers, timings


def real_playlists(limit: int) -> list[list[int]]:
    """The demo data's first ``limit`` playlists of at least 3 songs, without their last song."""
    songs: dict[int, list[tuple[int, int]]] = {}
    with open(DEMO_DATA_DIR / "playlist_songs.csv", newline="") as file:
        for row in csv.DictReader(file):
            songs.setdefault(int(row["playlist_id"]), []).append((int(row["pos"]),
                                                                 int(row["song_id"])))
    ordered = [[song for _, song in sorted(rows)] for _, rows in sorted(songs.items())]
    return [playlist[:-1] for playlist in ordered if len(playlist) >= 3][:limit]


def test_playlists(checkpoint: Path, data_dir: Path, limit: int) -> list[list[int]]:
    """The first ``limit`` test inputs of at least 2 songs (held-out playlists without their
    last song) of the split ``checkpoint`` was trained with on ``data_dir``, as catalog ids."""
    encoders, sequences = load_data(data_dir)
    config = Config.from_dict(load_checkpoint(checkpoint)["config"])
    inputs = split_for(config, sequences).test.inputs
    rows = (inputs.songs[inputs.offsets[row] : inputs.offsets[row + 1]]
            for row in range(len(inputs.lengths)))
    return [encoders.decode_songs(songs).tolist() for songs in rows if len(songs) >= 2][:limit]


def real_recall(checkpoint: Path, index: str, k: int, playlists: list[list[int]],
                nprobes: list[int]) -> dict[str, object]:
    """recall@10, score error and p50 of ``index`` against exact on real ``playlists``, at
    each of the index's ``nprobes`` (the lists each query scans)."""
    exact = Recommender.from_checkpoint(checkpoint, index="exact")
    started = time.perf_counter()
    mine = Recommender.from_checkpoint(checkpoint, index=index)
    load_seconds = time.perf_counter() - started
    truth, exact_ms = timed(exact, playlists, k)
    result: dict[str, object] = {"playlists": len(playlists), "songs": mine.n_songs,
                                 "exact_p50_ms": float(np.median(exact_ms)),
                                 "load_seconds": load_seconds}
    faiss_index = mine.approximate.index if mine.approximate is not None else None
    by_nprobe = []
    for nprobe in nprobes if faiss_index is not None else [0]:
        if faiss_index is not None:
            faiss_index.nprobe = min(nprobe, faiss_index.nlist)
        found, mine_ms = timed(mine, playlists, k)
        by_nprobe.append({"nprobe": nprobe, "recall@10": recall_at_10(found, truth),
                          "max_score_error": score_error(found, truth),
                          "p50_ms": float(np.median(mine_ms)),
                          "p99_ms": float(np.percentile(mine_ms, 99))})
    result.update(by_nprobe[0])
    if len(by_nprobe) > 1:
        result["by_nprobe"] = by_nprobe
    return result


def main() -> None:
    """Parse flags, time the calls, print percentiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--songs", type=int, default=116_293)
    parser.add_argument("--albums", type=int, help="default: 22,152 per 116,293 songs")
    parser.add_argument("--artists", type=int, help="default: 12,561 per 116,293 songs")
    parser.add_argument("--index", choices=INDEX_MODES, default="exact")
    parser.add_argument("--real", type=Path, metavar="CHECKPOINT",
                        help="also measure recall on real playlists with this checkpoint")
    parser.add_argument("--real-data", type=Path, metavar="DIR",
                        help="with --real: the test playlists of this preprocessing.py folder "
                             "(the checkpoint's data) instead of the demo data's")
    parser.add_argument("--nprobe", default=str(NPROBE),
                        help="with --real: the index's nprobe values to measure, comma-separated")
    parser.add_argument("--real-playlists", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.albums = args.albums or max(1, round(args.songs * 22_152 / 116_293))
    args.artists = args.artists or max(1, round(args.songs * 12_561 / 116_293))
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
    compare = args.index == "exact"
    torch.manual_seed(0)  # the same random model in every run, so runs compare like for like
    models = [build_model(load_config(args.preset, overrides=overrides), encoders).eval()
              for overrides in ([], ["model.tie_head=false"])[: 2 if compare else 1]]
    started = time.perf_counter()
    recommender = Recommender(models[0], encoders, torch.ones(tokens), "bench", index=args.index)
    load_seconds = time.perf_counter() - started
    playlists = [encoders.song_ids[rng.integers(0, args.songs, rng.integers(5, 61))].tolist()
                 for _ in range(args.calls * BLOCK // (BLOCK - WARMUP))]
    ours: list[float] = []
    original: list[float] = []
    calls = [(ours, lambda playlist: recommender.recommend([playlist], args.k))]
    if compare:
        calls.append((original, lambda playlist: original_recommend(models[1], encoders,
                                                                    playlist, args.k)))
    for block in range(0, len(playlists), BLOCK):
        for timings, call in calls:
            for index, playlist in enumerate(playlists[block : block + BLOCK]):
                started = time.perf_counter()
                call(playlist)
                if index >= WARMUP:
                    timings.append((time.perf_counter() - started) * 1000)
    found = [recommender.recommend([playlist], args.k)[0] for playlist in playlists]
    result: dict[str, object] = {
        "preset": args.preset, "threads": args.threads, "calls": args.calls, "songs": args.songs,
        "index": recommender.index_mode, **percentiles(ours)}
    if recommender.approximate is not None:
        exact = Recommender(models[0], encoders, torch.ones(tokens), "bench", index="exact")
        truth = exact.recommend(playlists, args.k)
        result.update({"recall@10": recall_at_10(found, truth),
                       "max_score_error": score_error(found, truth),
                       "build_seconds": recommender.approximate.build_seconds,
                       "memory_mb": recommender.approximate.memory_bytes() / 1e6})
    else:
        result.update({"recall@10": 1.0, "original": percentiles(original),
                       "speedup_p50": float(np.median(original) / np.median(ours))})
    result.update({"load_seconds": load_seconds, "max_rss_mb":
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "read_bandwidth_gb_s": read_bandwidth_gb_s()})
    if args.real is not None:
        real = (real_playlists(args.real_playlists) if args.real_data is None
                else test_playlists(args.real, args.real_data, args.real_playlists))
        result["real"] = real_recall(args.real, args.index, args.k, real,
                                     [int(value) for value in args.nprobe.split(",")])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
