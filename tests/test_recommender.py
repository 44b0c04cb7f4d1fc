"""The Recommender: catalog ids in and out, exclude-seen, fallbacks, exact top-k, no training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_support import N_SONGS, SONG_IDS, make_encoders, tiny_config, write_data

import checkpoint as checkpoint_module
from checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from preprocessing_utils import FIRST_SONG_INDEX, MASK_INDEX, PAD_INDEX
from recommender import NonFiniteScores, Recommender, top_k
from train import train

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), make_encoders())


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of a finished six-epoch training."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(data_dir, run_dir, **{"train.epochs": 6}), progress=False)
    return run_dir


def test_recommender_returns_catalog_ids_and_honours_exclude_seen(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    assert recommender.n_songs == N_SONGS
    playlist = [int(song) for song in SONG_IDS[3:8]]
    seen = recommender.recommend([playlist], k=N_SONGS, exclude_seen=True)[0]
    assert len(seen.song_ids) == N_SONGS - 5
    assert not set(seen.song_ids) & set(playlist)
    assert set(seen.song_ids) <= set(SONG_IDS.tolist())
    assert seen.scores == sorted(seen.scores, reverse=True)
    everything = recommender.recommend([playlist], k=N_SONGS, exclude_seen=False)[0]
    assert sorted(everything.song_ids) == sorted(SONG_IDS.tolist())
    assert sum(everything.scores) == pytest.approx(1.0, abs=1e-4)


def test_recommender_reports_unknown_ids_and_falls_back_to_popular(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    known = [int(SONG_IDS[0]), int(SONG_IDS[1])]
    results = recommender.recommend([[*known, 123], [], [77, 78]], k=5)
    assert results[0].unknown_song_ids == [123]
    assert results[1].unknown_song_ids == [] and len(results[1].song_ids) == 5
    assert results[2].unknown_song_ids == [77, 78]
    assert results[1].song_ids == results[2].song_ids
    single = recommender.recommend([known], k=5)[0]
    assert results[0].song_ids == single.song_ids
    assert results[0].scores == pytest.approx(single.scores, rel=1e-5)
    with pytest.raises(ValueError):
        recommender.recommend([known], k=0)


@pytest.mark.parametrize("side_pointer", [False, True])
def test_recommendations_are_the_models_exhaustive_ranking(
    data_dir: Path, tmp_path: Path, side_pointer: bool
) -> None:
    """The fast path (no padding, last position only, cached head) ranks like the full pass."""
    config = tiny_config(data_dir, tmp_path, **{"model.side_pointer": side_pointer})
    encoders = make_encoders()
    torch.manual_seed(3)
    model = build_model(config, encoders).eval()
    recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "test")
    playlist = [int(song) for song in SONG_IDS[[4, 9, 2, 17, 5]]]
    result = recommender.recommend([playlist], k=8)[0]
    tokens = torch.from_numpy(encoders.encode_songs(playlist))
    inputs = torch.full((1, config.data.seq_len), PAD_INDEX, dtype=torch.long)
    inputs[0, -len(tokens) - 1 : -1] = tokens
    inputs[0, -1] = MASK_INDEX
    with torch.no_grad():
        if side_pointer:
            scores = model.predict_last(inputs)[0]
        else:
            scores = model.logits(model.encode(inputs)[0, -1])
    scores[tokens] = float("-inf")
    expected = torch.softmax(scores[FIRST_SONG_INDEX:], dim=0).topk(8)
    assert result.song_ids == SONG_IDS[expected.indices.numpy()].tolist()
    assert result.scores == pytest.approx(expected.values.tolist(), rel=1e-4)


@pytest.mark.parametrize(("rows", "width", "k"), [(1, 116_295, 10), (3, 20_000, 25),
                                                   (2, 1_000, 1), (2, 300, 100)])
def test_top_k_equals_a_full_sort(rows: int, width: int, k: int) -> None:
    """The block shortcut finds what topk finds, also in the ragged last block and past -inf."""
    generator = torch.Generator().manual_seed(width)
    scores = torch.randn(rows, width, generator=generator)
    scores[:, torch.randperm(width, generator=generator)[: width // 3]] = float("-inf")
    scores[0, -1] = 10.0
    scores[-1, :width // 2] = float("-inf")
    values, indices = top_k(scores, k)
    expected = scores.topk(k, dim=1)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, expected.indices)


def test_batched_recommendations_equal_single_ones(trained: Path) -> None:
    recommender = Recommender.from_checkpoint(trained / "best.pt")
    playlists = [[int(song) for song in SONG_IDS[start : start + length]]
                 for start, length in ((0, 3), (5, 12), (20, 1), (2, 9))]
    batched = recommender.recommend(playlists, k=4)
    for playlist, result in zip(playlists, batched, strict=True):
        single = recommender.recommend([playlist], k=4)[0]
        assert result.song_ids == single.song_ids
        assert result.scores == pytest.approx(single.scores, rel=1e-4)


def test_serving_imports_no_training_code(trained: Path) -> None:
    """A process that only serves loads the recommender, never train (nor TensorBoard)."""
    script = (
        "import sys\n"
        "from recommender import Recommender, Recommendation\n"
        f"recommender = Recommender.from_checkpoint({str(trained / 'best.pt')!r})\n"
        f"result = recommender.recommend([[{int(SONG_IDS[0])}, {int(SONG_IDS[1])}]], k=3)[0]\n"
        "assert isinstance(result, Recommendation) and len(result.song_ids) == 3\n"
        "loaded = sorted(name for name in sys.modules if name in ('train', 'evaluation')\n"
        "                or name.startswith('torch.utils.tensorboard'))\n"
        "print('loaded:', loaded)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "loaded: []"


def test_a_checkpoint_with_non_finite_weights_is_not_served(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 F1: a NaN best.pt loaded and answered every playlist with no songs."""
    state = load_checkpoint(trained / "best.pt")
    name = next(key for key in state["model"] if key.endswith("bias"))
    state["model"][name].fill_(float("nan"))
    path = tmp_path / "nan.pt"
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint_module, "first_non_finite", lambda state: None, raising=False)
        save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        Recommender.from_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise_instead_of_an_empty_answer(data_dir: Path, bad: float) -> None:
    config = tiny_config(data_dir, data_dir)
    encoders = make_encoders()
    model = build_model(config, encoders).eval()
    with torch.no_grad():
        model.output_bias[FIRST_SONG_INDEX + 7] = bad
    recommender = Recommender(model, encoders, torch.ones(encoders.n_song_tokens), "broken")
    playlist = [int(song) for song in SONG_IDS[:3]]
    with pytest.raises(NonFiniteScores, match="model broken gave NaN or infinite scores for 2 of 3"
                       ) as caught:
        recommender.recommend([playlist, [], playlist], k=5)
    assert caught.value.playlists == [0, 2]
    with pytest.raises(NonFiniteScores):
        # the bad song is excluded as seen, but the model's scores were still not finite
        recommender.recommend([[int(SONG_IDS[7])]], k=5)
    assert len(recommender.recommend([[123]], k=5)[0].song_ids) == 5
