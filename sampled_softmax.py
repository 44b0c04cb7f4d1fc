"""Sampled softmax with logQ correction for the output head: the negative sampler and the loss.

At 116k to 2.26M songs the full softmax dominates a training step. Here every masked position
of a batch is scored against one shared candidate set instead: the batch's distinct targets
(in-batch negatives) plus ``negatives`` songs drawn with replacement from q ∝ (count + 1)^α
(α = 0: uniform). Each candidate's logit is corrected by −log Q, Q = its expected number of
copies among the candidates (1 if it is a batch target, plus ``negatives · q``), so the sum
of the corrected exponentials is an unbiased estimate of the full softmax's normaliser. A
row's positive enters once, uncorrected; its copies among the candidates (accidental hits)
are masked. Sampling everything (α = 0, ``negatives`` ≥ catalog) gives the full loss exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from preprocessing_utils import FIRST_SONG_INDEX

# train.loss = auto samples only on a catalog above this many times ``negatives``. From the
# measured 4.3-5x faster sampled step at 116k songs (BENCHMARKS.md), the rest of a step costs
# about as much as scoring 27k songs, so at 8 x 2,048 = 16k songs sampling would save under
# 1.5x per step, and below that its noisier gradient is not worth the time it saves.
AUTO_SAMPLED_FACTOR = 8


def choose_loss(loss: str, n_songs: int, negatives: int) -> str:
    """The loss a run trains with: ``auto`` is ``sampled`` on catalogs of more than
    AUTO_SAMPLED_FACTOR x ``negatives`` songs, else ``full``; others are kept."""
    if loss != "auto":
        return loss
    return "sampled" if n_songs > AUTO_SAMPLED_FACTOR * negatives else "full"


class NegativeSampler:
    """Draws the shared negatives of a batch from q ∝ (training count + 1)^α over the songs.

    The +1 keeps every song in q's support (songs never seen in training still get pushed
    down). With α = 0 and ``negatives`` at least the catalog, every token is taken exactly
    once, [PAD] and [MASK] included as in the full softmax, so the loss is the full loss.
    Draws use torch's global generator, so checkpoints (which save its state) resume exactly.
    """

    def __init__(self, popularity: torch.Tensor, negatives: int, alpha: float) -> None:
        weights = (popularity.double() + 1.0) ** alpha
        weights[:FIRST_SONG_INDEX] = 0.0
        probabilities = weights / weights.sum()
        n_songs = len(popularity) - FIRST_SONG_INDEX
        self.n_tokens = len(popularity)
        self.uniform = alpha == 0
        self.exhaustive = self.uniform and negatives >= n_songs
        self.negatives = n_songs if self.exhaustive else negatives
        self.cdf = probabilities.cumsum(0)
        self.expected = (probabilities * self.negatives).float()
        if self.exhaustive:  # the full softmax's columns, [PAD] and [MASK] included
            self.expected = torch.ones(self.n_tokens)

    def to(self, device: torch.device) -> NegativeSampler:
        """Move the tables to ``device`` (draws then happen there); returns self."""
        self.cdf = self.cdf.to(device)
        self.expected = self.expected.to(device)
        return self

    def draw(self) -> torch.Tensor:
        """Song indices (negatives,) for one batch; each song has expected count ``expected``."""
        device = self.expected.device
        if self.exhaustive:
            return torch.arange(self.n_tokens, device=device)
        if self.uniform:
            return torch.randint(FIRST_SONG_INDEX, self.n_tokens, (self.negatives,),
                                 device=device)
        uniform = torch.rand(self.negatives, dtype=torch.float64, device=device)
        return torch.searchsorted(self.cdf, uniform).clamp_(FIRST_SONG_INDEX, self.n_tokens - 1)

    def candidates(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared candidates of a batch with targets (M,): ``(songs, log_q, positive)``.

        songs (C,) are the distinct targets, then the drawn negatives; log_q (C,) the log of
        each one's expected count among them; positive (M,) each row's column in songs.
        """
        batch_songs, positive = torch.unique(targets, return_inverse=True)
        songs = torch.cat([batch_songs, self.draw()])
        expected = self.expected[songs] + torch.isin(songs, batch_songs).float()
        return songs, expected.log(), positive


def sampled_cross_entropy(
    logits: torch.Tensor, songs: torch.Tensor, log_q: torch.Tensor, positive: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy of logits (M, C) at candidate ``songs`` (C,).

    Every candidate logit is corrected by −log Q (``log_q``); every column holding the row's
    target (the positive's own column included) is masked, and the positive's logit is put
    back once, uncorrected, as column 0. Computed in float32 (logits may come from autocast).
    """
    logits = logits.float()
    positive_logit = logits.gather(1, positive[:, None])
    corrected = (logits - log_q[None, :]).masked_fill(songs[None, :] == targets[:, None],
                                                      float("-inf"))
    scores = torch.cat([positive_logit, corrected], dim=1)
    return F.cross_entropy(scores, torch.zeros_like(targets))


class SparseRows(torch.autograd.Function):
    """``weight[index]`` whose gradient is sparse: only the gathered rows, not a dense copy.

    For the song embedding's candidate rows: the input lookup already gives that table a dense
    gradient, which this one is added into, so at 2.26M songs the step holds one dense
    (songs x width) gradient instead of two.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` of ``weight``."""
        ctx.save_for_backward(index)
        ctx.shape = weight.shape
        return weight[index]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """A sparse COO gradient holding one row per gathered index."""
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index[None], grad, ctx.shape,
                                       check_invariants=False), None
