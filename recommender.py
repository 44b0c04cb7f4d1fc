"""Serving: catalog song ids in, top-k catalog song ids out, from a checkpoint.

The one inference path of ``train.py --recommend``, the notebook and the service. It imports
nothing from training (``train``, the optimizer, TensorBoard), so a service process loads only
the network, the encoders and this file. ``index``: ``exact`` scores every song; ``approximate``
retrieves a shortlist from a faiss index and re-scores it exactly (retrieval.py); ``auto`` picks
by catalog size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_model
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX, Encoders
from retrieval import ApproximateScorer, resolve_index_mode
from table_reserve import TableReserve

# columns per block of ``top_k``'s shortlist
TOP_K_BLOCK = 128


class NonFiniteScores(RuntimeError):
    """The model scored some playlists with NaN or infinity: there is no right answer to give.

    ``playlists`` holds their positions in the ``recommend`` call. Raised instead of returning
    an empty or arbitrary top-k, so a caller fails the request with this reason.
    """

    def __init__(self, model_version: str, playlists: list[int], total: int) -> None:
        self.playlists = playlists
        super().__init__(
            f"model {model_version} gave NaN or infinite scores for {len(playlists)} of {total} "
            f"playlists (positions {playlists[:10]}): its output cannot be served"
        )


@dataclass
class Recommendation:
    """Top-k catalog song ids with their probabilities, and the input ids the model lacks."""

    song_ids: list[int]
    scores: list[float]
    unknown_song_ids: list[int]


def top_k(
    scores: torch.Tensor, k: int, block: int = TOP_K_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=1)`` as (values, indices), several times faster for a small k.

    The k best of a row lie in the k blocks of ``block`` columns with the highest maxima (a
    block outside them has k others whose maxima are at least its own, so k better scores),
    so the sort runs over k * block candidates instead of all 116k songs. Rows so short that
    the candidates would be over a quarter of them are sorted whole.
    """
    rows, width = scores.shape
    whole = width // block * block
    if k * block * 4 > whole:
        top = scores.topk(k, dim=1)
        return top.values, top.indices
    best = scores[:, :whole].view(rows, -1, block).amax(dim=2).topk(k, dim=1).indices
    within = torch.arange(block, device=scores.device)
    columns = torch.cat([(best[:, :, None] * block + within).reshape(rows, k * block),
                         torch.arange(whole, width, device=scores.device).expand(rows, -1)], dim=1)
    values, picked = scores.gather(1, columns).topk(k, dim=1)
    return values, columns.gather(1, picked)


