"""Generate the seeded tables of Bert4MusicRec at any scale: artists, albums, songs, playlists.

The process is built so that a sequence model with side information has something to learn
that neither a popularity count nor a one-step transition table captures: every playlist has
a fixed set of genre themes and a few core artists per theme, it drifts between the themes,
and it contains album runs and artist runs. Song frequencies are long-tailed, so rare songs
are learnable mainly through their album, artist and audio features.

Playlists are made one after another from one random stream and kept on disk in chunks, so
memory grows with the catalog, not with the number of playlist entries. The tables go to
CSV files (--out) or into PostgreSQL with COPY in one transaction (--database).

Usage: python "demo data/generate.py" [--scale demo|full|mpd] [--playlists N] [--songs N]
       [--albums N] [--artists N] [--out DIR | --database DSN] [--seed N] [--chunk-rows N]
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psycopg2
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from db import sql_text

DEFAULT_SEED = 20261128
DEFAULT_CHUNK_ROWS = 250_000
SEQUENCE_GENRE = "indie folk"
SEQUENCE_LENGTH = 15
# Redraws of a taken artist name before a numbered variant is used; the demo needs at most 7.
NAME_TRIES = 20
# An album is a single below the first bound of a uniform draw, an EP of 2-4 tracks below the
# second and an LP of 6-16 tracks above it; the means of those EP and LP sizes.
KIND_BOUNDS = (0.58, 0.87)
EP_MEAN, LP_MEAN = 3.0, 11.0
TABLES = ("artists", "albums", "songs", "playlists", "playlist_songs")

UNIT_FEATURES = (
    "danceability",
    "energy",
    "speechiness",
    "acousticness",
    "instrumentalness",
    "liveness",
    "valence",
)
SONG_COLUMNS = (
    "song_id", "name", "album_id", "artist_id", "explicit", "danceability", "energy", "key",
    "loudness", "mode", "speechiness", "acousticness", "instrumentalness", "liveness",
    "valence", "tempo", "duration_ms", "time_signature", "disc_number", "track_number",
)


@dataclass(frozen=True)
class Scale:
    """Sizes of one dataset: the catalog drawn, the playlists and their median length.

    albums or songs None means they are drawn artist by artist and album by album, as the
    demo always was; a number means the counts are drawn with the same shape, then fitted
    to exactly that total.
    """

    playlists: int
    artists: int
    albums: int | None
    songs: int | None
    median_length: float


# The original's catalog, and the Spotify Million Playlist Dataset. A lognormal median of
# 57.4 gives the Million Playlist mean of 66.3 songs per playlist after clipping to [5, 250].
SCALES = {
    "demo": Scale(playlists=3000, artists=2400, albums=None, songs=None, median_length=40.0),
    "full": Scale(playlists=305_000, artists=12_561, albums=22_152, songs=116_293,
                  median_length=57.4),
    "mpd": Scale(playlists=1_000_000, artists=295_860, albums=734_684, songs=2_262_292,
                 median_length=57.4),
}


class OptionError(ValueError):
    """An option the generator cannot honour; option names it, as the command line spells it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option

@dataclass(frozen=True)
class Genre:
    """Audio profile, popularity and naming vocabulary of one genre or mood."""

    name: str
    share: float
    clusters: tuple[str, ...]
    danceability: float
    energy: float
    speechiness: float
    acousticness: float
    instrumentalness: float
    liveness: float
    valence: float
    tempo: tuple[float, float]
    loudness: tuple[float, float]
    major_share: float
    explicit_share: float
    duration_s: float
    waltz_share: float
    playlist_names: tuple[str, ...]


GENRES: tuple[Genre, ...] = (
    Genre("indie folk", 0.07, ("acoustic", "indie"), 0.50, 0.35, 0.04, 0.75, 0.08, 0.15, 0.40,
          (112, 22), (-10.0, 3.0), 0.70, 0.03, 225, 0.12,
          ("rainy day folk", "cabin in the woods", "quiet mornings", "campfire songs",
           "sunday folk", "autumn walks", "coffee and vinyl")),
    Genre("indie rock", 0.09, ("indie", "guitar"), 0.50, 0.70, 0.05, 0.15, 0.10, 0.18, 0.45,
          (125, 25), (-6.5, 2.0), 0.65, 0.10, 230, 0.05,
          ("indie rock", "road trip", "garage days", "guitar heroes", "summer festival",
           "indie anthems", "college radio")),
    Genre("techno", 0.06, ("club",), 0.72, 0.82, 0.06, 0.03, 0.80, 0.12, 0.30,
          (128, 6), (-8.0, 2.0), 0.45, 0.02, 370, 0.01,
          ("techno", "warehouse", "after hours", "berlin nights", "deep focus techno",
           "running 130", "peak time")),
    Genre("hip hop", 0.13, ("urban",), 0.78, 0.65, 0.28, 0.12, 0.01, 0.18, 0.50,
          (98, 22), (-6.0, 2.0), 0.55, 0.80, 210, 0.02,
          ("gym bangers", "hip hop", "rap caviar-ish", "workout", "throwbacks", "bars",
           "car rides")),
    Genre("classical piano", 0.03, ("calm",), 0.30, 0.12, 0.04, 0.97, 0.88, 0.10, 0.25,
          (90, 25), (-23.0, 5.0), 0.55, 0.00, 300, 0.20,
          ("piano", "classical study", "peaceful piano", "reading", "nocturnes",
           "focus classical")),
    Genre("metal", 0.05, ("guitar",), 0.38, 0.93, 0.09, 0.01, 0.18, 0.22, 0.25,
          (135, 30), (-4.5, 1.5), 0.45, 0.25, 290, 0.04,
          ("metal", "heavy", "headbang", "lifting heavy", "riffs", "thrash it")),
    Genre("latin pop", 0.07, ("club", "party"), 0.75, 0.78, 0.09, 0.18, 0.01, 0.15, 0.72,
          (100, 22), (-5.0, 1.5), 0.55, 0.15, 205, 0.02,
          ("fiesta", "latin hits", "reggaeton-ish", "summer party", "verano", "baila")),
    Genre("ambient", 0.04, ("calm",), 0.22, 0.18, 0.04, 0.85, 0.85, 0.10, 0.12,
          (85, 25), (-20.0, 5.0), 0.55, 0.00, 330, 0.10,
          ("sleep", "ambient", "deep focus", "meditation", "drift off", "space")),
    Genre("jazz", 0.04, ("calm", "lounge"), 0.52, 0.32, 0.06, 0.75, 0.45, 0.30, 0.50,
          (110, 30), (-13.0, 4.0), 0.50, 0.00, 320, 0.15,
          ("late night jazz", "jazz", "dinner party", "smoky bar", "sunday brunch",
           "cool cats")),
    Genre("k-pop", 0.05, ("party", "pop"), 0.70, 0.82, 0.07, 0.10, 0.01, 0.15, 0.65,
          (120, 18), (-3.8, 1.2), 0.60, 0.05, 200, 0.01,
          ("k-pop", "kpop favs", "idol hits", "dance practice", "bias list")),
    Genre("country", 0.07, ("acoustic",), 0.58, 0.62, 0.04, 0.35, 0.01, 0.18, 0.60,
          (118, 25), (-6.5, 2.0), 0.85, 0.04, 200, 0.10,
          ("country", "back roads", "truck songs", "honky tonk", "country summer",
           "boots")),
    Genre("dance pop", 0.14, ("party", "pop"), 0.72, 0.75, 0.07, 0.12, 0.01, 0.14, 0.62,
          (118, 10), (-5.0, 1.5), 0.60, 0.20, 195, 0.01,
          ("pop", "party", "feel good", "pregame", "top hits", "dance", "girls night")),
    Genre("r&b", 0.08, ("urban", "lounge"), 0.65, 0.50, 0.10, 0.25, 0.02, 0.13, 0.45,
          (95, 22), (-7.0, 2.0), 0.50, 0.40, 220, 0.03,
          ("r&b", "slow jams", "late night vibes", "chill r&b", "bedroom", "smooth")),
    Genre("lo-fi beats", 0.06, ("calm", "urban"), 0.70, 0.35, 0.09, 0.60, 0.80, 0.11, 0.45,
          (82, 10), (-12.0, 3.0), 0.50, 0.00, 140, 0.02,
          ("lofi", "study", "beats to study to", "homework", "chill beats", "coding")),
)

