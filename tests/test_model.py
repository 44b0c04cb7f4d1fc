"""The network: shapes, the fused loss, no leaks through masks or padding, every variant trains."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_softmax
from config import ModelConfig
from dataset import album_successors
from fused_softmax import linear_cross_entropy
from model import BERT4Rec, dense_cross_entropy
from preprocessing_utils import FEATURE_NAMES, FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX

N_SONGS, N_ALBUMS, N_ARTISTS, N_FEATURES, SEQ_LEN = 40, 9, 5, 21, 8


def tiny_config(**changes: object) -> ModelConfig:
    """A model small enough to train in a blink."""
    config = ModelConfig(d_song=16, d_album=8, d_artist=8, d_ff=32, n_layers=2, n_heads=2,
                         dropout=0.0)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


def tiny_model(seed: int = 0, **changes: object) -> BERT4Rec:
    """A model with random but fixed side tables."""
    torch.manual_seed(seed)
    model = BERT4Rec(tiny_config(**changes), N_SONGS, N_ALBUMS, N_ARTISTS, N_FEATURES, SEQ_LEN)
    generator = torch.Generator().manual_seed(1)
    model.set_side_tables(
        torch.randint(1, N_ALBUMS, (N_SONGS,), generator=generator),
        torch.randint(1, N_ARTISTS, (N_SONGS,), generator=generator),
        torch.randn(N_SONGS, N_FEATURES, generator=generator),
    )
    return model


def random_tokens(batch: int = 4, length: int = SEQ_LEN, seed: int = 2) -> torch.Tensor:
    """Song tokens (no specials)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_SONG_INDEX, N_SONGS, (batch, length), generator=generator)


def test_shapes_and_dtypes() -> None:
    model = tiny_model().eval()
    tokens = random_tokens()
    hidden = model.encode(tokens)
    assert hidden.shape == (4, SEQ_LEN, 32) and hidden.dtype == torch.float32
    assert model.logits(hidden[:, -1]).shape == (4, N_SONGS)
    scores = model.predict_last(tokens)
    assert scores.shape == (4, N_SONGS)
    assert torch.isinf(scores[:, :FIRST_SONG_INDEX]).all()
    labels = torch.zeros_like(tokens)
    labels[:, -1] = tokens[:, -1]
    loss = model.loss(tokens, labels)
    assert loss.shape == () and loss.dtype == torch.float32


def test_d_model_is_the_same_without_side_features() -> None:
    with_side = tiny_model()
    without = tiny_model(side_features=False)
    assert with_side.song_embedding.weight.shape[1] == 16
    assert without.song_embedding.weight.shape[1] == 32
    assert without.encode(random_tokens()).shape == with_side.encode(random_tokens()).shape


def test_data_without_side_information_uses_song_ids_only() -> None:
    model = BERT4Rec(tiny_config(), N_SONGS, 1, 1, 0, SEQ_LEN)
    assert not model.use_side
    assert model.encode(random_tokens()).shape == (4, SEQ_LEN, 32)


def fused_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head inputs ``(x, weight, bias, targets)``: 7 rows, 11 songs, in float64 for gradcheck
    precision; targets repeat one song and cover the first and the last."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    return x, weight, bias, torch.tensor([0, 3, 10, 2, 2, 7, 5])


