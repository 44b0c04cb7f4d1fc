"""Approximate top-k over the output head: a faiss index, pointer candidates, exact re-scoring.

The head scores song s for a hidden state as ``x · v_s + b_s`` (plus, with the side pointer,
copy scores that are non-zero only for songs of the playlist's visible artists and albums and
for their album successors). The index holds ``[v_s, b_s]`` and is queried with ``[x, 1]``, so
its inner product is the head's score. A shortlist (k + the playlist's length + a margin) is
retrieved, the pointer's candidates (and, with the seen bias, the input's songs) are merged in,
and every candidate is re-scored exactly:
the answer is the exact one whenever the index finds the true top non-pointer songs. The index
is IVF-flat over L2 after the standard reduction of inner product to distance (one more
column, sqrt(M² - |row|²), with 0 in the query), which balances its lists: chosen by
measurement, BENCHMARKS.md "Approximate retrieval". It is saved beside the checkpoint in
faiss's own serialization with a JSON record of the checkpoint's SHA-256; a stale, foreign or
damaged file is refused and rebuilt.

A catalog extension (cold_start.py) keeps the index of the model it extends, whose songs' head
rows it leaves unchanged, and searches the added songs in an exact flat index beside it: no
copy of the big index and no retraining of its lists. When the added songs outnumber what one
query scans in the index (nprobe of its lists), searching them flat costs more than the index
itself, and the index is rebuilt over the whole catalog instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from atomic_files import atomic_write
from checkpoint import read_weights_only
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, find_ids
from table_reserve import TableReserve

INDEX_MODES = ("exact", "approximate", "auto")
# ``auto`` switches to the index from this catalog size on (the measured break-even)
AUTO_MIN_SONGS = 60_000
# extra songs retrieved beyond k + the playlist's length, before exact re-scoring
SHORTLIST_MARGIN = 50
# inverted lists scanned per query
NPROBE = 128
# songs scored per query to estimate the softmax's normalizer over the songs not re-scored
TAIL_SAMPLE = 4096
INDEX_FORMAT = "bert4musicrec-index-1"

log = logging.getLogger(__name__)


def resolve_index_mode(mode: str, n_songs: int) -> str:
    """``exact`` or ``approximate`` for a setting of INDEX_MODES and a catalog size."""
    if mode not in INDEX_MODES:
        raise ValueError(f"index must be one of {', '.join(INDEX_MODES)}, not {mode!r}")
    if mode == "auto":
        return "approximate" if n_songs >= AUTO_MIN_SONGS else "exact"
    return mode


def head_rows(model: BERT4Rec, first: int = 0) -> torch.Tensor:
    """The head vector of every song token from ``first`` on, with its output bias appended,
    (n_song_tokens - first, width + 1)."""
    with torch.no_grad():
        if first == 0:
            vectors = model.song_vectors().detach().float()
        else:
            tokens = torch.arange(first, model.n_song_tokens)
            vectors = model.candidate_vectors(tokens).detach().float()
        bias = model.output_bias.detach().float()[first:, None]
        return torch.cat([vectors, bias], dim=1).contiguous()


def n_lists(n_songs: int) -> int:
    """Inverted lists for a catalog: the power of two nearest 4·sqrt(n), with >= 39 songs each."""
    target = 4 * math.sqrt(max(n_songs, 1))
    lists = 2 ** round(math.log2(target))
    while lists > 1 and lists * 39 > n_songs:
        lists //= 2
    return lists


def to_distance(vectors: np.ndarray) -> np.ndarray:
    """Rows with sqrt(M² - |row|²) appended (M the largest norm): for a query with 0 there, a
    smaller L2 distance is exactly a larger inner product."""
    squared = np.einsum("nd,nd->n", vectors, vectors, dtype=np.float64)
    extra = np.sqrt(np.maximum(squared.max() - squared, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1))


def build_index(rows: np.ndarray) -> faiss.IndexIVFFlat:
    """An IVF-flat L2 index over ``to_distance(rows)`` (ids = row numbers), nprobe = NPROBE."""
    vectors = to_distance(rows)
    songs, width = vectors.shape
    lists = n_lists(songs)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(width), width, lists, faiss.METRIC_L2)
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(songs, min(songs, 64 * lists), replace=False))]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(NPROBE, lists)
    return index


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 a checkpoint's envelope records for its state (read memory-mapped, cheap)."""
    envelope = read_weights_only(path, path, mmap=True)
    return str(envelope["sha256"])