ADJECTIVES = (
    "Velvet", "Silver", "Quiet", "Hollow", "Golden", "Electric", "Paper", "Crimson", "Wild",
    "Lonely", "Neon", "Broken", "Distant", "Northern", "Blue", "Amber", "Bitter", "Bright",
    "Cold", "Copper", "Faded", "Glass", "Gentle", "Heavy", "Hidden", "Iron", "Little",
    "Lucky", "Lunar", "Marble", "Mellow", "Pale", "Rusty", "Sacred", "Scarlet", "Secret",
    "Silent", "Slow", "Solar", "Static", "Stray", "Sweet", "Tender", "Violet", "Wandering",
    "Winter", "Young", "Restless", "Burning", "Endless", "Fragile", "Honest", "Open",
)
PLURAL_NOUNS = (
    "Harbors", "Lanterns", "Rivers", "Wolves", "Echoes", "Foxes", "Sparrows", "Pilots",
    "Ghosts", "Satellites", "Strangers", "Tides", "Rooms", "Engines", "Orchards", "Mirrors",
    "Dreamers", "Horses", "Sailors", "Machines", "Comets", "Lovers", "Saints", "Kites",
    "Giants", "Owls", "Signals", "Moths", "Cities", "Hearts", "Shadows", "Islands",
)
NOUNS = (
    "Harbor", "River", "Lantern", "Window", "Garden", "Morning", "Ocean", "Mountain",
    "Signal", "Engine", "Heart", "Fire", "Shadow", "Summer", "Highway", "City", "Island",
    "Mirror", "Letter", "Horizon", "Thunder", "Paradise", "Daylight", "Moon", "Rain",
    "Echo", "Ghost", "Kingdom", "Meadow", "Station", "Telephone", "Wildfire", "Orbit",
    "Satellite", "Lighthouse", "Memory", "Promise", "Secret", "Storm", "Tide", "Valley",
)
FIRST_NAMES = (
    "Mara", "Elias", "June", "Theo", "Nora", "Felix", "Ada", "Jonah", "Ivy", "Leo", "Clara",
    "Owen", "Stella", "Milo", "Rosa", "Silas", "Vera", "Hugo", "Lena", "Ezra", "Iris",
    "Jasper", "Maya", "Callum", "Tessa", "Rafael", "Noor", "Dario", "Sol", "Wren", "Kai",
    "Lucia", "Marco", "Yuna", "Hana", "Minji", "Tobias", "Greta", "Amara", "Dev", "Nico",
)
LAST_NAMES = (
    "Quinn", "Hale", "Mercer", "Vance", "Ashford", "Lark", "Calloway", "Ferris", "Holloway",
    "Reyes", "Delgado", "Park", "Moreau", "Brandt", "Sutter", "Whitlock", "Okafor",
    "Lindqvist", "Marsh", "Rowe", "Sterling", "Castell", "Navarro", "Kwon", "Yoon", "Abara",
    "Fenwick", "Ilves", "Carrow", "Dunmore", "Vidal", "Solano", "Hartley", "Brennan",
)
STAGE_PREFIXES = ("DJ", "MC", "Lil", "Young", "Big", "Kid")
TREES = (
    "Alder", "Maple", "Juniper", "Willow", "Cedar", "Hawthorne", "Birch", "Linden", "Rowan",
    "Aspen", "Elm", "Magnolia", "Sycamore", "Cypress",
)
TIMES = ("Midnight", "Sunday", "Morning", "Evening", "Summer", "Late Night", "Dawn", "Friday")
PLACES = ("Street", "Avenue", "Road", "Lane", "Station", "Park", "Bridge", "Hill")
VERBS = (
    "Chasing", "Burning", "Holding", "Leaving", "Dancing with", "Waiting for", "Calling",
    "Running from", "Dreaming of", "Finding", "Losing", "Following",
)
KEY_NAMES = ("C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B")
PIECE_FORMS = ("Nocturne", "Prelude", "Etude", "Impromptu", "Waltz", "Sonatina", "Reverie")
MIX_NAMES = ("Extended Mix", "Dub", "Original Mix", "Club Edit", "Night Version")
PLAYLIST_SUFFIXES = ("", "", "", "", " vol. 2", " 2024", " mix", " <3", " !!", " playlist")

KEY_WEIGHTS = np.array([11, 8, 10, 4, 8, 8, 6, 11, 6, 10, 5, 8], dtype=float)


def pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    """Return one word of a fixed list, drawn from the generator."""
    return words[int(rng.integers(len(words)))]


def draw(rng: np.random.Generator, cumulative: np.ndarray) -> int:
    """Draw one index with probability proportional to the increments of a cumulative sum."""
    index = int(cumulative.searchsorted(rng.random() * cumulative[-1], side="right"))
    return min(index, len(cumulative) - 1)


