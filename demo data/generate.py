"""Generate the seeded demo tables of Bert4MusicRec: artists, albums, songs and playlists.

The process is built so that a sequence model with side information has something to learn
that neither a popularity count nor a one-step transition table captures: every playlist has
a fixed set of genre themes and a few core artists per theme, it drifts between the themes,
and it contains album runs and artist runs. Song frequencies are long-tailed, so rare songs
are learnable mainly through their album, artist and audio features.

Usage: python "demo data/generate.py" [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SEED = 20261128
N_PLAYLISTS = 3000
N_ARTISTS = 2400
SEQUENCE_GENRE = "indie folk"
SEQUENCE_LENGTH = 15

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
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
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


def make_artists(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw each artist's main genre, optional second genre and Zipf-like popularity."""
    shares = np.array([genre.share for genre in GENRES])
    artist_genre_p = shares**0.6 / np.sum(shares**0.6)
    main = rng.choice(len(GENRES), size=N_ARTISTS, p=artist_genre_p)
    affinity = genre_affinity()
    second = np.full(N_ARTISTS, -1)
    for artist in range(N_ARTISTS):
        if rng.random() < 0.2:
            weights = affinity[main[artist]] * shares
            second[artist] = rng.choice(len(GENRES), p=weights / weights.sum())
    ranks = rng.permutation(N_ARTISTS) + 1
    popularity = ranks.astype(float) ** -0.7
    return main, second, popularity


def make_catalog(rng: np.random.Generator) -> Catalog:
    """Build artists, their albums and the songs of each album, with audio features."""
    artist_genre, artist_second, artist_pop = make_artists(rng)
    artist_names: list[str] = []
    taken: set[str] = set()
    for artist in range(N_ARTISTS):
        name = artist_name(rng, GENRES[artist_genre[artist]])
        while name in taken:
            name = artist_name(rng, GENRES[artist_genre[artist]])
        taken.add(name)
        artist_names.append(name)
    artist_start = np.clip(rng.normal(2005, 12, size=N_ARTISTS), 1960, 2022).astype(int)
    pop_quantile = np.argsort(np.argsort(artist_pop)) / (N_ARTISTS - 1)

    album_artist: list[int] = []
    album_genre: list[int] = []
    album_year: list[int] = []
    album_names: list[str] = []
    album_factor: list[float] = []
    song_album: list[int] = []
    song_disc: list[int] = []
    song_track: list[int] = []
    song_factor: list[float] = []
    for artist in range(N_ARTISTS):
        n_albums = min(5, 1 + int(rng.poisson(0.2 + 2.0 * pop_quantile[artist] ** 3)))
        year = int(artist_start[artist])
        for _ in range(n_albums):
            genre = int(artist_genre[artist])
            if artist_second[artist] >= 0 and rng.random() < 0.3:
                genre = int(artist_second[artist])
            kind = rng.random()
            if kind < 0.58:
                n_tracks = 1
            elif kind < 0.87:
                n_tracks = int(rng.integers(2, 5))
            else:
                n_tracks = int(rng.integers(6, 17))
            album = len(album_artist)
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
        artist_ids=gappy_ids(rng, N_ARTISTS, 5000, 9),
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
    """Index the catalog for fast popularity-weighted draws while generating playlists."""
    n_albums = catalog.album_ids.size
    n_artists = catalog.artist_ids.size
    song_genre = catalog.album_genre[catalog.song_album]
    album_songs = [np.flatnonzero(catalog.song_album == album) for album in range(n_albums)]
    album_pop = np.array([catalog.song_popularity[songs].sum() for songs in album_songs])
    album_size = np.array([songs.size for songs in album_songs])
    song_artist = catalog.album_artist[catalog.song_album]
    order = np.argsort(song_artist, kind="stable")
    bounds = np.searchsorted(song_artist[order], np.arange(n_artists + 1))
    artist_songs = [order[bounds[a]:bounds[a + 1]] for a in range(n_artists)]
    artist_albums = [np.flatnonzero((catalog.album_artist == a) & (album_size > 1))
                     for a in range(n_artists)]

    genre_songs, genre_albums, genre_artists = [], [], []
    for genre in range(len(GENRES)):
        genre_songs.append(np.flatnonzero(song_genre == genre))
        genre_albums.append(np.flatnonzero((catalog.album_genre == genre) & (album_size > 1)))
        members = (catalog.artist_genre == genre) | (catalog.artist_second_genre == genre)
        genre_artists.append(np.flatnonzero(members))
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


