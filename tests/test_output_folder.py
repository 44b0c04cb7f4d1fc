"""The output folder is replaced as a whole (issue 15 F7).

A real preprocessing.py process is killed with SIGKILL at the worst moments: after the new
training file is written but before the encoders, and (without an atomic exchange) between
moving the old folder aside and moving the new one in. A reader (the ones train.py calls)
then sees the old complete set or refuses; it never accepts new playlists with old encoders.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_preprocessing import write_tables

import preprocessing
from atomic_files import clean_folder_leftovers, replace_folder
from config import REPO_ROOT
from preprocessing_utils import DataError, Encoders, load_training_file

# Runs preprocessing.main with one step made to announce itself and hang, so the test can
# kill the process exactly there. argv: marker file, step, then preprocessing.py's arguments.
HANGING_RUN = """
import os, sys, time
from pathlib import Path
import atomic_files, preprocessing, preprocessing_utils

marker, step = Path(sys.argv[1]), sys.argv[2]

def hang(*args, **kwargs):
    marker.write_text("here")
    time.sleep(120)

if step == "encoders":
    preprocessing_utils.Encoders.save = hang
else:
    atomic_files._exchange = lambda first, second: False
    rename = os.rename
    def second_rename(source, destination):
        if str(source).endswith(atomic_files.PARTIAL_SUFFIX):
            hang()
        rename(source, destination)
    atomic_files.os.rename = second_rename
sys.exit(preprocessing.main(sys.argv[3:]))
"""


def read_set(folder: Path) -> tuple[str, str]:
    """What train.py reads from a preprocessing folder: encoders fingerprint, training sha256."""
    encoders = Encoders.load(folder / "encoders")
    load_training_file(folder, n_song_tokens=encoders.n_song_tokens)
    return encoders.fingerprint, hashlib.sha256((folder / "training.npz").read_bytes()).hexdigest()


def kill_at(step: str, tables: Path, out: Path, tmp_path: Path) -> None:
    """Run preprocessing on ``tables`` into ``out`` and SIGKILL it when it reaches ``step``."""
    marker = tmp_path / f"{step}.reached"
    process = subprocess.Popen([sys.executable, "-c", HANGING_RUN, str(marker), step,
                                "--data", str(tables), "--out", str(out)], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "preprocessing ended before the step"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def two_sets(tmp_path: Path) -> tuple[Path, Path, tuple[str, str]]:
    """Tables for an old and a new run (same number of songs, different songs), and the out
    folder holding the old run's complete output with its (fingerprint, sha256)."""
    old = write_tables(tmp_path / "old", playlist_songs=[(3, 0, 1000010), (3, 1, 1000020),
                                                         (5, 0, 1000030), (5, 1, 1000040)])
    new = write_tables(tmp_path / "new", playlist_songs=[(3, 0, 1000050), (3, 1, 1000020),
                                                         (7, 0, 1000030), (7, 1, 1000040)])
    out = tmp_path / "out"
    preprocessing.preprocess("csv", out, data_dir=old)
    return new, out, read_set(out)


def test_killed_before_the_encoders_the_old_set_stays_whole(
    two_sets: tuple[Path, Path, tuple[str, str]], tmp_path: Path
) -> None:
    new, out, old_set = two_sets
    kill_at("encoders", new, out, tmp_path)
    assert read_set(out) == old_set
    assert sorted(path.name for path in out.iterdir()) == ["encoders", "training.npz"]
    assert list(tmp_path.glob(".out.*.partial")), "the killed run's temporary folder"
    summary = preprocessing.preprocess("csv", out, data_dir=new)
    assert read_set(out) == (summary["encoders_fingerprint"], summary["training_sha256"])
    assert read_set(out) != old_set
    assert not list(tmp_path.glob(".out.*")), "leftovers are removed at the next start"


def test_killed_between_the_two_renames_readers_refuse_and_the_next_run_restores(
    two_sets: tuple[Path, Path, tuple[str, str]], tmp_path: Path
) -> None:
    new, out, old_set = two_sets
    kill_at("rename", new, out, tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_set(out)
    clean_folder_leftovers(out)
    assert read_set(out) == old_set
    assert not list(tmp_path.glob(".out.*"))


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "set"
    replace_folder(target, lambda folder: (folder / "a").write_text("old"))

    def fail(folder: Path) -> None:
        (folder / "a").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(target, fail)
    assert (target / "a").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["set"]
    replace_folder(target, lambda folder: (folder / "b").write_text("new"))
    assert [path.name for path in target.iterdir()] == ["b"]


def test_an_output_folder_with_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = write_tables(tmp_path / "tables")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    status = preprocessing.main(["--data", str(tables), "--out", str(tmp_path / "out")])
    assert status == 2
    assert "--out holds 'notes.txt'" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