def artist_name(rng: np.random.Generator, genre: Genre) -> str:
    """Invent an artist or band name whose style fits the genre."""
    roll = rng.random()
    if genre.name in ("hip hop", "techno", "r&b") and roll < 0.35:
        return f"{pick(rng, STAGE_PREFIXES)} {pick(rng, NOUNS)}"
    if genre.name == "classical piano" and roll < 0.8:
        return f"{pick(rng, FIRST_NAMES)} {pick(rng, LAST_NAMES)}"
    if roll < 0.35:
        return f"The {pick(rng, ADJECTIVES)} {pick(rng, PLURAL_NOUNS)}"
    if roll < 0.7:
        return f"{pick(rng, FIRST_NAMES)} {pick(rng, LAST_NAMES)}"
    if roll < 0.8:
        return f"{pick(rng, FIRST_NAMES)} {pick(rng, LAST_NAMES)} & the {pick(rng, PLURAL_NOUNS)}"
    if roll < 0.9:
        return f"{pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"
    return f"{pick(rng, NOUNS)}{pick(rng, NOUNS).lower()}"


def album_name(rng: np.random.Generator, genre: Genre, n_tracks: int) -> str:
    """Invent an album (or single) title."""
    roll = rng.random()
    if genre.name == "classical piano" and roll < 0.5:
        return f"{pick(rng, PIECE_FORMS)}s, Vol. {int(rng.integers(1, 6))}"
    if n_tracks > 6 and roll < 0.08:
        return f"Live at the {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"
    if roll < 0.3:
        return f"{pick(rng, ADJECTIVES)} {pick(rng, PLURAL_NOUNS)}"
    if roll < 0.5:
        return f"{pick(rng, NOUNS)} & {pick(rng, NOUNS)}"
    if roll < 0.65:
        return f"Songs from the {pick(rng, NOUNS)}"
    if roll < 0.85:
        return pick(rng, NOUNS)
    return f"The {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"


def song_name(rng: np.random.Generator, genre: Genre) -> str:
    """Invent a song title, with genre-specific forms for piano pieces and club tracks."""
    roll = rng.random()
    if genre.name == "classical piano" and roll < 0.6:
        mode = "major" if rng.random() < 0.5 else "minor"
        number = int(rng.integers(1, 25))
        return f"{pick(rng, PIECE_FORMS)} No. {number} in {pick(rng, KEY_NAMES)} {mode}"
    if genre.name == "techno" and roll < 0.3:
        return f"{pick(rng, NOUNS)} ({pick(rng, MIX_NAMES)})"
    if roll < 0.15:
        return f"{pick(rng, TIMES)} on {pick(rng, TREES)} {pick(rng, PLACES)}"
    if roll < 0.35:
        return f"{pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"
    if roll < 0.5:
        return f"{pick(rng, VERBS)} the {pick(rng, NOUNS)}"
    if roll < 0.62:
        return f"{pick(rng, NOUNS)} of {pick(rng, PLURAL_NOUNS)}"
    if roll < 0.75:
        return pick(rng, NOUNS)
    if roll < 0.85:
        return f"The {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)}"
    return f"{pick(rng, VERBS)} {pick(rng, FIRST_NAMES)}"


def playlist_name(rng: np.random.Generator, themes: Sequence[int]) -> str:
    """Invent a lowercase playlist title from its main theme, sometimes naming a second one."""
    main = GENRES[themes[0]]
    if len(themes) > 1 and rng.random() < 0.2:
        return f"{main.name} + {GENRES[themes[1]].name}"
    return pick(rng, main.playlist_names) + pick(rng, PLAYLIST_SUFFIXES)


def gappy_ids(rng: np.random.Generator, count: int, start: int, max_gap: int) -> np.ndarray:
    """Return increasing catalog ids from start with random gaps, never model-index-like."""
    return start + np.cumsum(rng.integers(1, max_gap + 1, size=count)) - 1


def genre_affinity() -> np.ndarray:
    """Return how likely two genres share a playlist: high when they share a cluster."""
    size = len(GENRES)
    affinity = np.full((size, size), 0.15)
    for first in range(size):
        for second in range(size):
            if set(GENRES[first].clusters) & set(GENRES[second].clusters):
                affinity[first, second] = 1.0
    np.fill_diagonal(affinity, 0.0)
    return affinity


@dataclass
class Catalog:
    """The generated catalog as parallel arrays; song arrays are in album/disc/track order."""

    artist_ids: np.ndarray
    artist_names: list[str]
    artist_genre: np.ndarray
    artist_second_genre: np.ndarray
    artist_popularity: np.ndarray
    album_ids: np.ndarray
    album_names: list[str]
    album_artist: np.ndarray
    album_genre: np.ndarray
    album_year: np.ndarray
    song_ids: np.ndarray
    song_names: list[str]
    song_album: np.ndarray
    song_popularity: np.ndarray
    song_disc: np.ndarray
    song_track: np.ndarray
    features: dict[str, np.ndarray]


