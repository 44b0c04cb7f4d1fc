"""The fused, chunked full-softmax cross-entropy of the output head, for the CPU.

Split out of model.py so that the network module holds the network; the sampled loss is its
sibling, sampled_softmax.py.
"""

from __future__ import annotations

from typing import Any

import torch

# logits per block of the fused loss (1 MB of float32, so a block stays in a core's L2 cache)
BLOCK_LOGITS = 1 << 18


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T + bias`` against ``targets``, fused for the CPU.

    Same value and gradients as ``F.cross_entropy`` on the logits, but the (rows x 116k)
    logits never exist whole: the forward pass keeps a running log-sum-exp per row over
    chunks of ``chunk`` songs (by default about ``BLOCK_LOGITS`` logits per chunk), and the
    backward pass recomputes each chunk's logits and turns them into the softmax gradient
    while the chunk is still in cache. One extra matrix product buys the removal of every
    pass over a tensor that fits no cache, which on a CPU costs more than the arithmetic.
    ``seen_value`` (a scalar) is added to the logits at ``seen_keys``, the sorted unique
    ``song * rows + row`` of each row's songs already in its input (``seen_keys`` in model.py),
    without any (rows x songs) tensor. Single backward only.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        targets: torch.Tensor, extra: torch.Tensor | None = None, chunk: int | None = None,
        seen_value: torch.Tensor | None = None, seen_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss from the chunked log-sum-exp and the target logits (plus ``extra`` logits)."""
        chunk = chunk or max(256, BLOCK_LOGITS // max(1, len(targets)))
        seen = _SeenEntries(seen_value, seen_keys, len(targets), len(weight), chunk)
        log_total = torch.full((len(targets),), float("-inf"), dtype=x.dtype, device=x.device)
        for start in range(0, len(weight), chunk):
            logits = _chunk_logits(x, weight, bias, extra, start, chunk)
            seen.add_to(logits, start)
            log_total = torch.logaddexp(log_total, logits.logsumexp(dim=1))
        target_logit = torch.einsum("md,md->m", x, weight[targets]) + bias[targets]
        if extra is not None:
            target_logit = target_logit + extra.gather(1, targets[:, None]).squeeze(1)
        target_logit = target_logit + seen.at_targets(targets)
        ctx.chunk = chunk
        ctx.seen = seen
        ctx.save_for_backward(x, weight, bias, extra, log_total, targets)
        return (log_total - target_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients from softmax minus one-hot, scaled by grad / n, one chunk at a time."""
        x, weight, bias, extra, log_total, targets = ctx.saved_tensors
        scale = grad / len(targets)
        grad_x = torch.zeros_like(x)
        grad_weight = torch.empty_like(weight)
        grad_bias = torch.empty_like(bias)
        needs_extra = extra is not None and ctx.needs_input_grad[4]
        grad_extra = torch.empty_like(extra) if needs_extra else None
        rows = torch.arange(len(targets), device=targets.device)
        seen = ctx.seen
        grad_seen = None if seen.value is None else torch.zeros((), device=x.device)
        for start in range(0, len(weight), ctx.chunk):
            logits = _chunk_logits(x, weight, bias, extra, start, ctx.chunk)
            seen.add_to(logits, start)
            probabilities = logits.sub_(log_total[:, None]).exp_()
            hit = (targets >= start) & (targets < start + ctx.chunk)
            probabilities[rows[hit], targets[hit] - start] -= 1.0
            probabilities.mul_(scale)
            stop = start + len(probabilities[0])
            grad_x.addmm_(probabilities, weight[start:stop])
            torch.mm(probabilities.T, x, out=grad_weight[start:stop])
            torch.sum(probabilities, dim=0, out=grad_bias[start:stop])
            if grad_extra is not None:
                grad_extra[:, start:stop] = probabilities
            if grad_seen is not None:
                grad_seen += seen.sum_in(probabilities, start)
        return grad_x, grad_weight, grad_bias, None, grad_extra, None, grad_seen, None


def split_seen_keys(keys: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, songs) of ``song * n_rows + row`` keys, the seen-song format of model.py."""
    return keys % n_rows, keys // n_rows


class _SeenEntries:
    """The (row, song) entries that get ``value`` added, found chunk by chunk by song range."""

    def __init__(
        self, value: torch.Tensor | None, keys: torch.Tensor | None, n_rows: int, n_songs: int,
        chunk: int,
    ) -> None:
        self.value = value
        self.chunk = chunk
        if value is None or keys is None:
            self.value = None
            return
        self.keys = keys
        self.rows, self.songs = split_seen_keys(keys, n_rows)
        self.n_rows = n_rows
        starts = torch.arange(0, n_songs, chunk, device=keys.device)
        self.bounds = [*torch.searchsorted(self.songs, starts).tolist(), len(keys)]

    def _in_chunk(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and chunk columns of the entries with songs in ``start .. start + chunk``."""
        index = start // self.chunk
        low, high = self.bounds[index], self.bounds[index + 1]
        return self.rows[low:high], self.songs[low:high] - start

    def add_to(self, logits: torch.Tensor, start: int) -> None:
        """Add the value to the chunk's logits (rows x chunk) at its entries, in place."""
        if self.value is not None:
            rows, columns = self._in_chunk(start)
            logits[rows, columns] += self.value.to(logits.dtype)

    def sum_in(self, gradient: torch.Tensor, start: int) -> torch.Tensor:
        """The chunk's logit gradient summed over its entries: the value's gradient share."""
        rows, columns = self._in_chunk(start)
        return gradient[rows, columns].sum()

    def at_targets(self, targets: torch.Tensor) -> torch.Tensor | float:
        """The value where a row's target is one of its seen songs, else 0."""
        if self.value is None:
            return 0.0
        rows = torch.arange(len(targets), device=targets.device)
        return self.value * torch.isin(targets * self.n_rows + rows, self.keys)


def _chunk_logits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, extra: torch.Tensor | None,
    start: int, chunk: int,
) -> torch.Tensor:
    """Logits of songs ``start .. start + chunk`` (rows x chunk), plus ``extra`` if given."""
    stop = start + chunk
    logits = torch.addmm(bias[start:stop], x, weight[start:stop].T)
    if extra is not None:
        logits.add_(extra[:, start:stop])
    return logits