def index_files(checkpoint: Path) -> tuple[Path, Path]:
    """The index file and its JSON record beside a checkpoint: ``best.pt.faiss(.json)``."""
    index = checkpoint.with_name(checkpoint.name + ".faiss")
    return index, index.with_name(index.name + ".json")


def read_index(
    checkpoint: Path, digest: str, songs: int, width: int
) -> faiss.IndexIVFFlat | None:
    """The saved index of this checkpoint, or None (with the reason logged) if it is missing,
    stale (another checkpoint's hash), damaged (its bytes differ from the record) or of
    another shape."""
    index_path, record_path = index_files(checkpoint)
    if not index_path.is_file() or not record_path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(record_path.read_text())
        data = index_path.read_bytes()
        reason = None
        if record.get("format") != INDEX_FORMAT:
            reason = "not a Bert4MusicRec index record"
        elif record.get("checkpoint_sha256") != digest:
            reason = "built for another checkpoint"
        elif record.get("index_sha256") != hashlib.sha256(data).hexdigest():
            reason = "its bytes do not match their recorded SHA-256"
        if reason is None:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
            if (not isinstance(index, faiss.IndexIVFFlat) or index.ntotal != songs
                    or index.d != width + 1 or index.metric_type != faiss.METRIC_L2):
                reason = "it is not an index of this model's head"
            else:
                return index
    except (OSError, ValueError, RuntimeError) as error:
        reason = f"unreadable ({type(error).__name__})"
    log.warning("refusing index %s: %s; rebuilding it", index_path, reason)
    return None


def write_index(
    index: faiss.IndexIVFFlat, checkpoint: Path, digest: str, build_seconds: float
) -> None:
    """Save the index beside its checkpoint (atomically), then its record; failures are logged
    and the index stays in memory (a read-only model folder still serves)."""
    index_path, record_path = index_files(checkpoint)
    data = faiss.serialize_index(index).tobytes()
    record = {"format": INDEX_FORMAT, "checkpoint_sha256": digest,
              "index_sha256": hashlib.sha256(data).hexdigest(), "kind": "IVFFlat,L2",
              "lists": int(index.nlist), "songs": int(index.ntotal),
              "build_seconds": round(build_seconds, 3)}
    try:
        atomic_write(index_path, lambda file: file.write(data))
        atomic_write(record_path, lambda file: file.write(json.dumps(record).encode()))
    except OSError as error:
        log.warning("could not save index %s (%s); serving it from memory", index_path, error)