def make_artists(
    rng: np.random.Generator, n_artists: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw each artist's main genre, optional second genre and Zipf-like popularity."""
    shares = np.array([genre.share for genre in GENRES])
    artist_genre_p = shares**0.6 / np.sum(shares**0.6)
    main = rng.choice(len(GENRES), size=n_artists, p=artist_genre_p)
    affinity = genre_affinity()
    second = np.full(n_artists, -1)
    for artist in range(n_artists):
        if rng.random() < 0.2:
            weights = affinity[main[artist]] * shares
            second[artist] = rng.choice(len(GENRES), p=weights / weights.sum())
    ranks = rng.permutation(n_artists) + 1
    popularity = ranks.astype(float) ** -0.7
    return main, second, popularity


def unique_artist_name(
    rng: np.random.Generator, genre: Genre, taken: set[str], numbered: dict[str, int]
) -> str:
    """Draw an artist name not yet taken; once the name space runs dry, number a variant.

    The word lists hold about 50,000 names, fewer than a Million-Playlist-size catalog needs.
    """
    name = artist_name(rng, genre)
    for _ in range(NAME_TRIES):
        if name not in taken:
            return name
        name = artist_name(rng, genre)
    number = numbered.get(name, 1)
    variant = name
    while variant in taken:
        number += 1
        variant = f"{name} ({number})"
    numbered[name] = number
    return variant


def fit_total(rng: np.random.Generator, counts: np.ndarray, total: int) -> np.ndarray:
    """Add or remove single units at random, in proportion to size, until counts sum to total.

    Every count stays at least 1, so total must be at least counts.size.
    """
    counts = counts.astype(np.int64)
    while (gap := total - int(counts.sum())) != 0:
        weights = counts if gap > 0 else counts - 1
        picks = rng.choice(counts.size, size=abs(gap), p=weights / weights.sum())
        change = np.bincount(picks, minlength=counts.size)
        counts = counts + change if gap > 0 else counts - np.minimum(change, counts - 1)
    return counts


def plan_albums(
    rng: np.random.Generator, scale: Scale, pop_quantile: np.ndarray
) -> np.ndarray | None:
    """Albums per artist when a total is asked for; None: drawn artist by artist (the demo).

    The demo's shape, 1 + Poisson(0.2 + 2 q^3) for popularity quantile q, is scaled to the
    asked mean; with only --songs given the demo's counts are kept (capped by --songs).
    """
    extra = 0.2 + 2.0 * pop_quantile**3
    if scale.albums is not None:
        extra *= (scale.albums / scale.artists - 1.0) / extra.mean()
        return fit_total(rng, 1 + rng.poisson(extra), scale.albums)
    if scale.songs is not None:
        counts = np.minimum(5, 1 + rng.poisson(extra))
        return fit_total(rng, counts, min(int(counts.sum()), scale.songs))
    return None


def plan_tracks(rng: np.random.Generator, scale: Scale, n_albums: int) -> np.ndarray | None:
    """Tracks per album when --songs is given; None: drawn album by album (the demo).

    Singles, EPs and LPs keep the demo's ratio of singles to EPs; the LP share moves so the
    mean matches songs / albums, and the fit makes the total exact.
    """
    if scale.songs is None:
        return None
    single, ep = KIND_BOUNDS[0], KIND_BOUNDS[1] - KIND_BOUNDS[0]
    short_mean = (single + ep * EP_MEAN) / (single + ep)
    lp = float(np.clip((scale.songs / n_albums - short_mean) / (LP_MEAN - short_mean), 0, 1))
    p = np.array([single, ep]) / (single + ep) * (1.0 - lp)
    kind = rng.choice(3, size=n_albums, p=[p[0], p[1], lp])
    counts = np.where(kind == 0, 1, np.where(kind == 1, rng.integers(2, 5, size=n_albums),
                                            rng.integers(6, 17, size=n_albums)))
    return fit_total(rng, counts, scale.songs)


def draw_tracks(rng: np.random.Generator) -> int:
    """Draw one album's track count: a single, an EP of 2-4 or an LP of 6-16 tracks."""
    kind = rng.random()
    if kind < KIND_BOUNDS[0]:
        return 1
    if kind < KIND_BOUNDS[1]:
        return int(rng.integers(2, 5))
    return int(rng.integers(6, 17))


def make_catalog(rng: np.random.Generator, scale: Scale) -> Catalog:
    """Build artists, their albums and the songs of each album, with audio features."""
    n_artists = scale.artists
    artist_genre, artist_second, artist_pop = make_artists(rng, n_artists)
    artist_names: list[str] = []
    taken: set[str] = set()
    numbered: dict[str, int] = {}
    for artist in range(n_artists):
        name = unique_artist_name(rng, GENRES[artist_genre[artist]], taken, numbered)
        taken.add(name)
        artist_names.append(name)
    artist_start = np.clip(rng.normal(2005, 12, size=n_artists), 1960, 2022).astype(int)
    pop_quantile = np.argsort(np.argsort(artist_pop)) / (n_artists - 1)
    albums_per_artist = plan_albums(rng, scale, pop_quantile)
    tracks_per_album = (None if albums_per_artist is None
                        else plan_tracks(rng, scale, int(albums_per_artist.sum())))

    album_artist: list[int] = []
    album_genre: list[int] = []
    album_year: list[int] = []
    album_names: list[str] = []
    album_factor: list[float] = []
    song_album: list[int] = []
    song_disc: list[int] = []
    song_track: list[int] = []
    song_factor: list[float] = []
    for artist in range(n_artists):
        if albums_per_artist is None:
            n_albums = min(5, 1 + int(rng.poisson(0.2 + 2.0 * pop_quantile[artist] ** 3)))
        else:
            n_albums = int(albums_per_artist[artist])
        year = int(artist_start[artist])
        for _ in range(n_albums):
            genre = int(artist_genre[artist])
            if artist_second[artist] >= 0 and rng.random() < 0.3:
                genre = int(artist_second[artist])
            album = len(album_artist)
            n_tracks = (draw_tracks(rng) if tracks_per_album is None
                        else int(tracks_per_album[album]))
            album_artist.append(artist)
            album_genre.append(genre)
            album_year.append(min(year, 2025))
            album_names.append(album_name(rng, GENRES[genre], n_tracks))
            album_factor.append(float(rng.lognormal(0.0, 0.6)))
            two_discs = n_tracks >= 14 and rng.random() < 0.15
            first_disc_size = (n_tracks + 1) // 2 if two_discs else n_tracks
            hits = set(rng.choice(n_tracks, size=min(n_tracks, 2), replace=False).tolist())
            for position in range(n_tracks):
                disc = 1 if position < first_disc_size else 2
                song_album.append(album)
                song_disc.append(disc)
                song_track.append(position + 1 if disc == 1 else position - first_disc_size + 1)
                hit = 3.0 if position in hits or n_tracks == 1 else 1.0
                song_factor.append(hit * float(rng.lognormal(0.0, 0.7)) / (1 + 0.05 * position))
            year += int(rng.integers(1, 5))

    album_artist_arr = np.array(album_artist)
    album_genre_arr = np.array(album_genre)
    song_album_arr = np.array(song_album)
    song_popularity = (
        artist_pop[album_artist_arr[song_album_arr]]
        * np.array(album_factor)[song_album_arr]
        * np.array(song_factor)
    )
    features = make_features(rng, artist_genre.size, album_artist_arr, album_genre_arr,
                             song_album_arr)
    song_genre = album_genre_arr[song_album_arr]
    song_names = [song_name(rng, GENRES[genre]) for genre in song_genre]
    return Catalog(
        artist_ids=gappy_ids(rng, n_artists, 5000, 9),
        artist_names=artist_names,
        artist_genre=artist_genre,
        artist_second_genre=artist_second,
        artist_popularity=artist_pop,
        album_ids=gappy_ids(rng, len(album_artist), 200_000, 12),
        album_names=album_names,
        album_artist=album_artist_arr,
        album_genre=album_genre_arr,
        album_year=np.array(album_year),
        song_ids=gappy_ids(rng, song_album_arr.size, 1_000_000, 40),
        song_names=song_names,
        song_album=song_album_arr,
        song_popularity=song_popularity,
        song_disc=np.array(song_disc),
        song_track=np.array(song_track),
        features=features,
    )


def make_features(
    rng: np.random.Generator,
    n_artists: int,
    album_artist: np.ndarray,
    album_genre: np.ndarray,
    song_album: np.ndarray,
) -> dict[str, np.ndarray]:
    """Draw audio features as genre profile + artist offset + album offset + song noise."""
    n_songs = song_album.size
    song_genre = album_genre[song_album]
    song_artist = album_artist[song_album]
    features: dict[str, np.ndarray] = {}
    for feature in UNIT_FEATURES:
        profile = np.array([getattr(genre, feature) for genre in GENRES])
        artist_offset = rng.normal(0.0, 0.08, size=n_artists)
        album_offset = rng.normal(0.0, 0.04, size=album_genre.size)
        noise = rng.normal(0.0, 0.09, size=n_songs)
        value = profile[song_genre] + artist_offset[song_artist] + album_offset[song_album]
        features[feature] = np.clip(value + noise, 0.0, 1.0)
    features["speechiness"] = np.maximum(features["speechiness"], 0.022)

    tempo_mean = np.array([genre.tempo[0] for genre in GENRES])
    tempo_sd = np.array([genre.tempo[1] for genre in GENRES])
    artist_tempo = rng.normal(0.0, 6.0, size=n_artists)
    features["tempo"] = np.clip(
        tempo_mean[song_genre] + artist_tempo[song_artist]
        + rng.normal(0.0, 1.0, size=n_songs) * tempo_sd[song_genre],
        50.0, 220.0,
    )
    loud_mean = np.array([genre.loudness[0] for genre in GENRES])
    loud_sd = np.array([genre.loudness[1] for genre in GENRES])
    artist_loud = rng.normal(0.0, 1.5, size=n_artists)
    features["loudness"] = np.clip(
        loud_mean[song_genre] + artist_loud[song_artist]
        + rng.normal(0.0, 1.0, size=n_songs) * loud_sd[song_genre],
        -35.0, -0.5,
    )
    major = np.array([genre.major_share for genre in GENRES])
    features["mode"] = (rng.random(n_songs) < major[song_genre]).astype(int)
    explicit_share = np.array([genre.explicit_share for genre in GENRES])
    artist_explicit = rng.normal(0.0, 0.15, size=n_artists)
    explicit_p = np.clip(explicit_share[song_genre] + artist_explicit[song_artist], 0.0, 1.0)
    explicit_p[explicit_share[song_genre] == 0.0] = 0.0
    features["explicit"] = (rng.random(n_songs) < explicit_p).astype(int)
    features["key"] = rng.choice(12, size=n_songs, p=KEY_WEIGHTS / KEY_WEIGHTS.sum())
    duration = np.array([genre.duration_s for genre in GENRES])
    artist_duration = rng.lognormal(0.0, 0.1, size=n_artists)
    seconds = (
        duration[song_genre] * artist_duration[song_artist]
        * rng.lognormal(0.0, 0.22, size=n_songs)
    )
    features["duration_ms"] = np.round(np.clip(seconds, 45.0, 1500.0) * 1000).astype(int)
    waltz = np.array([genre.waltz_share for genre in GENRES])
    roll = rng.random(n_songs)
    signature = np.full(n_songs, 4)
    signature[roll < waltz[song_genre]] = 3
    odd = rng.random(n_songs)
    signature[odd < 0.012] = 5
    signature[odd < 0.005] = 1
    signature[odd < 0.002] = 7
    features["time_signature"] = signature
    return features


@dataclass
class Pools:
    """Precomputed sampling tables: songs, albums and artists per genre, songs per artist."""

    genre_songs: list[np.ndarray]
    genre_song_cdf: list[np.ndarray]
    genre_albums: list[np.ndarray]
    genre_album_cdf: list[np.ndarray]
    genre_artists: list[np.ndarray]
    genre_artist_cdf: list[np.ndarray]
    artist_songs: list[np.ndarray]
    artist_song_cdf: list[np.ndarray]
    artist_albums: list[np.ndarray]
    artist_album_cdf: list[np.ndarray]
    album_songs: list[np.ndarray]


def make_pools(catalog: Catalog) -> Pools:
    """Index the catalog for fast popularity-weighted draws while generating playlists.

    Songs are stored album by album and albums artist by artist, so every per-album and
    per-artist list is a contiguous range found by one search, not a scan per entry.
    """
    n_albums = catalog.album_ids.size
    n_artists = catalog.artist_ids.size
    song_genre = catalog.album_genre[catalog.song_album]
    album_bounds = np.searchsorted(catalog.song_album, np.arange(n_albums + 1))
    album_songs = [np.arange(album_bounds[a], album_bounds[a + 1]) for a in range(n_albums)]
    album_pop = np.array([catalog.song_popularity[songs].sum() for songs in album_songs])
    album_size = np.diff(album_bounds)
    song_artist = catalog.album_artist[catalog.song_album]
    order = np.argsort(song_artist, kind="stable")
    bounds = np.searchsorted(song_artist[order], np.arange(n_artists + 1))
    artist_songs = [order[bounds[a]:bounds[a + 1]] for a in range(n_artists)]
    multi_track = np.flatnonzero(album_size > 1)
    artist_albums = np.split(multi_track, np.searchsorted(catalog.album_artist[multi_track],
                                                          np.arange(1, n_artists)))

    genre_songs, genre_albums, genre_artists = [], [], []
    for genre in range(len(GENRES)):
        genre_songs.append(np.flatnonzero(song_genre == genre))
        genre_albums.append(np.flatnonzero((catalog.album_genre == genre) & (album_size > 1)))
        members = (catalog.artist_genre == genre) | (catalog.artist_second_genre == genre)
        genre_artists.append(np.flatnonzero(members))
    for profile, albums in zip(GENRES, genre_albums, strict=True):
        if not albums.size or album_size[albums].max() < 3:
            raise OptionError("--artists", f"the catalog is too small: genre {profile.name!r} "
                              "has no album of three or more tracks; ask for more artists, "
                              "albums or songs")
    return Pools(
        genre_songs=genre_songs,
        genre_song_cdf=[np.cumsum(catalog.song_popularity[s]) for s in genre_songs],
        genre_albums=genre_albums,
        genre_album_cdf=[np.cumsum(album_pop[a]) for a in genre_albums],
        genre_artists=genre_artists,
        genre_artist_cdf=[np.cumsum(catalog.artist_popularity[a] ** 0.5) for a in genre_artists],
        artist_songs=artist_songs,
        artist_song_cdf=[np.cumsum(catalog.song_popularity[s] ** 0.5) for s in artist_songs],
        artist_albums=artist_albums,
        artist_album_cdf=[np.cumsum(album_pop[a] ** 0.5) for a in artist_albums],
        album_songs=album_songs,
    )


def choose_themes(rng: np.random.Generator, affinity: np.ndarray) -> list[int]:
    """Pick 1–3 genre themes: the first by popularity, the others favoring related genres."""
    shares = np.array([genre.share for genre in GENRES])
    n_themes = int(rng.choice(3, p=[0.4, 0.4, 0.2])) + 1
    themes = [int(rng.choice(len(GENRES), p=shares / shares.sum()))]
    while len(themes) < n_themes:
        weights = shares * affinity[themes].mean(axis=0)
        weights[themes] = 0.0
        themes.append(int(rng.choice(len(GENRES), p=weights / weights.sum())))
    return themes


def album_run(rng: np.random.Generator, pools: Pools, album: int) -> list[int]:
    """Return 2–5 consecutive tracks of an album, usually in track order."""
    tracks = pools.album_songs[album]
    length = min(tracks.size, int(rng.integers(2, 6)))
    start = int(rng.integers(tracks.size - length + 1))
    run = tracks[start:start + length].tolist()
    if rng.random() < 0.5:
        run = [run[i] for i in rng.permutation(length)]
    return run


def theme_run(
    rng: np.random.Generator, pools: Pools, genre: int, core_artists: list[int]
) -> list[int]:
    """Return the next run of songs for a theme: an album run, an artist run or one song."""
    use_core = rng.random() < 0.7
    artist = core_artists[int(rng.integers(len(core_artists)))]
    kind = rng.random()
    if kind < 0.08:
        if use_core and pools.artist_albums[artist].size:
            album = pools.artist_albums[artist][draw(rng, pools.artist_album_cdf[artist])]
        else:
            album = pools.genre_albums[genre][draw(rng, pools.genre_album_cdf[genre])]
        return album_run(rng, pools, int(album))
    if kind < 0.25 and use_core:
        length = int(rng.integers(2, 5))
        cdf = pools.artist_song_cdf[artist]
        return [int(pools.artist_songs[artist][draw(rng, cdf)]) for _ in range(length)]
    if use_core:
        return [int(pools.artist_songs[artist][draw(rng, pools.artist_song_cdf[artist])])]
    return [int(pools.genre_songs[genre][draw(rng, pools.genre_song_cdf[genre])])]


def make_playlist(
    rng: np.random.Generator, pools: Pools, themes: list[int], length: int
) -> list[int]:
    """Generate one playlist: fixed themes with core artists, drifting between themes."""
    core: list[list[int]] = []
    for genre in themes:
        wanted = min(1 + int(rng.poisson(2.5)), pools.genre_artists[genre].size)
        chosen: list[int] = []
        while len(chosen) < wanted:
            artist = int(pools.genre_artists[genre][draw(rng, pools.genre_artist_cdf[genre])])
            if artist not in chosen:
                chosen.append(artist)
        core.append(chosen)
    theme_weights = rng.dirichlet(np.full(len(themes), 2.0))
    current = 0
    songs: list[int] = []
    seen: set[int] = set()
    attempts = 0
    while len(songs) < length and attempts < 50 * length:
        attempts += 1
        for song in theme_run(rng, pools, themes[current], core[current]):
            if song not in seen and len(songs) < length:
                seen.add(song)
                songs.append(song)
        if len(themes) > 1 and rng.random() < 0.18:
            weights = theme_weights.copy()
            weights[current] = 0.0
            current = int(rng.choice(len(themes), p=weights / weights.sum()))
    return songs


class Progress:
    """Progress of one long step on stderr: redrawn in place on a terminal, else plain lines.

    Plain lines come at every tenth of the total, so a log file gets ten, not thousands.
    """

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.perf_counter()
        self.terminal = sys.stderr.isatty()
        self.next_tenth = 1

    def update(self, done: int) -> None:
        """Report that done of total are finished."""
        line = (f"{self.label}: {done:,}/{self.total:,} ({100 * done // self.total}%) "
                f"{time.perf_counter() - self.started:.0f} s")
        if self.terminal:
            print(f"\r{line}", end="" if done < self.total else "\n", file=sys.stderr, flush=True)
        elif done * 10 >= self.next_tenth * self.total:
            print(line, file=sys.stderr, flush=True)
            self.next_tenth = done * 10 // self.total + 1


class Spool:
    """Playlists as they are made, kept on disk: song indices (int32) in one file, names in another.

    The playlist ids are drawn after the last playlist (the demo's draw order), so the rows
    are written in a second pass; memory holds one chunk of rows and one length per playlist.
    """

    def __init__(self, folder: Path, n_playlists: int, n_songs: int, chunk_rows: int) -> None:
        self.songs_path = folder / "playlist_songs.i32"
        self.names_path = folder / "playlist_names.txt"
        self.chunk_rows = chunk_rows
        self.lengths = np.zeros(n_playlists, dtype=np.int64)
        self.used = np.zeros(n_songs, dtype=bool)
        self.count = 0
        self._songs: list[int] = []
        self._names: list[str] = []
        self._songs_file = self.songs_path.open("wb")
        self._names_file = self.names_path.open("w", encoding="utf-8", newline="\n")

    def add(self, songs: list[int], name: str) -> None:
        """Append one playlist; write the buffered ones out once a chunk of rows is full."""
        self.lengths[self.count] = len(songs)
        self.count += 1
        self._songs.extend(songs)
        self._names.append(name)
        if len(self._songs) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered playlists to the files and mark their songs as used."""
        chunk = np.array(self._songs, dtype=np.int32)
        self.used[chunk] = True
        chunk.tofile(self._songs_file)
        self._names_file.write("".join(f"{name}\n" for name in self._names))
        self._songs.clear()
        self._names.clear()

    def close(self) -> None:
        """Write what is buffered and close both files."""
        self.flush()
        self._songs_file.close()
        self._names_file.close()

    def names(self) -> Iterator[str]:
        """The playlist names in order."""
        with self.names_path.open(encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line.removesuffix("\n")

    def song_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, song indices) of chunk_rows rows at a time, cutting across playlists."""
        total = int(self.lengths.sum())
        for start in range(0, total, self.chunk_rows):
            count = min(self.chunk_rows, total - start)
            yield start, np.fromfile(self.songs_path, dtype=np.int32, count=count,
                                     offset=start * 4)


def make_playlists(rng: np.random.Generator, pools: Pools, scale: Scale, spool: Spool) -> None:
    """Generate every playlist into the spool, lengths lognormal (a few long-tailed) in [5, 250]."""
    affinity = genre_affinity()
    spread = np.where(rng.random(scale.playlists) < 0.08, 1.0, 0.5)
    lengths = np.clip(np.round(rng.lognormal(np.log(scale.median_length), spread)), 5, 250)
    progress = Progress("playlists", scale.playlists)
    for done, length in enumerate(lengths.astype(int).tolist(), start=1):
        themes = choose_themes(rng, affinity)
        songs = make_playlist(rng, pools, themes, length)
        spool.add(songs, playlist_name(rng, themes))
        if done % 1000 == 0 or done == scale.playlists:
            progress.update(done)
    spool.close()


def has_album_run(songs: list[int], song_album: np.ndarray, run_length: int) -> bool:
    """Tell whether the list holds run_length consecutive tracks of one album, in order.

    Song indices follow album, disc and track order, so the next track is the next index.
    """
    streak = 1
    for previous, song in itertools.pairwise(songs):
        in_order = song == previous + 1 and song_album[song] == song_album[previous]
        streak = streak + 1 if in_order else 1
        if streak >= run_length:
            return True
    return False


def make_sequence(rng: np.random.Generator, pools: Pools, catalog: Catalog) -> list[int]:
    """Generate the demo's seed playlist: one theme, with an in-order album run of three."""
    genre = [genre.name for genre in GENRES].index(SEQUENCE_GENRE)
    songs = make_playlist(rng, pools, [genre], SEQUENCE_LENGTH)
    while not has_album_run(songs, catalog.song_album, 3):
        songs = make_playlist(rng, pools, [genre], SEQUENCE_LENGTH)
    return songs


def song_row(catalog: Catalog, song: int) -> list[str]:
    """Format one song as CSV fields with fixed decimals per column."""
    features = catalog.features
    album = int(catalog.song_album[song])
    unit = {name: f"{features[name][song]:.4f}" for name in UNIT_FEATURES}
    return [
        str(catalog.song_ids[song]),
        catalog.song_names[song],
        str(catalog.album_ids[album]),
        str(catalog.artist_ids[catalog.album_artist[album]]),
        str(features["explicit"][song]),
        unit["danceability"],
        unit["energy"],
        str(features["key"][song]),
        f"{features['loudness'][song]:.2f}",
        str(features["mode"][song]),
        unit["speechiness"],
        unit["acousticness"],
        unit["instrumentalness"],
        unit["liveness"],
        unit["valence"],
        f"{features['tempo'][song]:.3f}",
        str(features["duration_ms"][song]),
        str(features["time_signature"][song]),
        str(catalog.song_disc[song]),
        str(catalog.song_track[song]),
    ]

Rows = list[Sequence[Any]]
TableChunks = tuple[str, Sequence[str], Iterator[Rows]]


def batched(rows: Iterable[Sequence[Any]], size: int) -> Iterator[Rows]:
    """Cut an iterable of rows into lists of at most size rows."""
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def table_chunks(
    catalog: Catalog, spool: Spool, playlist_ids: np.ndarray, chunk_rows: int
) -> list[TableChunks]:
    """The five tables as lazy chunks of CSV rows, keeping only songs that occur (and their
    albums and artists), in the order a database with foreign keys must load them."""
    kept_songs = np.flatnonzero(spool.used)
    kept_albums = np.unique(catalog.song_album[kept_songs])
    kept_artists = np.unique(catalog.album_artist[kept_albums])
    artists = (
        [str(catalog.artist_ids[a]), catalog.artist_names[a], GENRES[catalog.artist_genre[a]].name]
        for a in kept_artists
    )
    albums = (
        [str(catalog.album_ids[a]), catalog.album_names[a],
         str(catalog.artist_ids[catalog.album_artist[a]]), str(catalog.album_year[a])]
        for a in kept_albums
    )
    songs = (song_row(catalog, s) for s in kept_songs.tolist())
    playlists = zip(playlist_ids.tolist(), spool.names(), strict=True)
    return [
        ("artists", ("artist_id", "name", "genre"), batched(artists, chunk_rows)),
        ("albums", ("album_id", "name", "artist_id", "release_year"), batched(albums, chunk_rows)),
        ("songs", SONG_COLUMNS, batched(songs, chunk_rows)),
        ("playlists", ("playlist_id", "name"), batched(playlists, chunk_rows)),
        ("playlist_songs", ("playlist_id", "pos", "song_id"),
         playlist_song_chunks(catalog, spool, playlist_ids)),
    ]


def playlist_song_chunks(
    catalog: Catalog, spool: Spool, playlist_ids: np.ndarray
) -> Iterator[Rows]:
    """(playlist_id, pos, song_id) rows, chunk by chunk; a chunk may end inside a playlist."""
    offsets = np.concatenate(([0], np.cumsum(spool.lengths)))
    for start, songs in spool.song_chunks():
        rows = np.arange(start, start + songs.size)
        owner = np.searchsorted(offsets, rows, side="right") - 1
        yield list(zip(playlist_ids[owner].tolist(), (rows - offsets[owner]).tolist(),
                       catalog.song_ids[songs].tolist(), strict=True))


class Tables(Protocol):
    """Where the tables go: CSV files or a database."""

    def write(self, table: str, columns: Sequence[str], chunks: Iterable[Rows]) -> int:
        """Write one table from its chunks of rows; return the number of rows."""
        ...


class CsvTables:
    """Each table as DIR/<table>.csv: UTF-8, a header row, Unix line endings.

    A file is written under a .partial name and renamed when complete, so an interrupted
    run never leaves a truncated table under the real name.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: str, columns: Sequence[str], chunks: Iterable[Rows]) -> int:
        """Write one table's file from its chunks of rows; return the number of rows."""
        path = self.folder / f"{table}.csv"
        partial = path.with_name(f"{path.name}.partial")
        count = 0
        with partial.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(columns)
            for rows in chunks:
                writer.writerows(rows)
                count += len(rows)
        partial.replace(path)
        return count


class CopyTables:
    """Each table COPYed, chunk by chunk, through a cursor whose transaction the caller owns."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def write(self, table: str, columns: Sequence[str], chunks: Iterable[Rows]) -> int:
        """COPY one table from its chunks of rows (the CSV bytes the files hold); return rows."""
        statement = sql.SQL(sql_text("generate_copy")).format(
            table=sql.Identifier(table), columns=sql.SQL(", ").join(map(sql.Identifier, columns)))
        count = 0
        for rows in chunks:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(rows)
            buffer.seek(0)
            self.cursor.copy_expert(statement, buffer)
            count += len(rows)
        return count


def write_tables(tables: Tables, chunks: Iterable[TableChunks]) -> dict[str, int]:
    """Write every table, printing one line per table; return the rows per table."""
    counts = {}
    for table, columns, rows in chunks:
        started = time.perf_counter()
        counts[table] = tables.write(table, columns, rows)
        print(f"{table}: {counts[table]:,} rows written in {time.perf_counter() - started:.1f} s",
              flush=True)
    return counts


def open_database(dsn: str) -> Any:
    """Connect, create the schema of sql/schema.sql if missing (safe to repeat) and check that
    the five tables are empty, before any time is spent generating."""
    connection = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql_text("schema"))
            ensure_empty(cursor)
    except BaseException:
        connection.close()
        raise
    return connection


def ensure_empty(cursor: Any) -> None:
    """Refuse to add generated rows to tables that already hold some."""
    for table in TABLES:
        cursor.execute(sql.SQL(sql_text("generate_table_has_rows")).format(
            table=sql.Identifier(table)))
        if cursor.fetchone()[0]:
            raise OptionError("--database", f"table {table} already holds rows; generate into "
                              "a database whose catalog tables are empty")


def defer_checks(cursor: Any) -> list[sql.Composable]:
    """Drop the foreign keys and non-unique indexes of the five tables; return their rebuild.

    Checked row by row, 20M foreign-key lookups cost minutes; one validating join and one
    sorted index build afterwards cost seconds. The caller's transaction keeps this atomic.
    """
    drops: list[sql.Composable] = []
    rebuild: list[sql.Composable] = []
    indexes: list[sql.Composable] = []
    for table in TABLES:
        name = sql.Identifier(table)
        cursor.execute(sql_text("generate_foreign_keys"), {"table": table})
        for constraint, definition in cursor.fetchall():
            drops.append(sql.SQL(sql_text("generate_drop_constraint")).format(
                table=name, name=sql.Identifier(constraint)))
            rebuild.append(sql.SQL(sql_text("generate_add_constraint")).format(
                table=name, name=sql.Identifier(constraint), definition=sql.SQL(definition)))
        cursor.execute(sql_text("generate_plain_indexes"), {"table": table})
        for index, definition in cursor.fetchall():
            drops.append(sql.SQL(sql_text("generate_drop_index")).format(
                name=sql.Identifier(index)))
            indexes.append(sql.SQL(definition))
    for statement in drops:
        cursor.execute(statement)
    return indexes + rebuild


def load_database(connection: Any, chunks: Iterable[TableChunks]) -> dict[str, int]:
    """COPY every table in one transaction: a failure rolls all of it back, so no table is
    ever seen half loaded, and running again after a failure starts from empty tables."""
    with connection, connection.cursor() as cursor:
        rebuild = defer_checks(cursor)
        ensure_empty(cursor)
        counts = write_tables(CopyTables(cursor), chunks)
        started = time.perf_counter()
        for statement in rebuild:
            cursor.execute(statement)
        for table in TABLES:
            cursor.execute(sql.SQL(sql_text("analyze")).format(
                table=sql.Identifier(table)))
        print(f"indexes and foreign keys: rebuilt and checked in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    return counts


def check_scale(scale: Scale, chunk_rows: int) -> None:
    """Refuse sizes the process cannot make, naming the option at fault."""
    if scale.artists < len(GENRES):
        raise OptionError("--artists", f"must be at least {len(GENRES)} (an artist per "
                          f"genre), got {scale.artists}")
    if scale.albums is not None and scale.albums < scale.artists:
        raise OptionError("--albums", f"must be at least --artists ({scale.artists:,}): every "
                          f"artist has an album, got {scale.albums:,}")
    if scale.songs is not None and scale.songs < (scale.albums or scale.artists):
        floor = "--albums" if scale.albums is not None else "--artists"
        raise OptionError("--songs", f"must be at least {floor} "
                          f"({scale.albums or scale.artists:,}): every album has a song, "
                          f"got {scale.songs:,}")
    if chunk_rows < 1:
        raise OptionError("--chunk-rows", f"must be at least 1, got {chunk_rows}")


def generate(
    scale: Scale,
    seed: int = DEFAULT_SEED,
    out: Path | None = None,
    database: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Generate every table from one seed into the folder out or the database (one of them).

    The same seed and sizes give the same rows whatever chunk_rows and wherever they go;
    the demo sizes and seed give the committed demo files byte for byte. Returns the rows
    per table and the seconds per step.
    """
    if (out is None) == (database is None):
        raise ValueError("give exactly one of out and database")
    check_scale(scale, chunk_rows)
    started = time.perf_counter()
    connection = open_database(database) if database is not None else None
    seconds: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="b4mr-generate-") as folder:
            rng = np.random.default_rng(seed)
            catalog = make_catalog(rng, scale)
            pools = make_pools(catalog)
            seconds["catalog"] = time.perf_counter() - started
            print(f"catalog: {catalog.artist_ids.size:,} artists, {catalog.album_ids.size:,} "
                  f"albums, {catalog.song_ids.size:,} songs drawn in {seconds['catalog']:.1f} s",
                  flush=True)
            spool = Spool(Path(folder), scale.playlists, catalog.song_ids.size, chunk_rows)
            make_playlists(rng, pools, scale, spool)
            playlist_ids = gappy_ids(rng, scale.playlists, 1, 4)
            sequence = make_sequence(rng, pools, catalog)
            spool.used[sequence] = True
            seconds["playlists"] = time.perf_counter() - started - seconds["catalog"]
            print(f"generated: {scale.playlists:,} playlists, {int(spool.lengths.sum()):,} entries "
                  f"in {seconds['playlists']:.1f} s", flush=True)
            chunks = table_chunks(catalog, spool, playlist_ids, chunk_rows)
            if connection is not None:
                rows = load_database(connection, chunks)
            else:
                assert out is not None
                tables = CsvTables(out)
                rows = write_tables(tables, [*chunks, (
                    "sequence", ("pos", "song_id"),
                    batched(enumerate(catalog.song_ids[sequence].tolist()), chunk_rows))])
    finally:
        if connection is not None:
            connection.close()
    seconds["write"] = time.perf_counter() - started - seconds["catalog"] - seconds["playlists"]
    seconds["total"] = time.perf_counter() - started
    return {"rows": rows, "seconds": {step: round(value, 1) for step, value in seconds.items()}}


