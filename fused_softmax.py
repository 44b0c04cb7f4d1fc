"""The fused, chunked full-softmax cross-entropy of the output head, for the CPU.

Split out of model.py so that the network module holds the network; the sampled loss is its
sibling, sampled_softmax.py.
"""

from __future__ import annotations

from typing import Any

import torch

# logits per block of the fused loss (1 MB of float32, so a block stays in a core's L2 cache)
BLOCK_LOGITS = 1 << 18
# up to this many logits in all (64 MB of float32) the forward pass keeps its blocks for the
# backward pass instead of recomputing them: the demo's 600 x 12k of a step
KEPT_LOGITS = 1 << 24


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T + bias`` (plus sparse entries) against ``targets``,
    fused for the CPU; call it through ``linear_cross_entropy``.

    Same value and gradients as ``F.cross_entropy`` on the logits, but the (rows x 116k)
    logits never exist whole: the forward pass keeps a running log-sum-exp per row over
    chunks of ``chunk`` songs (by default about ``BLOCK_LOGITS`` logits per chunk), and the
    backward pass recomputes each chunk's logits and turns them into the softmax gradient
    while the chunk is still in cache. One extra matrix product buys the removal of every
    pass over a tensor that fits no cache, which on a CPU costs more than the arithmetic.
    Logits of up to ``KEPT_LOGITS`` in all are kept from the forward pass instead.
    The entries ``values[i]`` are added to the logit of song ``songs[i]`` in row ``rows[i]``
    (a pair may repeat; its values add up): the side pointer's copy scores and the seen bias,
    without any (rows x songs) tensor. Single backward only.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        targets: torch.Tensor, chunk: int, rows: torch.Tensor, songs: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        """Loss from the chunked log-sum-exp and the target logits (plus their entries)."""
        entries = _ChunkedEntries(rows, songs, values.to(x.dtype), len(weight), chunk)
        log_total = torch.full((len(targets),), float("-inf"), dtype=x.dtype, device=x.device)
        keep = len(targets) * len(weight) <= KEPT_LOGITS
        kept = []
        for start in range(0, len(weight), chunk):
            logits = _chunk_logits(x, weight, bias, entries, start, chunk)
            log_total = torch.logaddexp(log_total, logits.logsumexp(dim=1))
            if keep:
                kept.append(logits)
        target_logit = torch.einsum("md,md->m", x, weight[targets]) + bias[targets]
        target_logit = target_logit + entries.at_targets(targets)
        ctx.chunk = chunk
        ctx.entries = entries
        ctx.kept = kept
        ctx.save_for_backward(x, weight, bias, log_total, targets)
        return (log_total - target_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients from softmax minus one-hot, scaled by grad / n, one chunk at a time."""
        x, weight, bias, log_total, targets = ctx.saved_tensors
        scale = grad / len(targets)
        grad_x = torch.zeros_like(x)
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.empty_like(bias)
        rows = torch.arange(len(targets), device=targets.device)
        entries = ctx.entries
        for block, start in enumerate(range(0, len(weight), ctx.chunk)):
            logits = (ctx.kept[block] if ctx.kept
                      else _chunk_logits(x, weight, bias, entries, start, ctx.chunk))
            probabilities = logits.sub_(log_total[:, None]).exp_()
            hit = (targets >= start) & (targets < start + ctx.chunk)
            probabilities[rows[hit], targets[hit] - start] -= 1.0
            probabilities.mul_(scale)
            stop = start + len(probabilities[0])
            grad_x.addmm_(probabilities, weight[start:stop])
            torch.mm(probabilities.T, x, out=grad_weight[start:stop])
            torch.sum(probabilities, dim=0, out=grad_bias[start:stop])
            entries.take_gradient(probabilities, start)
        grad_values = entries.gradient() if ctx.needs_input_grad[7] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, grad_values


def _chunk_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, entries: _ChunkedEntries,
    start: int, chunk: int,
) -> torch.Tensor:
    """Logits of songs ``start .. start + chunk`` (rows x chunk), with their entries added."""
    logits = torch.addmm(bias[start : start + chunk], x, weight[start : start + chunk].T)
    entries.add_to(logits, start)
    return logits


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The fused loss of ``LinearCrossEntropy``; ``entries`` (rows, songs, values) or none."""
    chunk = chunk or max(256, BLOCK_LOGITS // max(1, len(targets)))
    if entries is None:
        none = torch.zeros(0, dtype=torch.long, device=x.device)
        entries = none, none, torch.zeros(0, dtype=x.dtype, device=x.device)
    return LinearCrossEntropy.apply(x, weight, bias, targets, chunk, *entries)


def split_seen_keys(keys: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, songs) of ``song * n_rows + row`` keys, the seen-song format of model.py."""
    return keys % n_rows, keys // n_rows


class _ChunkedEntries:
    """Logit entries sorted by song, so that each chunk of songs finds its own by bounds."""

    def __init__(
        self, rows: torch.Tensor, songs: torch.Tensor, values: torch.Tensor, n_songs: int,
        chunk: int,
    ) -> None:
        self.chunk = chunk
        songs, self.order = songs.sort()
        self.rows, self.songs, self.values = rows[self.order], songs, values[self.order]
        starts = torch.arange(0, n_songs, chunk, device=songs.device)
        self.bounds = [*torch.searchsorted(songs, starts).tolist(), len(songs)]
        self.sorted_gradient = torch.zeros_like(self.values)

    def _span(self, start: int) -> tuple[int, int]:
        """Where the entries of songs ``start .. start + chunk`` lie in the sorted order."""
        index = start // self.chunk
        return self.bounds[index], self.bounds[index + 1]

    def add_to(self, logits: torch.Tensor, start: int) -> None:
        """Add the chunk's entries to its logits (rows x chunk), in place."""
        low, high = self._span(start)
        if high > low:
            logits.index_put_((self.rows[low:high], self.songs[low:high] - start),
                              self.values[low:high], accumulate=True)

    def take_gradient(self, gradient: torch.Tensor, start: int) -> None:
        """Keep the chunk's logit gradient at its entries: each entry's value gets it whole."""
        low, high = self._span(start)
        if high > low:
            self.sorted_gradient[low:high] = gradient[self.rows[low:high],
                                                      self.songs[low:high] - start]

    def gradient(self) -> torch.Tensor:
        """The values' gradient, in the order the entries were given."""
        return torch.empty_like(self.sorted_gradient).index_copy_(0, self.order,
                                                                 self.sorted_gradient)

    def at_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Per row, the sum of its entries at its target song."""
        hit = self.songs == targets[self.rows]
        total = torch.zeros(len(targets), dtype=self.values.dtype, device=targets.device)
        return total.index_add(0, self.rows[hit], self.values[hit])
