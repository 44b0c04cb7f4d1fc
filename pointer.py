"""The side pointer's copy scores as sparse (row, song, value) entries.

A predicted position attends over the visible songs of its sequence; its copy score of a song
is the attention summed over the visible songs of that song's artist and over those of its
album (each times a gate), plus a second attention summed over the visible songs whose album
successor it is. Only the songs of the visible artists and albums and the successors score
anything: a few hundred songs per position, however large the catalog. So the scores are built
as entries, never as a (positions x catalog) tensor: the full-softmax loss adds them chunk by
chunk (fused_softmax.py), inference scatters them into its one row per playlist, and the
approximate scorer re-scores exactly the songs they name (retrieval.py).
"""

from __future__ import annotations

import torch

# (rows, songs, values): the score ``values[i]`` belongs to song ``songs[i]`` of row ``rows[i]``;
# a (row, song) pair may appear more than once, and its score is the sum
Entries = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SongGroups:
    """The songs of each album or artist: a CSR index over a song -> group table.

    Group 0 (no album or artist, and the [PAD] and [MASK] rows) has no songs.
    """

    def __init__(self, song_group: torch.Tensor) -> None:
        self.n_groups = int(song_group.max()) + 1 if len(song_group) else 1
        self.order = torch.argsort(song_group, stable=True)
        bounds = torch.arange(self.n_groups + 1, device=song_group.device)
        self.starts = torch.searchsorted(song_group[self.order], bounds)

    def expand(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(songs, owner): every song of each of ``groups`` (K,); ``owner[i]`` is the position in
        ``groups`` of the group of ``songs[i]``."""
        low = self.starts[groups]
        counts = torch.where(groups == 0, 0, self.starts[groups + 1] - low)
        positions = torch.arange(len(groups), device=groups.device)
        owner = torch.repeat_interleave(positions, counts)
        offset = torch.arange(len(owner), device=groups.device) - (counts.cumsum(0) - counts)[owner]
        return self.order[low[owner] + offset], owner

    def songs(self, groups: torch.Tensor) -> torch.Tensor:
        """The song tokens of ``groups``, group by group."""
        return self.expand(groups)[0]


def group_entries(
    groups: SongGroups, group_of: torch.Tensor, attention: torch.Tensor, visible: torch.Tensor,
    gate: torch.Tensor,
) -> Entries:
    """Entries of one group channel: each row's attention summed per group, given to every
    song of the group, times the row's gate.

    ``group_of`` (M, L): the group of each input song; ``attention``, ``visible`` (M, L);
    ``gate`` (M,).
    """
    row, column = (visible & (group_of != 0)).nonzero(as_tuple=True)
    pairs, inverse = torch.unique(row * groups.n_groups + group_of[row, column],
                                  return_inverse=True)
    share = attention.new_zeros(len(pairs)).index_add(0, inverse, attention[row, column])
    pair_row = pairs // groups.n_groups
    songs, owner = groups.expand(pairs % groups.n_groups)
    return pair_row[owner], songs, (gate[pair_row] * share)[owner]


def successor_entries(
    successor_of: torch.Tensor, attention: torch.Tensor, visible: torch.Tensor, gate: torch.Tensor
) -> Entries:
    """Entries of the successor channel: each visible song's attention goes to its album
    successor (``successor_of`` (M, L), 0 for none), times the row's gate."""
    row, column = (visible & (successor_of != 0)).nonzero(as_tuple=True)
    return row, successor_of[row, column], gate[row] * attention[row, column]


def join(parts: list[Entries]) -> Entries:
    """One set of entries holding all of ``parts``."""
    rows, songs, values = zip(*parts, strict=True)
    return torch.cat(rows), torch.cat(songs), torch.cat(values)


def sums_at(
    groups: torch.Tensor, weights: torch.Tensor, queries: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """Per row m, the sum of ``weights[m, l]`` over l with ``groups[m, l] == queries[c]``.

    groups, weights (M, L); queries (C,); result (M, C). Group 0 (none) sums to 0. Built from
    the row's distinct (row, group) keys and a binary search, so no (M, n_groups) tensor. The
    sampled loss's pointer scores at its candidates.
    """
    row = torch.arange(len(groups), device=groups.device)[:, None]
    keys, inverse = torch.unique((row * n_groups + groups).flatten(), return_inverse=True)
    sums = torch.zeros(len(keys), dtype=weights.dtype, device=weights.device)
    sums = sums.index_add(0, inverse, (weights * (groups != 0)).flatten())
    wanted = row * n_groups + queries[None, :]
    where = torch.searchsorted(keys, wanted).clamp_(max=len(keys) - 1)
    return torch.where(keys[where] == wanted, sums[where], 0.0)