def positive_int(text: str) -> int:
    """Parse a size given on the command line: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: a named scale, sizes that override it, and where the tables go."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, default="demo",
                        help="named sizes: demo (the committed tables), full (the original's "
                             "catalog, ~20M entries) or mpd (Million Playlist size, 66M)")
    for size in ("playlists", "songs", "albums", "artists"):
        parser.add_argument(f"--{size}", type=positive_int,
                            help=f"number of {size} (default: the scale's)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path,
                        help="folder for the CSV files (default at the demo sizes: this "
                             "script's folder, which holds the committed demo tables)")
    target.add_argument("--database", metavar="DSN",
                        help="PostgreSQL to COPY the tables into, in one transaction; the "
                             "schema is created if missing and the tables must be empty")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="playlist rows held in memory at a time (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, generate the tables and print a JSON summary as the last line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = {size: getattr(args, size) for size in ("playlists", "songs", "albums", "artists")}
    scale = replace(SCALES[args.scale],
                    **{size: value for size, value in sizes.items() if value is not None})
    out = args.out
    if out is None and args.database is None:
        if scale != SCALES["demo"]:
            parser.error("--out: a folder (or --database) is needed beyond the demo sizes; the "
                         "default folder holds the committed demo tables")
        out = Path(__file__).resolve().parent
    try:
        summary = generate(scale, args.seed, out, args.database, args.chunk_rows)
    except OptionError as error:
        parser.error(str(error))
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"scale": args.scale, **summary}))


if __name__ == "__main__":
    main()
