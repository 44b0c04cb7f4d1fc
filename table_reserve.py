"""Tables with spare rows, so that a catalog extension appends its rows in place.

Without it a catalog refresh in a gunicorn worker copies every per-song, per-album and
per-artist table into a new, bigger one (about 1.6 GB at 2.26M songs), and the worker stops
sharing the pages it had from the master. Here each table lives in a buffer with spare rows
that nothing has touched, so they take no memory: an extension writes only its new rows, and
copy-on-write copies only the pages those rows are on.

One ``TableReserve`` serves one chain of extensions (cold_start.py). Only the newest model of
the chain grows in place, the one whose tables end where the buffer's used rows end; extending
any other (an older model still served, a second extension of the same model) copies into a new
buffer, so the rows a live model reads are never written. Nothing saved may hold a view of a
buffer: ``torch.save`` would write the spare rows too (extend_checkpoint uses no reserve).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

# spare rows given to a buffer when it is allocated, as a share of its rows and at least
HEADROOM = 0.25
MIN_HEADROOM_ROWS = 65_536


class TableReserve:
    """Buffers with spare rows for the tables of one chain of extensions, by name."""

    def __init__(self) -> None:
        """No buffer yet: each is allocated by the first ``append`` of its name."""
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def append(self, name: str, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``table`` with ``rows`` appended, as the first rows of buffer ``name``: written in
        place when ``table`` is that buffer's used rows and its spare rows suffice, else copied
        into a new buffer with headroom. ``table`` itself never changes."""
        size = len(table) + len(rows)
        with self._lock:
            buffer = self._buffers.get(name)
            if buffer is None or not self._grows_in_place(name, buffer, table, size):
                spare = max(int(size * HEADROOM), MIN_HEADROOM_ROWS)
                buffer = torch.empty((size + spare, *table.shape[1:]), dtype=table.dtype)
                buffer[:len(table)] = table
                self._buffers[name] = buffer
            buffer[len(table):size] = rows
            self._used[name] = size
            return buffer[:size]

    def append_array(self, name: str, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``append`` for numpy arrays (the encoders' tables); the result shares the buffer."""
        return self.append(name, torch.from_numpy(table),
                           torch.from_numpy(np.asarray(rows, dtype=table.dtype))).numpy()

    def _grows_in_place(self, name: str, buffer: torch.Tensor, table: torch.Tensor,
                        size: int) -> bool:
        """Whether ``table`` is buffer ``name``'s used rows and ``size`` rows fit in it."""
        return (self._used[name] == len(table) and size <= len(buffer)
                and table.dtype == buffer.dtype and table.shape[1:] == buffer.shape[1:]
                and table.is_contiguous() and table.data_ptr() == buffer.data_ptr())
