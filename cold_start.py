"""Cold start: songs added to the catalog after training, recommended without retraining.

    python cold_start.py --checkpoint runs/demo/best.pt --songs "demo data" --out extended.pt

``extend_encoders`` appends the catalog's new songs, albums and artists to the encoders
(existing indices never change; the fingerprint chain records the base). ``extend_model``
gives each new song the rows a model trained with song dropout learned for a song it does not
know: its song-embedding part is the learned unknown-song row (zeros without song dropout),
its output bias the mean bias of its album's known songs (an album's popularity carries over to
its new track; on a new album the learned unknown bias, without song dropout the mean bias:
chosen by measurement, BENCHMARKS.md "Cold start"), and the rest comes from its album, artist
and features, in the input and in the tied head alike (an untied head gives it the mean
row). A new album's row is the mean of its artist's known albums' rows, else the mean album
row; a new artist's row the mean artist row (the expected row of an artist the model knows
nothing about). ``extend_recommender`` does both for a live Recommender and never changes it, so
in-flight requests keep the old one; ``--out`` saves the extension as a checkpoint.

A known song whose album or artist differs in ``songs`` keeps its indices, album, artist and
features: the model learned it that way, and its scores stay what they were (counted, logged).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from checkpoint import (
    CheckpointError,
    encoders_to_tensors,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from csv_tables import read_csv_songs
from dataset import album_successors
from model import BERT4Rec
from preprocessing_utils import FIRST_SONG_INDEX, DataError, Encoders, check_songs, find_ids
from recommender import Recommender
from table_reserve import TableReserve

log = logging.getLogger(__name__)

# what an extension appends to the model version: the extended encoders' fingerprint prefix
VERSION_MARK = "+catalog-"


def _lookup(vocabulary: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each id in ``vocabulary`` (unique, maybe unsorted after an extension), -1
    if absent."""
    order = np.argsort(vocabulary, kind="stable")
    found = find_ids(vocabulary[order], ids)
    return np.where(found < 0, -1, order[np.maximum(found, 0)])