def make_playlists(
    rng: np.random.Generator, pools: Pools
) -> tuple[list[list[int]], list[str]]:
    """Generate all playlists, lengths lognormal (a few long-tailed) in [5, 250], and names."""
    affinity = genre_affinity()
    spread = np.where(rng.random(N_PLAYLISTS) < 0.08, 1.0, 0.5)
    lengths = np.clip(np.round(rng.lognormal(np.log(40.0), spread)), 5, 250)
    playlists: list[list[int]] = []
    names: list[str] = []
    for length in lengths.astype(int):
        themes = choose_themes(rng, affinity)
        playlists.append(make_playlist(rng, pools, themes, int(length)))
        names.append(playlist_name(rng, themes))
    return playlists, names


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


def write_csv(path: Path, header: Sequence[str], rows: list[list[str]]) -> None:
    """Write one table as UTF-8 CSV with a header row and Unix line endings."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


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


def write_tables(
    out: Path,
    catalog: Catalog,
    playlists: list[list[int]],
    playlist_names: list[str],
    playlist_ids: np.ndarray,
    sequence: list[int],
) -> dict[str, int]:
    """Write the tables, keeping only songs that occur (and their albums and artists)."""
    used = np.zeros(catalog.song_ids.size, dtype=bool)
    for songs in [*playlists, sequence]:
        used[songs] = True
    kept_songs = np.flatnonzero(used)
    kept_albums = np.unique(catalog.song_album[kept_songs])
    kept_artists = np.unique(catalog.album_artist[kept_albums])

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "artists.csv", ("artist_id", "name", "genre"), [
        [str(catalog.artist_ids[a]), catalog.artist_names[a],
         GENRES[catalog.artist_genre[a]].name]
        for a in kept_artists
    ])
    write_csv(out / "albums.csv", ("album_id", "name", "artist_id", "release_year"), [
        [str(catalog.album_ids[a]), catalog.album_names[a],
         str(catalog.artist_ids[catalog.album_artist[a]]), str(catalog.album_year[a])]
        for a in kept_albums
    ])
    write_csv(out / "songs.csv", SONG_COLUMNS, [song_row(catalog, s) for s in kept_songs])
    write_csv(out / "playlists.csv", ("playlist_id", "name"), [
        [str(pid), name] for pid, name in zip(playlist_ids, playlist_names, strict=True)
    ])
    write_csv(out / "playlist_songs.csv", ("playlist_id", "pos", "song_id"), [
        [str(pid), str(pos), str(catalog.song_ids[song])]
        for pid, songs in zip(playlist_ids, playlists, strict=True)
        for pos, song in enumerate(songs)
    ])
    write_csv(out / "sequence.csv", ("pos", "song_id"), [
        [str(pos), str(catalog.song_ids[song])] for pos, song in enumerate(sequence)
    ])
    return {
        "artists": kept_artists.size,
        "albums": kept_albums.size,
        "songs": kept_songs.size,
        "playlists": len(playlists),
        "playlist_songs": sum(len(songs) for songs in playlists),
    }


def generate(out: Path, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """Generate every demo table into out from one seed; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    catalog = make_catalog(rng)
    pools = make_pools(catalog)
    playlists, names = make_playlists(rng, pools)
    playlist_ids = gappy_ids(rng, N_PLAYLISTS, 1, 4)
    sequence = make_sequence(rng, pools, catalog)
    return write_tables(out, catalog, playlists, names, playlist_ids, sequence)


def main() -> None:
    """Parse the command line, generate the tables and print a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for the CSV files (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args()
    started = time.perf_counter()
    counts = generate(args.out, args.seed)
    summary = ", ".join(f"{count} {table}" for table, count in counts.items())
    print(f"wrote {summary} to {args.out} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