def assert_same_value_and_gradient(
    fused: torch.Tensor, expected: torch.Tensor, inputs: tuple[torch.Tensor, ...]
) -> None:
    """The fused loss equals the reference, and so do their gradients wrt every input."""
    torch.testing.assert_close(fused, expected)
    fused_grads = torch.autograd.grad(fused, inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    for got, want in zip(fused_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kept_logits", [0, fused_softmax.KEPT_LOGITS])
@pytest.mark.parametrize("chunk", [4, 11, 4096])
def test_fused_loss_matches_cross_entropy_in_value_and_gradient(
    chunk: int, kept_logits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the logits recomputed in the backward pass or kept from the forward pass."""
    monkeypatch.setattr(fused_softmax, "KEPT_LOGITS", kept_logits)
    x, weight, bias, targets = fused_case()
    assert_same_value_and_gradient(
        linear_cross_entropy(x, weight, bias, targets, None, chunk),
        F.cross_entropy(F.linear(x, weight, bias), targets), (x, weight, bias))
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 7, (40,), generator=generator)
    songs = torch.randint(0, 11, (40,), generator=generator)
    rows[:2], songs[:2] = 0, targets[0]  # row 0's target logit gets the same pair twice
    values = torch.randn(40, dtype=torch.float64, generator=generator, requires_grad=True)
    dense = torch.zeros(7, 11, dtype=torch.float64).index_put((rows, songs), values,
                                                              accumulate=True)
    assert_same_value_and_gradient(
        linear_cross_entropy(x, weight, bias, targets, (rows, songs, values), chunk),
        F.cross_entropy(F.linear(x, weight, bias) + dense, targets), (x, weight, bias, values))



def test_the_gpu_loss_from_whole_logits_equals_the_fused_one() -> None:
    x, weight, bias, targets = fused_case()
    generator = torch.Generator().manual_seed(4)
    rows, songs = torch.randint(0, 7, (30,), generator=generator), torch.randint(0, 11, (30,),
                                                                               generator=generator)
    values = torch.randn(30, dtype=torch.float64, generator=generator, requires_grad=True)
    entries = rows, songs, values
    assert_same_value_and_gradient(dense_cross_entropy(x, weight, bias, targets, entries),
                                   linear_cross_entropy(x, weight, bias, targets, entries),
                                   (x, weight, bias, values))


@pytest.mark.parametrize("side_pointer", [False, True])
def test_model_loss_equals_cross_entropy_on_the_masked_positions(side_pointer: bool) -> None:
    model = tiny_model(side_pointer=side_pointer).eval()
    tokens = random_tokens()
    labels = torch.where(torch.rand(tokens.shape) < 0.3, tokens, PAD_INDEX)
    labels[:, -1] = tokens[:, -1]
    inputs = torch.where(labels != PAD_INDEX, MASK_INDEX, tokens)
    masked = labels != PAD_INDEX
    encoded = model.encode(inputs)
    logits = model.logits(encoded[masked])
    if side_pointer:
        rows, columns = masked.nonzero(as_tuple=True)
        logits = logits + model.pointer_logits(encoded, inputs, rows, columns)
    expected = F.cross_entropy(logits, labels[masked])
    torch.testing.assert_close(model.loss(inputs, labels), expected)
    last = model.logits(encoded[:, -1])
    if side_pointer:
        last = last + model.pointer_logits(encoded, inputs, torch.arange(4),
                                           torch.full((4,), SEQ_LEN - 1))
    torch.testing.assert_close(model.predict_last(inputs)[:, FIRST_SONG_INDEX:],
                               last[:, FIRST_SONG_INDEX:])


def test_side_pointer_scores_the_visible_songs_artists_and_albums_only() -> None:
    model = tiny_model(side_pointer=True).eval()
    tokens = random_tokens(batch=1)
    tokens[0, :3] = PAD_INDEX
    tokens[0, -1] = MASK_INDEX
    encoded = model.encode(tokens)
    with torch.no_grad():
        scores = model.pointer_logits(encoded, tokens, torch.zeros(1, dtype=torch.long),
                                      torch.tensor([SEQ_LEN - 1]))[0]
    visible = tokens[0, 3:-1]
    related = torch.isin(model.song_artist, model.song_artist[visible]) | torch.isin(
        model.song_album, model.song_album[visible])
    assert (scores[related & (model.song_artist > 0)] > 0).all()
    assert (scores[~related] == 0).all()


@pytest.mark.parametrize("objective", ["cloze", "causal"])
def test_side_pointer_scores_are_its_attention_summed_by_artist_album_and_successor(
    objective: str,
) -> None:
    """The sparse entries give, song by song, what the pointer's definition says."""
    model = tiny_model(side_pointer=True, objective=objective).eval()
    successor = torch.randint(FIRST_SONG_INDEX, N_SONGS, (N_SONGS,),
                              generator=torch.Generator().manual_seed(2))
    successor[::3] = 0  # no next track
    model.set_side_tables(model.song_album, model.song_artist, model.song_features, successor)
    model.song_artist[[7, 8]] = 0  # songs without an artist score no artist share
    tokens = random_tokens()
    tokens[1, :3] = PAD_INDEX
    tokens[2, 4] = tokens[2, 1]
    tokens[:, -1] = MASK_INDEX
    rows, columns = torch.tensor([0, 1, 2, 2, 3]), torch.tensor([7, 7, 7, 2, 5])
    with torch.no_grad():
        encoded = model.encode(tokens)
        scores = model.pointer_logits(encoded, tokens, rows, columns)
        predicted = encoded[rows, columns]
        gates = F.softplus(model.pointer_gate(predicted))
        keys, width = model.pointer_key(encoded), model.config.d_model
        for m, (row, column) in enumerate(zip(rows.tolist(), columns.tolist(), strict=True)):
            visible = [place for place, song in enumerate(tokens[row].tolist())
                       if song >= FIRST_SONG_INDEX and (objective == "cloze" or place <= column)]
            songs = tokens[row, visible]
            attention, following = (
                torch.softmax(keys[row, visible] @ query(predicted[m]) / width**0.5, dim=0)
                for query in (model.pointer_query, model.successor_query))
            expected = torch.zeros(N_SONGS)
            for song in range(FIRST_SONG_INDEX, N_SONGS):
                for gate, table in zip(gates[m, :2], (model.song_artist, model.song_album),
                                       strict=True):
                    if table[song] != 0:
                        expected[song] += gate * attention[table[songs] == table[song]].sum()
                expected[song] += gates[m, 2] * following[successor[songs] == song].sum()
            torch.testing.assert_close(scores[m], expected)


def test_album_successors_follow_disc_then_track_order() -> None:
    features = np.zeros((9, len(FEATURE_NAMES)), dtype=np.float32)
    disc, track = FEATURE_NAMES.index("disc_number"), FEATURE_NAMES.index("track_number")
    # songs 2..8: album 1 holds 5 (d1 t1), 2 (d1 t2), 7 (d2 t1); album 2 holds 8, 3; 4, 6 none
    features[[5, 2, 7, 8, 3], disc] = [0.0, 0.0, 1.0, 0.0, 0.0]
    features[[5, 2, 7, 8, 3], track] = [-1.0, 0.5, -2.0, 0.1, 0.3]
    encoders = SimpleNamespace(n_song_tokens=9, has_side_info=True, song_features=features,
                               song_album=np.array([0, 0, 1, 2, 0, 1, 0, 1, 2]))
    assert album_successors(encoders).tolist() == [0, 0, 7, 0, 0, 2, 0, 0, 3]


def test_successor_channel_scores_next_tracks_of_visible_songs_only() -> None:
    model = tiny_model(side_pointer=True).eval()
    successor = torch.zeros(N_SONGS, dtype=torch.long)
    successor[FIRST_SONG_INDEX:-1] = torch.arange(FIRST_SONG_INDEX + 1, N_SONGS)
    model.set_side_tables(model.song_album, model.song_artist, model.song_features, successor)
    assert model.song_successor[MASK_INDEX] == 0 and model.song_successor[PAD_INDEX] == 0
    tokens = torch.tensor([[PAD_INDEX, 5, 10, MASK_INDEX, 20, 30, 25, MASK_INDEX]])
    masked_songs = [15, 35]  # hidden behind the two [MASK] positions
    encoded = model.encode(tokens)
    rows = torch.zeros(2, dtype=torch.long)
    columns = torch.tensor([3, 7])
    with torch.no_grad():
        with_successors = model.pointer_logits(encoded, tokens, rows, columns)
        model.song_successor.zero_()
        without = model.pointer_logits(encoded, tokens, rows, columns)
    gained = (with_successors - without > 0).any(dim=0).nonzero().squeeze(1).tolist()
    assert gained == [6, 11, 21, 26, 31]
    assert all(song + 1 not in gained for song in masked_songs)


def test_mask_and_pad_rows_of_the_side_tables_are_zero() -> None:
    model = BERT4Rec(tiny_config(), N_SONGS, N_ALBUMS, N_ARTISTS, N_FEATURES, SEQ_LEN)
    model.set_side_tables(torch.full((N_SONGS,), 3), torch.full((N_SONGS,), 2),
                          torch.ones(N_SONGS, N_FEATURES))
    for special in (PAD_INDEX, MASK_INDEX):
        assert model.song_album[special] == 0 and model.song_artist[special] == 0
        assert not model.song_features[special].any()
    vector = model.embed(torch.tensor([[MASK_INDEX]]))[0, 0]
    song_part = model.song_embedding.weight[MASK_INDEX]
    assert torch.equal(vector[16:], model.feature_projection.bias[16:])
    torch.testing.assert_close(vector[:16], song_part + model.feature_projection.bias[:16])


def test_masked_song_side_information_cannot_change_the_prediction() -> None:
    model = tiny_model().eval()
    tokens = random_tokens(batch=1)
    target = int(tokens[0, -1])
    tokens[0, -1] = MASK_INDEX
    before = model.encode(tokens)
    model.song_album[target] = (model.song_album[target] % (N_ALBUMS - 1)) + 1
    model.song_features[target] += 5.0
    if target not in tokens:
        torch.testing.assert_close(model.encode(tokens), before)


def test_padding_is_never_attended() -> None:
    model = tiny_model().eval()
    short = random_tokens(batch=1, length=5)
    padded = torch.cat([torch.zeros(1, SEQ_LEN - 5, dtype=torch.long), short], dim=1)
    torch.testing.assert_close(model.encode(padded)[:, -5:], model.encode(short))
    torch.testing.assert_close(model.predict_last(padded), model.predict_last(short))


def test_batch_mates_do_not_change_a_sequence_output() -> None:
    model = tiny_model().eval()
    alone = random_tokens(batch=1)
    alone[0, :3] = PAD_INDEX
    batch = torch.cat([alone, random_tokens(batch=3, seed=9)])
    torch.testing.assert_close(model.encode(batch)[:1], model.encode(alone))


@pytest.mark.parametrize("side_pointer", [True, False])
def test_prediction_reads_the_same_state_as_the_full_encoder(side_pointer: bool) -> None:
    model = tiny_model(side_pointer=side_pointer).eval()
    tokens = random_tokens()
    tokens[1, :4] = PAD_INDEX
    tokens[:, -1] = MASK_INDEX
    with torch.no_grad():
        last = model.encode(tokens, last_only=True)
        full = model.encode(tokens)
        torch.testing.assert_close(last, full[:, -1:])
        expected = model.logits(full[:, -1]).float()
        if side_pointer:
            rows = torch.arange(len(tokens))
            expected = expected + model.pointer_logits(full, tokens, rows,
                                                       torch.full_like(rows, SEQ_LEN - 1))
        expected[:, :FIRST_SONG_INDEX] = float("-inf")
        torch.testing.assert_close(model.predict_last(tokens), expected)


def test_input_longer_than_seq_len_is_refused() -> None:
    with pytest.raises(ValueError, match="positions"):
        tiny_model().encode(random_tokens(length=SEQ_LEN + 1))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
@pytest.mark.parametrize("tie_head", [True, False])
@pytest.mark.parametrize("side_features", [True, False])
@pytest.mark.parametrize("side_pointer", [True, False])
def test_every_variant_trains(
    positional: str, tie_head: bool, side_features: bool, side_pointer: bool
) -> None:
    model = tiny_model(positional=positional, tie_head=tie_head, side_features=side_features,
                       side_pointer=side_pointer)
    model.train()
    tokens = random_tokens(batch=16)
    labels = torch.zeros_like(tokens)
    labels[:, -1] = tokens[:, -1]
    labels[:, 2] = tokens[:, 2]
    inputs = torch.where(labels != PAD_INDEX, MASK_INDEX, tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.loss(inputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("tie_head", [True, False])
def test_cached_scoring_matrix_gives_the_same_scores(tie_head: bool) -> None:
    model = tiny_model(tie_head=tie_head).eval()
    tokens = random_tokens()
    with torch.no_grad():
        matrix = model.scoring_matrix()
        torch.testing.assert_close(model.predict_last(tokens, matrix),
                                   model.predict_last(tokens))


@pytest.mark.parametrize("tie_head", [True, False])
def test_head_bias_starts_at_log_popularity(tie_head: bool) -> None:
    model = tiny_model(tie_head=tie_head).eval()
    popularity = torch.arange(N_SONGS, dtype=torch.long)
    model.init_head_bias(popularity)
    bias = model.head_bias if tie_head else model.head.bias
    expected = popularity.float().log1p()
    torch.testing.assert_close(bias - bias.mean(), expected - expected.mean())
