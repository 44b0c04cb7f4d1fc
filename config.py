"""Typed configuration for Bert4MusicRec: presets, file and CLI overrides, validation, and the
service's environment settings.

Every training module reads its settings from one ``Config``. Vocabulary sizes are not part of
it: they come from the fitted encoders, so they can never disagree with the data. The service
reads ``Settings`` from the environment through the same typed coercion (``_coerce``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent
DEMO_DATA_DIR = REPO_ROOT / "demo data"
DEMO_ENCODERS_DIR = REPO_ROOT / "preprocessing encoders"
SQL_DIR = REPO_ROOT / "sql"
BUILD_DIR = REPO_ROOT / "build"
RUNS_DIR = REPO_ROOT / "runs"

SPLIT_PROTOCOLS = ("playlist", "leave_one_out")
POSITIONAL_ENCODINGS = ("learned", "sinusoidal")
DEVICES = ("auto", "cpu", "cuda")
LOSSES = ("auto", "full", "sampled")
SCHEDULES = ("plateau", "cosine")
OBJECTIVES = ("cloze", "causal")
EXCLUDE_SEEN = ("auto", "true", "false")
# ``train.exclude_seen = auto`` excludes seen songs when fewer sequences than this repeat a song
REPEAT_SHARE_LIMIT = 0.01

# The local server's postgres database, used wherever DATABASE_URL is not set.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Most recommendations per playlist. sql/schema.sql (CHECK on k and rank) and sql/service.sql
# (request_recommendations) hold the same bound; tests/test_schema.py asserts they agree.
MAX_K = 100


# both presets' model.song_dropout: on held-out songs it raised cold-target HR@10 at no
# warm-target cost (BENCHMARKS.md, "Cold start"; measured with the demo preset)
PRESET_SONG_DROPOUT = 0.1


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclass
class DataConfig:
    """How playlists become training samples."""

    seq_len: int = 32
    cloze_probability: float = 0.25
    split_protocol: str = "playlist"
    train_share: float = 0.9
    min_playlist_len: int = 2


@dataclass
class ModelConfig:
    """Shape of the network; d_model = d_song + d_album + d_artist.

    ``side_pointer`` adds copy scores to the head: attention from the predicted position over
    the sequence's songs, summed per artist and per album of each candidate song.
    ``objective``: ``cloze`` (BERT4Rec: bidirectional, masked songs predicted) or ``causal``
    (SASRec: causal attention, the next song predicted at every position).
    ``song_dropout``: in training, the share of song embeddings (input positions, and each
    song's in the tied head per step) replaced by a learned unknown-song row, so the album,
    artist and feature parts learn to score songs never played (cold_start.py). 0 here, so a
    checkpoint saved before the setting existed loads as the network it was. Without side
    features it does nothing.
    ``seen_bias``: one learned score added to every song already in the input sequence, at
    training and inference alike: where nothing repeats (MovieLens, most playlists) it learns
    to push those songs down, on listening logs that repeat songs to pull them up.
    """

    d_song: int = 64
    d_album: int = 32
    d_artist: int = 32
    d_ff: int = 512
    n_layers: int = 3
    n_heads: int = 2
    dropout: float = 0.1
    positional: str = "learned"
    tie_head: bool = True
    side_features: bool = True
    side_pointer: bool = False
    objective: str = "cloze"
    song_dropout: float = 0.0
    seen_bias: bool = False

    @property
    def d_model(self) -> int:
        """Width of every position's vector inside the transformer."""
        return self.d_song + self.d_album + self.d_artist


@dataclass
class TrainConfig:
    """Optimisation, evaluation and run bookkeeping.

    ``loss``: ``full`` softmax over the catalog, or ``sampled`` softmax with logQ correction
    over the batch's targets plus ``negatives`` songs drawn from (count + 1)^``sampling_alpha``
    (0: uniform), or ``auto``: sampled only on a catalog of more than 8 x ``negatives`` songs
    (sampled_softmax.choose_loss); evaluation ranks the full catalog either way.
    ``schedule`` (schedule.py): ``plateau`` warms up over ``warmup_steps``, then halves the
    rate after ``patience`` validations without a better NDCG@10 and stops at the first
    plateau after ``halvings`` halvings in all; ``cosine`` decays over ``epochs`` and stops
    after ``patience``.
    ``epochs`` and ``max_minutes`` (0: no limit) end any run; best.pt keeps its best epoch.
    ``exclude_seen``: whether songs already in a sequence are left out of its ranking; ``auto``
    decides from the training file (``decide_exclude_seen``); checkpoints carry the decision.
    """

    batch_size: int = 128
    eval_batch_size: int = 128
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_share: float = 0.05
    warmup_steps: int = 100
    halvings: int = 2
    max_minutes: float = 0.0
    grad_clip: float = 1.0
    patience: int = 5
    num_workers: int = 0
    device: str = "auto"
    seed: int = 42
    exclude_seen: str = "auto"
    threads: int = 0
    log_every: int = 10
    loss: str = "full"
    negatives: int = 2048
    sampling_alpha: float = 0.5


@dataclass
class PathsConfig:
    """Where inputs are read and outputs written; relative paths are relative to the repo."""

    data_dir: Path = BUILD_DIR / "demo"
    run_dir: Path = RUNS_DIR / "demo"
    demo_data_dir: Path = DEMO_DATA_DIR
    encoders_dir: Path = DEMO_ENCODERS_DIR


@dataclass
class Config:
    """The whole configuration of one run."""

    preset: str = "full"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (paths as strings), as stored in checkpoints."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild and validate a configuration written by ``to_dict``."""
        config = cls()
        _apply(config, values, prefix="")
        validate(config)
        return config


def _preset_full() -> Config:
    """The defaults for a real catalog, trained without a guessed epoch count.

    Chosen on MovieLens-100k (BENCHMARKS.md, "Real data"): the cloze objective with the demo
    preset's model (2 layers, feed-forward 256; the 3-layer, 512-wide one and the causal
    objective were both below it there), cloze rate 0.3, batch 64, lr 3e-3, and the plateau
    schedule with patience 8 (the validation NDCG@10 of a thousand sequences moves by +-0.005
    between epochs, so 4 halved the rate while it was still climbing); ``epochs`` is only a
    cap. The seen bias lifted test NDCG@10 with seen items kept by 45-67 % there. The sampled
    softmax, 5.5x faster per CPU step at 116k songs with the same test NDCG@10 on the demo
    data ("Sampled softmax and torchrun"), is used where the catalog is large enough to gain.
    """
    config = Config(preset="full")
    config.data.cloze_probability = 0.3
    config.model.d_ff = 256
    config.model.n_layers = 2
    config.model.song_dropout = PRESET_SONG_DROPOUT
    config.model.seen_bias = True
    config.train.batch_size = 64
    config.train.loss = "auto"
    config.train.lr = 3e-3
    config.train.schedule = "plateau"
    config.train.epochs = 200
    config.train.patience = 8
    config.train.halvings = 3
    return config


def _preset_demo() -> Config:
    """A smaller model that trains on the demo data in a few CPU minutes.

    The seen bias raised the mean over 3 generated datasets from 1.52x to 1.58x transition
    (BENCHMARKS.md, "Over generated datasets"), though seen songs are excluded there.
    """
    config = Config(preset="demo")
    config.data.seq_len = 32
    config.data.cloze_probability = 0.3
    config.model.d_song = 64
    config.model.d_album = 32
    config.model.d_artist = 32
    config.model.d_ff = 256
    config.model.n_layers = 2
    config.model.n_heads = 2
    config.model.dropout = 0.1
    config.model.side_pointer = True
    config.model.song_dropout = PRESET_SONG_DROPOUT
    config.model.seen_bias = True
    config.train.batch_size = 64
    config.train.epochs = 10
    config.train.lr = 3e-3
    config.train.patience = 10
    return config


PRESETS = {"demo": _preset_demo, "full": _preset_full}


def _jsonable(value: Any) -> Any:
    """Convert paths to strings recursively so the dict can be dumped as JSON."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def decide_exclude_seen(setting: str, repeat_share: float | None) -> bool:
    """``train.exclude_seen`` as a decision: true or false as set; ``auto`` excludes seen songs
    when under REPEAT_SHARE_LIMIT of the sequences repeat a song, and when the share is unknown
    (None: a training file from before preprocessing recorded it), as the Recommender used to."""
    if setting != "auto":
        return setting == "true"
    return repeat_share is None or repeat_share < REPEAT_SHARE_LIMIT


def _coerce(key: str, current: Any, value: Any) -> Any:
    """Convert ``value`` to the type of the field it replaces, or raise naming ``key``.

    A bool given for a text setting becomes ``true``/``false`` (configs stored when
    ``train.exclude_seen`` was a bool still load).
    """
    try:
        if isinstance(current, str) and isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(current, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(current, int):
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        if isinstance(current, float):
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(current, Path):
            path = Path(value).expanduser()
            return path if path.is_absolute() else REPO_ROOT / path
        return str(value)
    except (TypeError, ValueError):
        kind = type(current).__name__
        raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    """Overwrite fields of a dataclass from a nested dict, refusing unknown keys."""
    known = {item.name: item for item in fields(section)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(section, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table of settings, got {value!r}")
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(section, name, _coerce(key, current, value))


def _read_file(path: Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML configuration file into a dict."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: use a .json, .toml, .yaml or .yml file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot parse: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections")
    return values


def _parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested dict."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. train.lr=0.001")
    return {parts[0]: {parts[1]: value.strip()}}


def _check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(config: Config) -> None:
    """Refuse settings that cannot train, naming the first offending key."""
    data, model, train = config.data, config.model, config.train
    _check(data.seq_len >= 2, "data.seq_len", "must be at least 2")
    _check(0 < data.cloze_probability < 1, "data.cloze_probability", "must be in (0, 1)")
    _check(0 < data.train_share < 1, "data.train_share", "must be in (0, 1)")
    _check(data.split_protocol in SPLIT_PROTOCOLS, "data.split_protocol",
           f"must be one of {', '.join(SPLIT_PROTOCOLS)}")
    _check(data.min_playlist_len >= 2, "data.min_playlist_len", "must be at least 2")
    for name in ("d_song", "d_ff", "n_layers", "n_heads"):
        _check(getattr(model, name) >= 1, f"model.{name}", "must be positive")
    for name in ("d_album", "d_artist"):
        _check(getattr(model, name) >= 0, f"model.{name}", "must not be negative")
    _check(model.d_model % model.n_heads == 0, "model.n_heads",
           f"must divide d_model = d_song + d_album + d_artist = {model.d_model}")
    _check(0 <= model.dropout < 1, "model.dropout", "must be in [0, 1)")
    _check(0 <= model.song_dropout < 1, "model.song_dropout", "must be in [0, 1)")
    _check(model.positional in POSITIONAL_ENCODINGS, "model.positional",
           f"must be one of {', '.join(POSITIONAL_ENCODINGS)}")
    _check(model.objective in OBJECTIVES, "model.objective",
           f"must be one of {', '.join(OBJECTIVES)}")
    for name in ("batch_size", "eval_batch_size", "epochs", "patience", "log_every"):
        _check(getattr(train, name) >= 1, f"train.{name}", "must be positive")
    _check(train.lr > 0, "train.lr", "must be positive")
    _check(train.weight_decay >= 0, "train.weight_decay", "must not be negative")
    _check(0 <= train.warmup_share < 1, "train.warmup_share", "must be in [0, 1)")
    _check(train.schedule in SCHEDULES, "train.schedule", f"must be one of {', '.join(SCHEDULES)}")
    _check(train.warmup_steps >= 0, "train.warmup_steps", "must not be negative")
    _check(train.halvings >= 0, "train.halvings", "must not be negative")
    _check(math.isfinite(train.max_minutes) and train.max_minutes >= 0, "train.max_minutes",
           "must be finite and not negative (0: no limit)")
    _check(train.grad_clip >= 0, "train.grad_clip", "must not be negative (0 disables clipping)")
    _check(train.num_workers >= 0, "train.num_workers", "must not be negative")
    _check(train.threads >= 0, "train.threads", "must not be negative (0 keeps torch's default)")
    _check(train.exclude_seen in EXCLUDE_SEEN, "train.exclude_seen",
           f"must be one of {', '.join(EXCLUDE_SEEN)}")
    _check(train.device in DEVICES, "train.device", f"must be one of {', '.join(DEVICES)}")
    _check(train.loss in LOSSES, "train.loss", f"must be one of {', '.join(LOSSES)}")
    _check(train.negatives >= 1, "train.negatives", "must be positive")
    _check(math.isfinite(train.sampling_alpha) and train.sampling_alpha >= 0,
           "train.sampling_alpha", "must be finite and not negative (0: uniform)")


def load_config(
    preset: str = "demo",
    file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Build a configuration: preset, then the file's values, then ``section.key=value`` flags."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    config = PRESETS[preset]()
    if file is not None:
        values = _read_file(Path(file))
        values.pop("preset", None)
        _apply(config, values, prefix="")
    for text in overrides or []:
        _apply(config, _parse_override(text), prefix="")
    validate(config)
    return config


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    """Add --preset, --config and --set to a command-line parser."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default_preset,
                        help="starting point for every setting (default: %(default)s)")
    parser.add_argument("--config", type=Path, default=None,
                        help="JSON, TOML or YAML file overriding the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=0.001 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the configuration from arguments added by ``add_config_arguments``."""
    return load_config(args.preset, args.config, list(args.overrides))


def default_database_url(environ: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL from the environment, else the local server's postgres database."""
    return (os.environ if environ is None else environ).get("DATABASE_URL", DEFAULT_DATABASE_URL)


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (IPv6 with or without brackets); any other
    name or address may be reachable from other machines."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """Service settings; each field is read from the environment variable of its upper-case name."""

    database_url: str = DEFAULT_DATABASE_URL
    model_path: Path = RUNS_DIR / "demo" / "best.pt"
    catalog_dir: Path | None = None
    api_token: str = ""
    metrics_public: bool = False
    host: str = "127.0.0.1"
    allow_unauthenticated_remote: bool = False
    port: int = 8000
    workers: int = 2
    threads: int = 4
    job_threads: int = 2
    job_batch_size: int = 64
    max_attempts: int = 5
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    pool_size: int = 10
    db_connect_timeout: int = 3
    db_statement_timeout_seconds: float = 10.0
    db_ready_timeout_seconds: float = 2.0
    db_catalog_timeout_seconds: float = 120.0
    db_keepalives_idle: int = 10
    db_keepalives_interval: int = 5
    db_keepalives_count: int = 3
    db_tcp_user_timeout_seconds: float = 10.0
    max_content_length: int = 64 * 1024
    max_song_ids: int = 500
    torch_threads: int = 0
    # exact, approximate or auto: how the Recommender finds its top-k (retrieval.py)
    recommender_index: str = "auto"
    shutdown_seconds: float = 20.0
    request_read_seconds: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default: the process environment plus a ``.env`` file).

        Values go through ``_coerce``, so an error names the variable; an empty CATALOG_DIR
        means none. An API_TOKEN of only whitespace is kept as it is, so that ``validate``
        refuses it instead of running without a token.
        """
        if environ is None:
            from dotenv import load_dotenv

            load_dotenv(REPO_ROOT / ".env")
            environ = os.environ
        defaults = cls()
        values: dict[str, Any] = {}
        for item in fields(cls):
            name = item.name.upper()
            if name not in environ:
                continue
            text = environ[name].strip()
            current = getattr(defaults, item.name)
            if item.name == "catalog_dir":
                values[item.name] = _coerce(name, Path(), text) if text else None
            elif item.name == "api_token":
                values[item.name] = text or environ[name]
            else:
                values[item.name] = _coerce(name, current, text)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is out of range."""
        at_least_one = ("port", "workers", "threads", "job_threads", "job_batch_size",
                        "max_attempts", "pool_size", "db_connect_timeout", "max_content_length",
                        "max_song_ids", "db_keepalives_idle", "db_keepalives_interval",
                        "db_keepalives_count")
        for name in at_least_one:
            _check(getattr(self, name) >= 1, name.upper(), "must be at least 1")
        positive = ("lease_seconds", "poll_seconds", "retry_base_seconds", "retry_max_seconds",
                    "shutdown_seconds", "request_read_seconds", "db_statement_timeout_seconds",
                    "db_ready_timeout_seconds", "db_catalog_timeout_seconds",
                    "db_tcp_user_timeout_seconds")
        for name in positive:
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name.upper(), "must be positive and finite")
        _check(self.port <= 65535, "PORT", "must be at most 65535")
        _check(self.db_ready_timeout_seconds <= 5, "DB_READY_TIMEOUT_SECONDS",
               "must be at most 5 (/ready answers within 5 s)")
        _check(self.api_token == self.api_token.strip(), "API_TOKEN",
               "must not be blank or begin or end with whitespace (leave it empty for no token)")
        _check(bool(self.api_token) or self.allow_unauthenticated_remote
               or _is_loopback(self.host), "HOST",
               f"{self.host!r} is not a loopback address and API_TOKEN is empty: set API_TOKEN, "
               "or ALLOW_UNAUTHENTICATED_REMOTE=true to serve every route without a token")
        _check(self.torch_threads >= 0, "TORCH_THREADS",
               "must not be negative (0 keeps torch's default)")
        _check(self.recommender_index in ("exact", "approximate", "auto"), "RECOMMENDER_INDEX",
               "must be exact, approximate or auto")
        _check(self.pool_size >= self.job_threads + 1, "POOL_SIZE",
               "must exceed JOB_THREADS so requests still get a connection while every worker "
               "holds one")