def _append_ids(vocabulary: np.ndarray, column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary with the column's new ids appended (sorted), and each row's index into
    it plus 1 (0 for NULL), as the encoders' song_album / song_artist hold them."""
    present = column.notna().to_numpy()
    values = column.to_numpy(dtype=np.int64, na_value=0)
    known = _lookup(vocabulary, values)
    new = np.unique(values[present & (known < 0)])
    index = np.where(known >= 0, known, len(vocabulary) + np.searchsorted(new, values)) + 1
    return np.concatenate([vocabulary, new]), np.where(present, index, 0).astype(np.int64)


def _append_array(reserve: TableReserve | None, name: str, table: np.ndarray,
                  rows: np.ndarray) -> np.ndarray:
    """``table`` with ``rows`` appended: in ``reserve`` when given, else a new array."""
    if reserve is None:
        return np.concatenate([table, rows])
    return reserve.append_array(name, table, rows)


def _append_rows(reserve: TableReserve | None, name: str, table: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
    """``table`` with ``rows`` appended: in ``reserve`` when given, else a new tensor."""
    return torch.cat([table, rows]) if reserve is None else reserve.append(name, table, rows)


def extend_encoders(encoders: Encoders, songs: pd.DataFrame,
                    reserve: TableReserve | None = None) -> Encoders:
    """Encoders that also hold the songs of ``songs`` they lack; ``encoders`` when none.

    New songs get the next indices in catalog-id order, new albums and artists likewise;
    features through the fitted imputation and scaling. DataError for an invalid row.
    ``reserve``: where the per-song tables grow (in place when they can, table_reserve.py).
    """
    if encoders.has_side_info:
        check_songs(songs)
    elif "song_id" not in songs.columns:
        raise DataError("songs: missing column 'song_id'")
    ids = songs["song_id"].to_numpy(dtype=np.int64)
    tokens = encoders.find_songs(ids)
    fresh = songs.iloc[np.flatnonzero(tokens < 0)]
    fresh = fresh.iloc[np.argsort(fresh["song_id"].to_numpy(dtype=np.int64), kind="stable")]
    if encoders.has_side_info:
        _log_changed(encoders, songs, tokens)
    if not len(fresh):
        return encoders
    album_ids, artist_ids = encoders.album_ids, encoders.artist_ids
    song_album = song_artist = np.zeros(len(fresh), dtype=np.int64)
    if encoders.has_side_info:
        album_ids, song_album = _append_ids(album_ids, fresh["album_id"])
        artist_ids, song_artist = _append_ids(artist_ids, fresh["artist_id"])
    link = np.frombuffer(bytes.fromhex(encoders.fingerprint), dtype=np.uint8)
    sizes = [encoders.n_songs, len(encoders.album_ids), len(encoders.artist_ids)]
    return _appended_encoders(
        encoders, reserve, fresh["song_id"].to_numpy(dtype=np.int64), song_album,
        song_artist, encoders.transform(fresh), album_ids, artist_ids,
        np.concatenate([encoders.chain_fingerprints, link[None, :]]),
        np.concatenate([encoders.chain_sizes, np.asarray([sizes], dtype=np.int64)]))


def _appended_encoders(
    encoders: Encoders, reserve: TableReserve | None, song_ids: np.ndarray,
    song_album: np.ndarray, song_artist: np.ndarray, song_features: np.ndarray,
    album_ids: np.ndarray, artist_ids: np.ndarray, chain_fingerprints: np.ndarray,
    chain_sizes: np.ndarray,
) -> Encoders:
    """``encoders`` with these song rows appended to its per-song tables (in ``reserve`` when
    given), the given vocabularies of albums and artists, and the given chain."""
    return Encoders(
        _append_array(reserve, "song_ids", encoders.song_ids, song_ids),
        album_ids, artist_ids,
        _append_array(reserve, "song_album", encoders.song_album, song_album),
        _append_array(reserve, "song_artist", encoders.song_artist, song_artist),
        _append_array(reserve, "song_features", encoders.song_features, song_features),
        encoders.numeric_fill, encoders.numeric_center, encoders.numeric_scale,
        encoders.has_side_info, chain_fingerprints, chain_sizes,
    )


def _log_changed(encoders: Encoders, songs: pd.DataFrame, tokens: np.ndarray) -> None:
    """Log how many known songs have another album or artist in ``songs`` (they keep theirs)."""
    rows = np.flatnonzero(tokens >= 0)
    changed = 0
    for column, table, vocabulary in (("album_id", encoders.song_album, encoders.album_ids),
                                      ("artist_id", encoders.song_artist, encoders.artist_ids)):
        given = songs[column].iloc[rows].to_numpy(dtype=np.int64, na_value=-1)
        index = table[tokens[rows]]
        kept = np.where(index > 0, np.concatenate([[-1], vocabulary])[index], -1)
        changed += int((given != kept).sum())
    if changed:
        log.info("%d album/artist links of known songs differ in the catalog; the model keeps "
                 "the ones it was trained with", changed)


def _mean_rows(weight: torch.Tensor) -> torch.Tensor:
    """The mean of an embedding table's rows after row 0 ([PAD]/unknown), (width,)."""
    return weight[1:].mean(dim=0) if len(weight) > 1 else torch.zeros_like(weight[0])


def _new_album_rows(model: BERT4Rec, extended: Encoders) -> torch.Tensor:
    """Rows of the albums ``model`` lacks: the mean of the artist's known albums, else the mean
    album (an album's artist is that of its first new song). Only the known songs of those
    artists are grouped, so a refresh does not sort a 2.26M-song catalog."""
    weight = model.album_embedding.weight.detach()
    known_albums, known_artists = model.n_album_tokens, model.n_artist_tokens
    new_songs = np.arange(model.n_song_tokens, extended.n_song_tokens)
    albums, first = np.unique(extended.song_album[new_songs], return_index=True)
    artists = extended.song_artist[new_songs][first[albums >= known_albums]]
    rows = _mean_rows(weight).repeat(extended.n_album_tokens - known_albums, 1)
    wanted = np.unique(artists[(artists > 0) & (artists < known_artists)])
    songs = np.arange(FIRST_SONG_INDEX, model.n_song_tokens)
    songs = songs[np.isin(extended.song_artist[songs], wanted)]
    pairs = np.unique(np.stack([extended.song_artist[songs], extended.song_album[songs]], 1),
                      axis=0).reshape(-1, 2)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    sums = torch.zeros(known_artists, weight.shape[1]).index_add_(
        0, torch.from_numpy(pairs[:, 0]), weight[torch.from_numpy(pairs[:, 1])])
    counts = np.bincount(pairs[:, 0], minlength=known_artists)
    has = (artists < known_artists) & (counts[np.minimum(artists, known_artists - 1)] > 0)
    has_rows = torch.from_numpy(np.flatnonzero(has))
    chosen = torch.from_numpy(artists[has])
    rows[has_rows] = sums[chosen] / torch.from_numpy(counts[artists[has]]).float()[:, None]
    return rows


def _new_song_bias(
    bias: torch.Tensor, extended: Encoders, fallback: torch.Tensor
) -> torch.Tensor:
    """Output biases of the added songs: the mean bias of the known songs of each one's album,
    ``fallback`` for a song whose album has none (a new album, or none)."""
    known = len(bias)
    album = torch.from_numpy(extended.song_album)
    trained = album[FIRST_SONG_INDEX:known]
    sums = torch.zeros(extended.n_album_tokens).index_add_(0, trained, bias[FIRST_SONG_INDEX:])
    counts = torch.bincount(trained, minlength=extended.n_album_tokens)
    new_albums = album[known:]
    has = (counts[new_albums] > 0) & (new_albums != 0)
    values = fallback.expand(len(new_albums)).clone()
    values[has] = sums[new_albums[has]] / counts[new_albums[has]]
    return values


def prepare_for_extensions() -> None:
    """Import what ``extend_model``'s empty tables need: the meta device's initialisers import
    torch._dynamo on first use (2.4 s, 74 MB). Called in the gunicorn master, so the workers
    share the import instead of each paying for it at its first refresh."""
    import torch._dynamo  # noqa: F401


def extend_model(model: BERT4Rec, extended: Encoders,
                 reserve: TableReserve | None = None) -> BERT4Rec:
    """A new network for ``extended`` (``model``'s encoders with rows appended); ``model`` is
    left as it is. Without ``reserve`` each big table is copied once, into its extended size;
    with one the tables grow in its buffers, in place when they can (table_reserve.py). The
    rows in-flight requests read are never written either way."""
    added = extended.n_song_tokens - model.n_song_tokens
    trained = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    width = model.song_embedding.weight.shape[1]
    unknown = (model.unknown_song.detach() if model.song_dropout > 0
               else torch.zeros(width))
    state["song_embedding.weight"] = _append_rows(
        reserve, "song_embedding", model.song_embedding.weight.detach(),
        unknown.expand(added, -1))
    if model.tie_head:
        known_bias = model.head_bias.detach()
        fallback = (model.unknown_bias.detach() if model.song_dropout > 0
                    else known_bias[FIRST_SONG_INDEX:].mean())
        state["head_bias"] = _append_rows(reserve, "head_bias", known_bias,
                                          _new_song_bias(known_bias, extended, fallback))
    else:
        for name in ("head.weight", "head.bias"):
            rows = trained[name].detach()
            state[name] = _append_rows(reserve, name, rows, rows[FIRST_SONG_INDEX:].mean(0)
                                       .expand(added, *rows.shape[1:]))
    if model.use_side:
        state["album_embedding.weight"] = _append_rows(
            reserve, "album_embedding", model.album_embedding.weight.detach(),
            _new_album_rows(model, extended))
        artists = model.artist_embedding.weight.detach()
        new_artists = extended.n_artist_tokens - model.n_artist_tokens
        state["artist_embedding.weight"] = _append_rows(
            reserve, "artist_embedding", artists, _mean_rows(artists).repeat(new_artists, 1))
        state["song_album"] = torch.from_numpy(extended.song_album)
        state["song_artist"] = torch.from_numpy(extended.song_artist)
        state["song_features"] = torch.from_numpy(extended.song_features)
        if model.side_pointer:
            state["song_successor"] = torch.from_numpy(album_successors(extended))
    state.update({name: tensor.detach().clone() for name, tensor in trained.items()
                  if name not in state})
    # the catalog-sized tables are created on the meta device, without memory: every one is
    # assigned from ``state`` (random CPU tables cost 2.8 s and 950 MB at 2.26M songs)
    network = BERT4Rec(model.config, extended.n_song_tokens, extended.n_album_tokens,
                       extended.n_artist_tokens, extended.n_features, model.seq_len,
                       tables_on="meta")
    network.load_state_dict(state, assign=True)
    return network.to(model.song_embedding.weight.device).eval()


def extended_version(model_version: str, extended: Encoders) -> str:
    """The model version of an extension: the trained model's, plus the catalog's fingerprint."""
    return f"{model_version.partition(VERSION_MARK)[0]}{VERSION_MARK}{extended.fingerprint[:12]}"


def extended_popularity(popularity: torch.Tensor, n_song_tokens: int) -> torch.Tensor:
    """Training counts with 0 for every added song (they were never played)."""
    return torch.cat([popularity, popularity.new_zeros(n_song_tokens - len(popularity))])


def extend_recommender(recommender: Recommender, songs: pd.DataFrame) -> Recommender:
    """A new Recommender whose vocabulary also holds the catalog songs in ``songs`` that its
    encoders lack; the same object when there are none. Never mutates ``recommender``
    (in-flight requests keep using it). DataError for an invalid row of ``songs``.

    The tables grow in the recommender's TableReserve (a new one on its first extension), so a
    served model extended again appends in place."""
    reserve = recommender.reserve or TableReserve()
    extended = extend_encoders(recommender.encoders, songs, reserve)
    if extended is recommender.encoders:
        return recommender
    log.info("catalog extended by %d songs (%d albums, %d artists)",
             extended.n_songs - recommender.encoders.n_songs,
             len(extended.album_ids) - len(recommender.encoders.album_ids),
             len(extended.artist_ids) - len(recommender.encoders.artist_ids))
    return _recommender_in(recommender, extended, reserve,
                           extended_version(recommender.model_version, extended))


def with_reserve(recommender: Recommender) -> Recommender:
    """The same model, version and answers, its growing tables moved into a new TableReserve,
    so that its extensions append in place. For the gunicorn master before it forks: a worker's
    refresh then writes only the new rows instead of copying every table (table_reserve.py)."""
    reserve = TableReserve()
    encoders = recommender.encoders
    none = np.zeros(0, dtype=np.int64)
    moved = _appended_encoders(encoders, reserve, none, none, none,
                               np.zeros((0, encoders.n_features), dtype=np.float32),
                               encoders.album_ids, encoders.artist_ids,
                               encoders.chain_fingerprints, encoders.chain_sizes)
    return _recommender_in(recommender, moved, reserve, recommender.model_version)


def _recommender_in(recommender: Recommender, extended: Encoders, reserve: TableReserve,
                    version: str) -> Recommender:
    """The Recommender of ``recommender``'s model extended to ``extended``, its tables in
    ``reserve``, the approximate index shared."""
    model = extend_model(recommender.model, extended, reserve)
    approximate = (recommender.approximate.extended(model, reserve)
                   if recommender.approximate is not None else None)
    return Recommender(model, extended,
                       extended_popularity(recommender.popularity, extended.n_song_tokens),
                       version, recommender.device, recommender.batch_size,
                       recommender.index_mode, approximate=approximate,
                       exclude_seen=recommender.exclude_seen, reserve=reserve)


def read_catalog_songs(path: Path) -> pd.DataFrame:
    """The songs of a songs.csv file, or of the songs.csv in a folder of CSV tables."""
    path = Path(path)
    return read_csv_songs(path / "songs.csv" if path.is_dir() else path)


def extend_checkpoint(checkpoint: Path, songs: pd.DataFrame, out: Path) -> int:
    """Save ``checkpoint`` extended by the new songs of ``songs`` to ``out`` (atomically), even
    when there are none; returns how many songs were added."""
    state = load_checkpoint(Path(checkpoint))
    loaded = model_from_checkpoint(state, Path(checkpoint))
    extended = extend_encoders(loaded.encoders, songs)
    model = loaded.model if extended is loaded.encoders else extend_model(loaded.model, extended)
    version = (loaded.model_version if extended is loaded.encoders
               else extended_version(loaded.model_version, extended))
    save_checkpoint(Path(out), {
        **state, "model": model.state_dict(), "encoders": encoders_to_tensors(extended),
        "encoders_fingerprint": extended.fingerprint, "model_version": version,
        "popularity": extended_popularity(loaded.popularity, extended.n_song_tokens),
    })
    return extended.n_songs - loaded.encoders.n_songs


def main(argv: list[str] | None = None) -> int:
    """Extend a checkpoint by a catalog's new songs; exit status 2 with a one-line error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--songs", type=Path, required=True,
                        help="songs.csv, or a folder of CSV tables holding one")
    parser.add_argument("--out", type=Path, required=True, help="the extended checkpoint")
    args = parser.parse_args(argv)
    try:
        added = extend_checkpoint(args.checkpoint, read_catalog_songs(args.songs), args.out)
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {added} songs added to the catalog")
    return 0


if __name__ == "__main__":
    sys.exit(main())