class ApproximateScorer:
    """Top-k song tokens of the head through the index, re-scored exactly (see module doc)."""

    def __init__(
        self, model: BERT4Rec, checkpoint: Path | None = None,
        shared: faiss.IndexIVFFlat | None = None, rows: torch.Tensor | None = None,
        known_finite: int = 0,
    ) -> None:
        """``shared``: the index of the model this one extends, for its first songs (module doc);
        ``rows``: ``head_rows(model)`` when the caller has them, the first ``known_finite`` of
        them already checked."""
        self.model = model
        self.rows = head_rows(model).cpu() if rows is None else rows
        self.n_songs = len(self.rows) - FIRST_SONG_INDEX
        # a NaN or infinity in the head makes every playlist's scores non-finite
        unchecked = self.rows[max(FIRST_SONG_INDEX, known_finite):]
        self.finite = bool(torch.isfinite(unchecked).all())
        self.build_seconds = 0.0
        self.index: faiss.IndexIVFFlat | None = None
        self.added: faiss.IndexFlatIP | None = None
        if self.finite and shared is not None and self._can_share(shared):
            self.index = shared
            self.added = faiss.IndexFlatIP(self.rows.shape[1])
            self.added.add(self.rows[FIRST_SONG_INDEX + shared.ntotal:].numpy())
        elif self.finite:
            self.index = self._load_or_build(checkpoint)
        rng = np.random.default_rng(1)
        sample = rng.choice(self.n_songs, min(self.n_songs, TAIL_SAMPLE), replace=False)
        self.sample = np.sort(sample) + FIRST_SONG_INDEX
        self.sample_rows = self.rows[torch.from_numpy(self.sample)].contiguous()
        if model.side_pointer:
            model.song_groups()  # built here, before gunicorn forks, rather than in each worker

    def _can_share(self, shared: faiss.IndexIVFFlat) -> bool:
        """Whether ``shared`` can serve this model's first songs, the rest searched flat."""
        added = self.n_songs - shared.ntotal
        return 0 <= added <= shared.nprobe / shared.nlist * shared.ntotal

    def extended(self, model: BERT4Rec, reserve: TableReserve | None = None
                 ) -> ApproximateScorer:
        """The scorer of ``model``, an extension of this one's (same first songs), sharing the
        index and computing the head rows of the added songs only (they grow in ``reserve``
        when given); this scorer is left as it is."""
        added = head_rows(model, first=len(self.rows))
        rows = (torch.cat([self.rows, added]) if reserve is None
                else reserve.append("head_rows", self.rows, added))
        return ApproximateScorer(model, shared=self.index, rows=rows,
                                 known_finite=len(self.rows) if self.finite else 0)

    def memory_bytes(self) -> int:
        """What this scorer holds: the index's vectors, ids and centroids, and the head rows."""
        held = self.rows.numel() * 4 + self.sample_rows.numel() * 4
        if self.index is not None:
            held += self.index.ntotal * (self.index.d * 4 + 8) + self.index.nlist * self.index.d * 4
        if self.added is not None:
            held += self.added.ntotal * self.added.d * 4
        return held

    def _load_or_build(self, checkpoint: Path | None) -> faiss.IndexIVFFlat:
        """The saved index of ``checkpoint`` if it verifies, else a new one (saved there)."""
        vectors = self.rows[FIRST_SONG_INDEX:].numpy()
        digest = checkpoint_sha256(checkpoint) if checkpoint is not None else None
        if checkpoint is not None and digest is not None:
            index = read_index(checkpoint, digest, len(vectors), vectors.shape[1])
            if index is not None:
                return index
        faiss.omp_set_num_threads(torch.get_num_threads())
        started = time.perf_counter()
        index = build_index(vectors)
        self.build_seconds = time.perf_counter() - started
        log.info("built the song index (%d songs, %d lists) in %.1f s", len(vectors),
                 index.nlist, self.build_seconds)
        if checkpoint is not None and digest is not None:
            write_index(index, checkpoint, digest, self.build_seconds)
        return index

    def score(
        self, batch: torch.Tensor, sequences: list[np.ndarray], k: int, exclude_seen: bool
    ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """(song tokens, softmax probabilities) of each batch row's top-k, best first.

        ``batch`` is the model's input (right-aligned, [MASK] last under cloze), ``sequences``
        playlist's song tokens (excluded when ``exclude_seen``). None for a row whose scores
        would not all be finite. The probabilities' normalizer is exact over the re-scored
        songs plus an estimate of the rest from TAIL_SAMPLE fixed songs; the ranking is exact
        over the candidates.
        """
        model = self.model
        encoded = model.encode(batch, last_only=not model.side_pointer)
        predicted = encoded[:, -1]
        x = model.head_input(predicted).float().cpu()
        queries = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        finite = torch.isfinite(queries).all(dim=1)
        pointer = self._pointer_entries(encoded, batch) if model.side_pointer else None
        if pointer is not None:
            finite[pointer[0][~torch.isfinite(pointer[2])]] = False
        if self.index is None:
            return [None] * len(batch)
        count = min(self.n_songs, k + max(len(tokens) for tokens in sequences) + SHORTLIST_MARGIN)
        faiss.omp_set_num_threads(torch.get_num_threads())
        safe = torch.where(finite[:, None], queries, torch.zeros_like(queries))
        padded = torch.cat([safe, torch.zeros(len(safe), 1)], dim=1)
        _, found = self.index.search(padded.numpy(), min(count, self.index.ntotal))
        if self.added is not None and self.added.ntotal:
            _, more = self.added.search(safe.numpy(), min(count, self.added.ntotal))
            found = np.concatenate([found, np.where(more < 0, -1, more + self.index.ntotal)], 1)
        # a positive seen bias can lift a visible song to the top, unless seen songs are
        # excluded (every visible song is one of the playlist's)
        seen_bias = (model.seen_song_bias.detach().float().cpu()
                     if model.seen_bias and not exclude_seen else None)
        sample_scores = safe @ self.sample_rows.T  # one product for the batch, not one a row
        results: list[tuple[np.ndarray, np.ndarray] | None] = []
        for row, tokens in enumerate(sequences):
            if not finite[row]:
                results.append(None)
                continue
            parts = [found[row][found[row] >= 0] + FIRST_SONG_INDEX]
            if pointer is not None:
                mine = slice(*pointer[3][row : row + 2])
                copied, copy_scores = pointer[1][mine].numpy(), pointer[2][mine]
                parts.append(copied)
            if seen_bias is not None:
                visible = np.unique(batch[row][batch[row] >= FIRST_SONG_INDEX].cpu().numpy())
                parts.append(visible)
            candidates = np.unique(np.concatenate(parts))
            seen = np.unique(tokens) if exclude_seen else np.zeros(0, dtype=np.int64)
            # binary searches in these few sorted songs: np.isin's sorting costs several times more
            candidates = candidates[find_ids(seen, candidates) < 0]
            chosen = torch.from_numpy(candidates)
            scores = self.rows[chosen] @ queries[row]
            if pointer is not None:
                where = find_ids(candidates, copied)
                kept = where >= 0
                scores.index_add_(0, torch.from_numpy(where[kept]),
                                  copy_scores[torch.from_numpy(kept)])
            if seen_bias is not None:
                scores += seen_bias * torch.from_numpy(find_ids(visible, candidates) >= 0)
            log_total = self._log_normalizer(scores, sample_scores[row], candidates, seen)
            top = scores.topk(min(k, len(scores)))
            results.append((candidates[top.indices.numpy()],
                            (top.values - log_total).exp().numpy()))
        return results

    def _log_normalizer(
        self, scores: torch.Tensor, sample_scores: torch.Tensor, candidates: np.ndarray,
        seen: np.ndarray,
    ) -> torch.Tensor:
        """log Σ exp(score) over every song not excluded: the candidates exactly, the others
        as the fixed sample's mean times their number; ``candidates`` and ``seen`` are disjoint
        and hold no repeats; ``sample_scores``, the fixed sample's scores for this query, is
        overwritten."""
        rest = self.n_songs - len(candidates) - len(seen)
        excluded = np.concatenate([candidates, seen])
        where = find_ids(self.sample, excluded)
        inside = where[where >= 0]  # no repeats: the two parts are disjoint
        kept = len(self.sample) - len(inside)
        if rest <= 0 or kept == 0:
            return scores.logsumexp(dim=0)
        tail = sample_scores.index_fill_(0, torch.from_numpy(inside), -math.inf)
        estimate = tail.logsumexp(dim=0) + math.log(rest / kept)
        return torch.logaddexp(scores.logsumexp(dim=0), estimate)

    def _pointer_entries(
        self, encoded: torch.Tensor, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The side pointer's (row, song, score) entries of the batch's last positions, sorted
        by row, and where each row's entries start (one more bound at the end)."""
        rows = torch.arange(len(batch), device=batch.device)
        last = torch.full_like(rows, batch.shape[1] - 1)
        entry_rows, songs, values = (part.cpu() for part in
                                     self.model.pointer_entries(encoded, batch, rows, last))
        entry_rows, order = entry_rows.sort(stable=True)
        bounds = torch.searchsorted(entry_rows, torch.arange(len(batch) + 1)).tolist()
        return entry_rows, songs[order], values[order].float(), bounds
