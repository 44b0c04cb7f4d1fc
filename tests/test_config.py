"""The configuration a user writes is applied exactly, and mistakes are named."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import config
from config import ConfigError, load_config


def test_full_preset_keeps_the_original_widths_and_trains_without_an_epoch_count() -> None:
    full = load_config("full")
    data = full.data
    assert (data.seq_len, data.cloze_probability, data.train_share) == (32, 0.3, 0.9)
    model = full.model
    assert (model.d_song, model.d_album, model.d_artist, model.d_ff) == (64, 32, 32, 256)
    assert (model.n_layers, model.n_heads, model.dropout, model.d_model) == (2, 2, 0.1, 128)
    assert model.seen_bias and load_config("demo").model.seen_bias
    train = full.train
    assert (train.schedule, train.loss, model.objective) == ("plateau", "auto", "cloze")
    assert (train.patience, train.halvings, train.epochs) == (8, 3, 200)


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_file_overrides_preset_and_flags_override_file(tmp_path: Path, suffix: str) -> None:
    texts = {
        ".json": json.dumps({"train": {"lr": 0.005, "epochs": 3}, "model": {"tie_head": False}}),
        ".toml": "[train]\nlr = 0.005\nepochs = 3\n[model]\ntie_head = false\n",
        ".yaml": "train:\n  lr: 0.005\n  epochs: 3\nmodel:\n  tie_head: false\n",
    }
    path = tmp_path / f"settings{suffix}"
    path.write_text(texts[suffix], encoding="utf-8")
    loaded = load_config("demo", path, ["train.epochs=7", "data.split_protocol=leave_one_out"])
    assert loaded.train.lr == 0.005
    assert loaded.train.epochs == 7
    assert loaded.model.tie_head is False
    assert loaded.data.split_protocol == "leave_one_out"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.n_heads=3", "model.n_heads"),
        ("data.cloze_probability=1.0", "data.cloze_probability"),
        ("data.cloze_probability=0", "data.cloze_probability"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=2.5", "train.batch_size"),
        ("model.tie_head=maybe", "model.tie_head"),
        ("model.positional=rotary", "model.positional"),
        ("data.split_protocol=random", "data.split_protocol"),
        ("train.learning_rate=0.1", "train.learning_rate"),
        ("train.schedule=linear", "train.schedule"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("train.max_minutes=nan", "train.max_minutes"),
        ("train.halvings=-1", "train.halvings"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("lr=0.1", "section.key=value"),
    ],
)
def test_bad_settings_fail_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("full", overrides=[override])


def test_unknown_preset_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("demo", tmp_path / "nope.toml")


def test_round_trip_through_dict_keeps_every_value() -> None:
    original = load_config("demo", overrides=["paths.run_dir=runs/with space", "train.seed=7"])
    restored = config.Config.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored == original
    assert restored.paths.run_dir == config.REPO_ROOT / "runs" / "with space"


def test_command_line_flags_build_the_same_config() -> None:
    parser = argparse.ArgumentParser()
    config.add_config_arguments(parser)
    args = parser.parse_args(["--preset", "full", "--set", "train.lr=0.002"])
    assert config.config_from_args(args) == load_config("full", overrides=["train.lr=0.002"])


def test_service_settings_come_from_the_environment_through_the_same_coercion() -> None:
    settings = config.Settings.from_env({"PORT": " 9000 ", "LEASE_SECONDS": "12.5",
                                         "MODEL_PATH": "runs/x/best.pt", "CATALOG_DIR": "",
                                         "API_TOKEN": "t"})
    assert (settings.port, settings.lease_seconds, settings.api_token) == (9000, 12.5, "t")
    assert settings.model_path == config.REPO_ROOT / "runs" / "x" / "best.pt"
    assert settings.catalog_dir is None
    assert config.Settings.from_env({"CATALOG_DIR": "demo data"}).catalog_dir == \
        config.DEMO_DATA_DIR
    assert config.Settings.from_env({}) == config.Settings()
    assert config.Settings().database_url == config.DEFAULT_DATABASE_URL


@pytest.mark.parametrize(("environ", "named"), [
    ({"PORT": "http"}, "PORT: expected int"),
    ({"JOB_THREADS": "1.5"}, "JOB_THREADS: expected int"),
    ({"POLL_SECONDS": "soon"}, "POLL_SECONDS: expected float"),
    ({"LEASE_SECONDS": "inf"}, "LEASE_SECONDS: must be positive"),
    ({"RETRY_BASE_SECONDS": "nan"}, "RETRY_BASE_SECONDS: must be positive"),
    ({"PORT": "70000"}, "PORT: must be at most 65535"),
    ({"WORKERS": "0"}, "WORKERS: must be at least 1"),
    ({"TORCH_THREADS": "-1"}, "TORCH_THREADS: must not be negative"),
    ({"POOL_SIZE": "2", "JOB_THREADS": "2"}, "POOL_SIZE: must exceed JOB_THREADS"),
])
def test_bad_service_settings_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config.Settings.from_env(environ)


@pytest.mark.parametrize(("environ", "named"), [
    ({"API_TOKEN": "   "}, "API_TOKEN"),
    ({"API_TOKEN": "\t\n"}, "API_TOKEN"),
    ({"HOST": "0.0.0.0"}, "HOST"),
    ({"HOST": "::"}, "HOST"),
    ({"HOST": "10.1.2.3"}, "HOST"),
    ({"HOST": "example.com"}, "HOST"),
    ({"HOST": "0.0.0.0", "API_TOKEN": "  "}, "API_TOKEN"),
    ({"HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED_REMOTE": "maybe"},
     "ALLOW_UNAUTHENTICATED_REMOTE"),
])
def test_blank_token_and_open_remote_host_refuse_to_start(environ: dict[str, str],
                                                          named: str) -> None:
    with pytest.raises(ConfigError, match=f"^{named}: "):
        config.Settings.from_env(environ)


@pytest.mark.parametrize("token", [" ", " padded", "padded\n"])
def test_settings_built_in_code_refuse_a_blank_or_padded_token(token: str) -> None:
    with pytest.raises(ConfigError, match=r"^API_TOKEN: "):
        config.Settings(api_token=token).validate()


@pytest.mark.parametrize("environ", [
    {}, {"API_TOKEN": ""}, {"HOST": "localhost"}, {"HOST": "127.0.0.2"}, {"HOST": "::1"},
    {"HOST": "[::1]"}, {"HOST": "0.0.0.0", "API_TOKEN": "t"},
    {"HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED_REMOTE": "true"},
])
def test_loopback_a_token_or_the_explicit_setting_start(environ: dict[str, str]) -> None:
    config.Settings.from_env(environ)