class Recommender:
    """Catalog song ids in, top-k catalog song ids out; used by the CLI, notebook and service."""

    def __init__(
        self, model: BERT4Rec, encoders: Encoders, popularity: torch.Tensor, model_version: str,
        device: str | torch.device = "cpu", batch_size: int = 256, index: str = "auto",
        checkpoint: Path | None = None, approximate: ApproximateScorer | None = None,
        exclude_seen: bool = True, reserve: TableReserve | None = None,
    ) -> None:
        """``index``: exact, approximate or auto (see retrieval.py); ``checkpoint``: the file
        the model came from, beside which the approximate index is saved and checked;
        ``approximate``: a ready scorer of this model (a catalog extension's, cold_start.py);
        ``exclude_seen``: the default of ``recommend`` (a checkpoint's decision); ``reserve``:
        where the model's tables grow when the catalog extends it (cold_start.py)."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.index_mode = resolve_index_mode(index, encoders.n_songs)
        self.approximate: ApproximateScorer | None = None
        self.scoring_matrix: torch.Tensor | None = None
        if self.index_mode == "approximate":
            if self.device.type != "cpu":
                raise ValueError("the approximate index serves on the CPU only")
            self.approximate = approximate or ApproximateScorer(self.model, checkpoint)
        else:
            self.scoring_matrix = self.model.scoring_matrix()
        self.encoders = encoders
        self.popularity = popularity.double().clone()
        self.popularity[:FIRST_SONG_INDEX] = -1.0
        self.model_version = model_version
        self.batch_size = batch_size
        self.exclude_seen = exclude_seen
        self.reserve = reserve

    @property
    def n_songs(self) -> int:
        """Number of songs the model can recommend."""
        return self.encoders.n_songs

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", index: str = "auto"
    ) -> Recommender:
        """Load a checkpoint written by train.py (weights_only; the encoders come with it).

        With an approximate ``index``, its file beside the checkpoint is used if it carries
        this checkpoint's hash, else built and saved there.
        """
        loaded = load_model(path, device=device)
        return cls(loaded.model, loaded.encoders, loaded.popularity, loaded.model_version, device,
                   index=index, checkpoint=Path(path), exclude_seen=loaded.exclude_seen)

    def recommend(
        self, playlists: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool | None = None
    ) -> list[Recommendation]:
        """Top-k songs to follow each playlist (catalog ids, best first, softmax scores);
        ``exclude_seen`` None: the checkpoint's decision (``self.exclude_seen``).

        NonFiniteScores when the model's score of any song for any playlist is NaN or infinite.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        exclude = self.exclude_seen if exclude_seen is None else exclude_seen
        encoded, unknown = [], []
        for playlist in playlists:
            ids = np.asarray(list(playlist), dtype=np.int64)
            tokens = self.encoders.encode_songs(ids) if len(ids) else ids
            encoded.append(tokens[tokens >= FIRST_SONG_INDEX])
            unknown.append([int(song) for song in ids[tokens < FIRST_SONG_INDEX]])
        results: dict[int, Recommendation] = {}
        known = [index for index, tokens in enumerate(encoded) if len(tokens)]
        for index in range(len(encoded)):
            if not len(encoded[index]):
                results[index] = self._most_popular(k, unknown[index])
        non_finite: list[int] = []
        with torch.inference_mode():
            for start in range(0, len(known), self.batch_size):
                chunk = known[start : start + self.batch_size]
                for index, result in zip(chunk, self._score([encoded[i] for i in chunk], k,
                                                            exclude), strict=True):
                    if result is None:
                        non_finite.append(index)
                    else:
                        results[index] = Recommendation(*result, unknown[index])
        if non_finite:
            raise NonFiniteScores(self.model_version, non_finite, len(encoded))
        return [results[index] for index in range(len(encoded))]

    def _score(
        self, sequences: list[np.ndarray], k: int, exclude_seen: bool
    ) -> Iterator[tuple[list[int], list[float]] | None]:
        """Model top-k for non-empty token sequences, as (catalog ids, scores).

        None for a sequence whose scores are not all finite (NaN or inf for some song); the
        -inf of [PAD], [MASK] and of excluded songs is set here, not the model's.
        """
        seq_len, masked = self.model.seq_len, not self.model.causal
        width = min(max(len(tokens) for tokens in sequences), seq_len - masked) + masked
        batch = torch.full((len(sequences), width), PAD_INDEX, dtype=torch.long)
        if masked:
            batch[:, -1] = MASK_INDEX
        for row, tokens in enumerate(sequences):
            window = tokens[-(width - masked) :]
            batch[row, width - masked - len(window) : width - masked] = torch.from_numpy(window)
        if self.approximate is not None:
            for found in self.approximate.score(batch, sequences, k, exclude_seen):
                yield None if found is None else (
                    self.encoders.decode_songs(found[0]).tolist(), found[1].tolist())
            return
        scores = self.model.predict_last(batch.to(self.device), self.scoring_matrix)
        # a NaN or infinity anywhere makes the row's sum non-finite; one pass, 17 us for 116k
        # songs where isfinite().all() takes 300 us (finite logits would have to be ~1e33 for
        # the float32 sum itself to overflow)
        finite_rows = torch.isfinite(scores[:, FIRST_SONG_INDEX:].sum(dim=1)).cpu().numpy()
        if exclude_seen:
            for row, tokens in enumerate(sequences):
                scores[row].index_fill_(0, torch.from_numpy(tokens).to(self.device), float("-inf"))
        values, indices = top_k(scores, min(k, self.n_songs))
        probabilities = torch.softmax(scores, dim=1).gather(1, indices).cpu().numpy()
        finite = torch.isfinite(values).cpu().numpy()
        top_indices = indices.cpu().numpy()
        for row, keep in enumerate(finite):
            if not finite_rows[row]:
                yield None
                continue
            songs = self.encoders.decode_songs(top_indices[row][keep])
            yield songs.tolist(), probabilities[row][keep].tolist()

    def _most_popular(self, k: int, unknown: list[int]) -> Recommendation:
        """The fallback for a playlist with no known song: the most frequent songs."""
        top = self.popularity.topk(min(k, self.n_songs))
        total = float(self.popularity.clamp(min=0).sum()) or 1.0
        ids = self.encoders.decode_songs(top.indices.numpy()).tolist()
        return Recommendation(ids, (top.values.clamp(min=0) / total).tolist(), unknown)
