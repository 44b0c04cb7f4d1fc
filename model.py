"""BERT4Rec with side information: the network only.

Every position is a song token index. The model looks up the song's album, artist and numeric
features itself, from tables registered as buffers, so callers pass song indices only. The
[PAD] (0) and [MASK] (1) rows of those tables are zero: a masked position cannot reveal its
album, artist or features.

Positions are aligned to the right: the last column of the input is always position
``seq_len - 1``, so a shorter input (fewer columns) or extra left padding does not change the
result. Callers put the playlist's latest songs at the end, with [MASK] last when predicting
under the cloze objective; under the causal one (SASRec's: each position attends to itself and
earlier positions and predicts the next song) the last song's own position is read.

Output head: with ``tie_head`` the hidden state is projected to the song embedding's width
(``d_song`` with side features, ``d_model`` without) and scored against one vector per song:
its song embedding plus, with side features, linear maps of its album and artist embeddings
and of its numeric features (computed per album, per artist and per song, then gathered). So
the head shares the input embeddings, a rarely seen song is scored through its album, artist
and sound, and the inference matrix-vector product is only ``d_song`` wide. Without
``tie_head`` the head is a separate ``Linear(d_model, n_song_tokens)``.

Song-id dropout (``song_dropout`` > 0, training only): a position's song embedding is replaced
by the learned ``unknown_song`` row with that probability, and in the tied head, per step, each
song's embedding part and bias by ``unknown_song`` and ``unknown_bias``; the album, artist and
feature parts then learn to score a song alone, as they must for a song added after training
(cold_start.py gives it exactly those rows).

Seen bias (``seen_bias``): one learned scalar added to the score of every song the predicted
position can see in its input (under cloze the window's songs, under causal the songs up to its
own position), in every loss and at inference. A cloze model otherwise ranks the songs around
[MASK] high because they resemble the target; where songs never repeat the scalar learns to
push them down, and where they do, to pull them up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import ModelConfig
from fused_softmax import linear_cross_entropy, split_seen_keys
from pointer import Entries, SongGroups, group_entries, join, successor_entries, sums_at
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX
from sampled_softmax import NegativeSampler, SparseRows, sampled_cross_entropy


class SelfAttention(nn.Module):
    """Multi-head self-attention that never attends to padding."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, attend: torch.Tensor | None, last_only: bool = False
    ) -> torch.Tensor:
        """Attend from every position (or only the last) to the non-padding positions.

        ``attend`` is (B, 1, 1, L) or, causal, (B, 1, L, L), True where a position may be
        attended, or None when no input has padding; the result is (B, L, d_model), or
        (B, 1, d_model) with ``last_only``, which inference uses since only the predicted
        position is read.
        """
        batch, width = x.shape[0], x.shape[2]
        q, k, v = self.qkv(x).split(width, dim=2)
        if last_only:
            q = q[:, -1:]
            attend = attend if attend is None else attend[:, :, -1:]
        head_width = width // self.n_heads
        q, k, v = (t.reshape(batch, -1, self.n_heads, head_width).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, q.shape[2], width))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: attention and feed-forward, each with a residual."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attend: torch.Tensor | None, last_only: bool = False
    ) -> torch.Tensor:
        """Apply the block to (B, L, d_model) hidden states; only the last one if ``last_only``."""
        attended = self.attention(self.attention_norm(x), attend, last_only)
        if last_only:
            x = x[:, -1:]
        x = x + self.dropout(attended)
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


def dense_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
    entries: Entries | None,
) -> torch.Tensor:
    """The loss of ``linear_cross_entropy`` from whole logits, for the GPU: there the
    (rows x catalog) logits fit, and one large matrix product beats a loop over chunks."""
    logits = F.linear(x, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast: fp32
    if entries is not None:
        rows, songs, values = entries
        logits = logits.index_put((rows, songs), values.to(logits.dtype), accumulate=True)
    return F.cross_entropy(logits, targets)


def causal_mask(padding: torch.Tensor) -> torch.Tensor:
    """Attention mask (B, 1, L, L): query i sees non-padding keys j <= i, and always itself.

    Seeing itself keeps a padding query from having no key at all (NaN in the softmax); a real
    position's own key is real, so it changes nothing there.
    """
    length = padding.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=padding.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=padding.device)
    return (earlier & ~padding[:, None, None, :]) | itself


def sinusoidal_table(length: int, width: int) -> torch.Tensor:
    """The fixed sine/cosine position table of "Attention is all you need", (length, width)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class BERT4Rec(nn.Module):
    """Transformer over playlists, bidirectional (cloze) or causal; inputs: song indices (B, L)."""

    # buffers (register_buffer declares no attribute); the song tables exist with side features
    song_album: torch.Tensor
    song_artist: torch.Tensor
    song_features: torch.Tensor
    song_successor: torch.Tensor
    position_embedding: torch.Tensor
    feature_projection: nn.Linear | None
    features_to_song: nn.Linear | None

    def __init__(
        self,
        model_config: ModelConfig,
        n_song_tokens: int,
        n_album_tokens: int,
        n_artist_tokens: int,
        n_features: int,
        seq_len: int,
        tables_on: str | torch.device | None = None,
    ) -> None:
        """``tables_on="meta"`` creates the catalog-sized tables (embeddings, head bias, per-song
        tables) without memory or initialisation, for a caller that assigns every one of them
        (cold_start.extend_model: 900 MB and 2.5 s at 2.26M songs otherwise)."""
        super().__init__()
        config = model_config
        d_model = config.d_model
        self.config = config
        self.seq_len = seq_len
        self.causal = config.objective == "causal"
        self.n_song_tokens = n_song_tokens
        self.n_album_tokens = n_album_tokens
        self.n_artist_tokens = n_artist_tokens
        self.use_side = config.side_features and (
            n_features > 0 or n_album_tokens > 1 or n_artist_tokens > 1
        )
        song_width = config.d_song if self.use_side else d_model
        on = tables_on
        self.song_embedding = nn.Embedding(n_song_tokens, song_width, padding_idx=PAD_INDEX,
                                           device=on)
        if self.use_side:
            self.album_embedding = nn.Embedding(n_album_tokens, config.d_album, padding_idx=0,
                                                device=on)
            self.artist_embedding = nn.Embedding(n_artist_tokens, config.d_artist, padding_idx=0,
                                                 device=on)
            self.feature_projection = nn.Linear(n_features, d_model) if n_features else None
            self.register_buffer("song_album", torch.zeros(n_song_tokens, dtype=torch.long,
                                                           device=on))
            self.register_buffer("song_artist", torch.zeros(n_song_tokens, dtype=torch.long,
                                                            device=on))
            self.register_buffer("song_features", torch.zeros(n_song_tokens, n_features,
                                                              device=on))
        self.input_norm = nn.LayerNorm(d_model)
        if config.positional == "learned":
            self.position_embedding = nn.Parameter(sinusoidal_table(seq_len, d_model))
        else:
            self.register_buffer("position_embedding", sinusoidal_table(seq_len, d_model))
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, config.n_heads, config.d_ff, config.dropout)
            for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)
        self.tie_head = config.tie_head
        if self.tie_head:
            self.head_transform = nn.Sequential(
                nn.Linear(d_model, song_width), nn.GELU(), nn.LayerNorm(song_width)
            )
            self.head_bias = nn.Parameter(torch.zeros(n_song_tokens, device=on))
            if self.use_side:
                self.album_to_song = nn.Linear(config.d_album, song_width, bias=False)
                self.artist_to_song = nn.Linear(config.d_artist, song_width, bias=False)
                self.features_to_song = (
                    nn.Linear(n_features, song_width, bias=False) if n_features else None
                )
        else:
            self.head = nn.Linear(d_model, n_song_tokens, device=on)
        self.side_pointer = config.side_pointer and self.use_side
        if self.side_pointer:
            self.pointer_query = nn.Linear(d_model, d_model)
            self.pointer_key = nn.Linear(d_model, d_model)
            self.successor_query = nn.Linear(d_model, d_model)
            self.pointer_gate = nn.Linear(d_model, 3)
            self.register_buffer("song_successor", torch.zeros(n_song_tokens, dtype=torch.long,
                                                               device=on))
        # without side parts nothing can stand in for a dropped song: dropout would only hurt;
        # registered last, so the parameters of a network without them keep their order
        self.song_dropout = config.song_dropout if self.use_side else 0.0
        if self.song_dropout > 0:
            self.unknown_song = nn.Parameter(torch.zeros(song_width))
            if config.tie_head:
                self.unknown_bias = nn.Parameter(torch.zeros(()))
        self.seen_bias = config.seen_bias
        if self.seen_bias:
            self.seen_song_bias = nn.Parameter(torch.zeros(()))
        self.apply(self._init_weights)
        if self.side_pointer:
            nn.init.constant_(self.pointer_gate.bias, 5.0)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Normal weights, zero biases; embeddings at 1/sqrt(width); padding rows stay zero.

        Embeddings start near unit logits through the tied head; at BERT's 0.02 the tied
        head learned several times slower on small data.
        """
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    @property
    def output_bias(self) -> nn.Parameter:
        """The output head's per-song bias, tied head or not."""
        return self.head_bias if self.tie_head else self.head.bias

    def init_head_bias(self, popularity: torch.Tensor) -> None:
        """Start the output bias at log(1 + training count), so step 0 ranks by popularity."""
        bias = self.output_bias
        with torch.no_grad():
            counts = torch.as_tensor(popularity, dtype=torch.float32, device=bias.device)
            bias.copy_(counts.log1p() - counts.log1p().mean())

    def set_side_tables(
        self, song_album: torch.Tensor, song_artist: torch.Tensor, song_features: torch.Tensor,
        song_successor: torch.Tensor | None = None,
    ) -> None:
        """Copy the per-song album, artist, feature and successor tables in; [PAD], [MASK] -> 0.

        ``song_successor``: each song's next song in its album's order, 0 for none (the
        side pointer's successor channel; left at 0, the channel scores nothing).
        """
        if not self.use_side:
            return
        with torch.no_grad():
            self.song_album.copy_(torch.as_tensor(song_album, dtype=torch.long))
            self.song_artist.copy_(torch.as_tensor(song_artist, dtype=torch.long))
            self.song_features.copy_(torch.as_tensor(song_features, dtype=torch.float32))
            tables = [self.song_album, self.song_artist, self.song_features]
            if self.side_pointer:
                if song_successor is not None:
                    self.song_successor.copy_(torch.as_tensor(song_successor, dtype=torch.long))
                tables.append(self.song_successor)
            for table in tables:
                table[PAD_INDEX].zero_()
                table[MASK_INDEX].zero_()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input vectors (B, L, d_model) before positions: song ⊕ album ⊕ artist (+ features).

        In training with song dropout, some songs' part is the unknown-song row (module doc).
        """
        song = self.song_embedding(tokens)
        if self.training and self.song_dropout > 0:
            dropped = torch.rand(tokens.shape, device=tokens.device) < self.song_dropout
            dropped &= tokens >= FIRST_SONG_INDEX
            song = torch.where(dropped[..., None], self.unknown_song.to(song.dtype), song)
        if not self.use_side:
            return song
        parts = [song, self.album_embedding(self.song_album[tokens])]
        parts.append(self.artist_embedding(self.song_artist[tokens]))
        x = torch.cat(parts, dim=-1)
        if self.feature_projection is not None:
            x = x + self.feature_projection(self.song_features[tokens])
        return x

    def encode(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, L, d_model) of right-aligned token indices (B, L), L <= seq_len.

        ``last_only`` returns only the last position's state (B, 1, d_model): the final block
        then runs its attention query, output and feed-forward for that position alone.
        """
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"input has {length} positions, the model takes {self.seq_len}")
        padding = tokens == PAD_INDEX
        attend = (~padding)[:, None, None, :] if padding.any() else None
        if self.causal:
            attend = causal_mask(padding)
        x = self.input_norm(self.embed(tokens)) + self.position_embedding[self.seq_len - length :]
        x = self.input_dropout(x)
        last_block = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, attend, last_only and index == last_block)
        return self.final_norm(x)

    def dropped_songs(self) -> torch.Tensor | None:
        """This step's songs (n_song_tokens,) whose head rows are unknown; None when none are.

        Drawn once per loss in training with song dropout and a tied head, else None.
        """
        if not (self.training and self.song_dropout > 0 and self.tie_head):
            return None
        device = self.song_embedding.weight.device
        dropped = torch.rand(self.n_song_tokens, device=device) < self.song_dropout
        dropped[:FIRST_SONG_INDEX] = False
        return dropped

    def head_bias_of(self, dropped: torch.Tensor | None) -> torch.Tensor:
        """The output bias, with the unknown bias for the ``dropped`` songs."""
        if dropped is None:
            return self.output_bias
        return torch.where(dropped, self.unknown_bias, self.output_bias)

    def song_vectors(self, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """The head's matrix (n_song_tokens, width); recompute after every weight update.

        ``dropped`` (``dropped_songs()``): those songs' embedding part is the unknown row.
        """
        if not self.tie_head:
            return self.head.weight
        vectors = self.song_embedding.weight
        if dropped is not None:  # index_put: a broadcast torch.where took 5x longer at 116k
            rows = dropped.nonzero()[:, 0]
            vectors = vectors.index_put((rows,), self.unknown_song.expand(len(rows), -1))
        if self.use_side:
            albums = F.embedding(self.song_album, self.album_to_song(self.album_embedding.weight))
            artists = F.embedding(self.song_artist,
                                  self.artist_to_song(self.artist_embedding.weight))
            vectors = vectors + albums + artists
            if self.features_to_song is not None:
                vectors = torch.addmm(vectors, self.song_features, self.features_to_song.weight.T)
        return vectors

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head multiplies with the song vectors: transformed when the head is tied."""
        return self.head_transform(hidden) if self.tie_head else hidden

    def head_parts(
        self, hidden: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head as ``(x, weight, bias)`` with logits = x @ weight.T + bias."""
        return self.head_input(hidden), self.song_vectors(dropped), self.head_bias_of(dropped)

    def scoring_matrix(self) -> torch.Tensor:
        """The head's matrix transposed, (width, n_song_tokens) and contiguous, for inference.

        Computed once per set of weights and passed to ``logits``/``predict_last``: it saves
        rebuilding the tied song vectors per call, and a row vector times this layout streams
        the 116k-song matrix in order, several times faster on the CPU than ``x @ weight.T``.
        """
        with torch.no_grad():
            return self.song_vectors().detach().T.contiguous()

    def logits(self, hidden: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Scores over every song token (..., n_song_tokens) for hidden states (..., d_model).

        ``matrix``: the result of ``scoring_matrix()``, to reuse it across inference calls.
        """
        if matrix is None:
            return F.linear(*self.head_parts(hidden))
        x = self.head_input(hidden)
        scores = torch.addmm(self.output_bias, x.reshape(-1, x.shape[-1]), matrix)
        return scores.view(*x.shape[:-1], -1)

    def pointer_logits(
        self, hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
        columns: torch.Tensor, candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Copy scores (M, n_song_tokens), or (M, C) at ``candidates`` (C,), of the side pointer.

        The M predicted positions are ``hidden[rows, columns]`` (each pair once); each attends
        over its sequence's visible songs (not [PAD], not [MASK]; under the causal objective
        only those up to its own position), the attention is summed per artist and per album,
        and every candidate song scores its artist's and its album's share, each times a
        learned positive gate of the predicted position. A second attention over the same
        songs is summed onto each song's album successor (the next track), times a third gate.
        With ``candidates`` (the sampled loss) only those columns are computed. The full rows
        are built from ``pointer_entries``.
        """
        if candidates is None:
            entry_rows, songs, values = self.pointer_entries(hidden, tokens, rows, columns)
            scores = torch.zeros(len(rows), self.n_song_tokens, dtype=values.dtype,
                                 device=values.device)
            return scores.index_put((entry_rows, songs), values, accumulate=True)
        songs, visible, predicted, keys, gates = self._pointer_inputs(hidden, tokens, rows,
                                                                      columns)
        attention = self._pointer_attention(self.pointer_query(predicted), keys, rows, columns,
                                            visible)
        scores = (gates[:, :1] * sums_at(self.song_artist[songs], attention,
                                         self.song_artist[candidates], self.n_artist_tokens)
                  + gates[:, 1:2] * sums_at(self.song_album[songs], attention,
                                            self.song_album[candidates], self.n_album_tokens))
        attention = self._pointer_attention(self.successor_query(predicted), keys, rows, columns,
                                            visible)
        return scores + gates[:, 2:] * sums_at(self.song_successor[songs], attention, candidates,
                                               self.n_song_tokens)

    def pointer_entries(
        self, hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
        columns: torch.Tensor,
    ) -> Entries:
        """Every copy score ``pointer_logits`` gives, as (row, song, value) entries (pointer.py):
        the songs of the visible artists and albums and the visible songs' successors only."""
        songs, visible, predicted, keys, gates = self._pointer_inputs(hidden, tokens, rows,
                                                                      columns)
        by_artist, by_album = self.song_groups()
        attention = self._pointer_attention(self.pointer_query(predicted), keys, rows, columns,
                                            visible)
        parts = [group_entries(by_artist, self.song_artist[songs], attention, visible, gates[:, 0]),
                 group_entries(by_album, self.song_album[songs], attention, visible, gates[:, 1])]
        attention = self._pointer_attention(self.successor_query(predicted), keys, rows, columns,
                                            visible)
        parts.append(successor_entries(self.song_successor[songs], attention, visible,
                                       gates[:, 2]))
        return join(parts)

    def _pointer_inputs(
        self, hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
        columns: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input songs of each predicted position and which it sees (M, L), its hidden
        state (M, d_model), the keys of every position (B, L, d_model) and the gates (M, 3)."""
        songs = tokens[rows]
        visible = songs >= FIRST_SONG_INDEX
        if self.causal:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            visible = visible & (positions[None, :] <= columns[:, None])
        predicted = hidden[rows, columns]
        gates = F.softplus(self.pointer_gate(predicted))
        return songs, visible, predicted, self.pointer_key(hidden), gates

    def song_groups(self) -> tuple[SongGroups, SongGroups]:
        """The songs of each artist and of each album, built again only when those tables
        changed (moved, grown, or written in place: a tensor's version counts its writes)."""
        tables = (self.song_artist, self.song_album)
        stamp = tuple((table.data_ptr(), table._version, len(table)) for table in tables)
        if getattr(self, "_groups_stamp", None) != stamp:
            self._groups = (SongGroups(self.song_artist), SongGroups(self.song_album))
            self._groups_stamp = stamp
        return self._groups

    @staticmethod
    def _pointer_attention(
        query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax attention (M, L) of the queries (M, d) at ``(rows, columns)`` over the keys
        (B, L, d) of their sequences, zero where not visible.

        The queries are placed at their positions and multiplied with all keys at once, one
        (L x L) product per sequence: gathering each query's keys instead made (M, L, d)
        tensors that cost a third of a training step.
        """
        placed = query.new_zeros(keys.shape).index_put((rows, columns), query)
        logits = torch.bmm(placed, keys.transpose(1, 2))[rows, columns] / math.sqrt(query.shape[1])
        return logits.masked_fill(~visible, -1e9).softmax(dim=1) * visible

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, sampler: NegativeSampler | None = None
    ) -> torch.Tensor:
        """The training loss (``loss``): DistributedDataParallel synchronises through forward."""
        return self.loss(tokens, labels, sampler)

    def loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, sampler: NegativeSampler | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy at the positions with a label; ``labels`` is 0 everywhere else.

        Cloze: the labels are the songs behind [MASK]; causal: each position's next song.

        Full softmax over the catalog, or with ``sampler`` the sampled softmax with logQ
        correction over the batch's targets and the sampler's negatives.
        """
        masked = labels != PAD_INDEX
        encoded = self.encode(tokens)
        hidden = encoded[masked]
        targets = labels[masked]
        dropped = self.dropped_songs()
        if sampler is not None:
            return self._sampled_loss(encoded, tokens, masked, hidden, targets, sampler, dropped)
        entries = []
        if self.side_pointer:
            rows, columns = masked.nonzero(as_tuple=True)
            entries.append(self.pointer_entries(encoded, tokens, rows, columns))
        if self.seen_bias:
            seen_rows, seen_songs = split_seen_keys(self.seen_keys(tokens, masked), len(targets))
            entries.append((seen_rows, seen_songs, self.seen_song_bias.expand(len(seen_rows))))
        x, weight, bias = self.head_parts(hidden, dropped)
        joined = join(entries) if entries else None
        if not hidden.is_cuda:
            return linear_cross_entropy(x, weight, bias, targets, joined)
        return dense_cross_entropy(x, weight, bias, targets, joined)

    def _sampled_loss(
        self, encoded: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
        hidden: torch.Tensor, targets: torch.Tensor, sampler: NegativeSampler,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sampled softmax of ``hidden`` (M, d_model) against the batch's shared candidates."""
        songs, log_q, positive = sampler.candidates(targets)
        drop = None if dropped is None else dropped[songs]
        bias = self.output_bias[songs]
        if drop is not None:
            bias = torch.where(drop, self.unknown_bias, bias)
        logits = torch.addmm(bias, self.head_input(hidden), self.candidate_vectors(songs, drop).T)
        if self.seen_bias:
            logits = logits + self.seen_song_bias * self._seen_at(tokens, masked, songs)
        if self.side_pointer:
            rows, columns = masked.nonzero(as_tuple=True)
            logits = logits.float() + self.pointer_logits(encoded, tokens, rows, columns, songs)
        return sampled_cross_entropy(logits, songs, log_q, positive, targets)

    def seen_keys(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Sorted unique ``song * M + row`` of the songs each of the M labelled positions sees.

        Row m is the m-th labelled position (``masked``'s order); it sees its sequence's songs
        (not [PAD], not [MASK]), under causal only those up to its own position.
        """
        where = masked.nonzero()
        songs = tokens[where[:, 0]]
        visible = songs >= FIRST_SONG_INDEX
        if self.causal:
            columns = torch.arange(tokens.shape[1], device=tokens.device)
            visible &= columns[None, :] <= where[:, 1:]
        rows = torch.arange(len(where), device=tokens.device)[:, None]
        return torch.unique((songs * len(where) + rows)[visible])

    def _seen_at(
        self, tokens: torch.Tensor, masked: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """(M, C) 1.0 where labelled position m sees candidate song c (``seen_keys``), else 0."""
        keys = self.seen_keys(tokens, masked)
        n_rows = int(masked.sum())
        rows, songs = split_seen_keys(keys, n_rows)
        ordered, order = candidates.sort()
        low = torch.searchsorted(ordered, songs)
        counts = torch.searchsorted(ordered, songs, right=True) - low
        entry = torch.repeat_interleave(torch.arange(len(keys), device=keys.device), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        offset = torch.arange(len(entry), device=keys.device) - first
        seen = torch.zeros(n_rows, len(candidates), device=candidates.device)
        seen[rows[entry], order[low[entry] + offset]] = 1.0
        return seen

    def candidate_vectors(
        self, songs: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``songs`` of ``song_vectors()`` (C, width), built for those songs only.

        Plain lookups, as in ``song_vectors``: the head's gradient reaches the padding rows too;
        the song rows' gradient is sparse (the input lookup makes that table's dense).
        ``dropped`` (C,): candidates whose embedding part is the unknown row.
        """
        if not self.tie_head:
            return self.head.weight[songs]
        vectors = SparseRows.apply(self.song_embedding.weight, songs)
        if dropped is not None:
            vectors = torch.where(dropped[:, None], self.unknown_song, vectors)
        if self.use_side:
            albums = F.embedding(self.song_album[songs], self.album_embedding.weight)
            artists = F.embedding(self.song_artist[songs], self.artist_embedding.weight)
            vectors = vectors + self.album_to_song(albums) + self.artist_to_song(artists)
            if self.features_to_song is not None:
                vectors = vectors + self.features_to_song(self.song_features[songs])
        return vectors

    def predict_last(
        self, tokens: torch.Tensor, matrix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (B, n_song_tokens) at the last position; [PAD] and [MASK] get -inf.

        ``matrix``: the result of ``scoring_matrix()``; without it the head is built anew.
        """
        encoded = self.encode(tokens, last_only=not self.side_pointer)
        scores = self.logits(encoded[:, -1], matrix).float()
        if self.side_pointer:
            rows = torch.arange(len(tokens), device=tokens.device)
            last = torch.full_like(rows, tokens.shape[1] - 1)
            entry_rows, songs, values = self.pointer_entries(encoded, tokens, rows, last)
            scores = scores.index_put((entry_rows, songs), values.float(), accumulate=True)
        if self.seen_bias:  # a song twice in the input writes the same value twice
            bias = self.seen_song_bias.float()
            scores = scores.scatter(1, tokens, scores.gather(1, tokens) + bias)
        scores[:, :FIRST_SONG_INDEX] = float("-inf")
        return scores
