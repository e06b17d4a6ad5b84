"""Tests of mmssl.synthetic: determinism, planted structure, write/load round trip, CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mmssl import synthetic
from mmssl.data import DataWarning, load
from mmssl.errors import ConfigError, DataError
from mmssl.synthetic import default_dataset, make_dataset, write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default():
    return default_dataset()


def _same(a, b) -> bool:
    """Whether two data sets hold identical arrays."""
    if (a.n_users, a.n_items, list(a.features)) != (b.n_users, b.n_items, list(b.features)):
        return False
    mats = all(np.array_equal(getattr(getattr(a, s), f), getattr(getattr(b, s), f))
               for s in ("train", "val", "test") for f in ("indptr", "indices", "data"))
    return mats and all(np.array_equal(a.features[k], b.features[k]) for k in a.features)


def _cold_share(ds, split: str) -> float:
    cold = np.bincount(ds.train.indices, minlength=ds.n_items) == 0
    m = getattr(ds, split)
    return float(cold[m.indices].mean())


def _recall20(ds, scores) -> float:
    """Validation Recall@20 of a dense score matrix, train items excluded."""
    train, val = ds.train.toarray() > 0, ds.val.toarray()
    s = np.where(train, -np.inf, scores)
    top = np.argsort(-s, axis=1, kind="stable")[:, :20]
    hits = np.take_along_axis(val, top, 1).sum(1)
    n = val.sum(1)
    return float((hits[n > 0] / n[n > 0]).mean())


def test_default_shapes_and_source(default):
    ds = default
    assert ds.source == "synthetic(users=1000, items=500, seed=0)"
    assert (ds.n_users, ds.n_items) == (1000, 500)
    assert ds.modalities == ["audio", "image", "text"]
    assert {k: v.shape for k, v in ds.features.items()} == {
        "audio": (500, 16), "image": (500, 64), "text": (500, 32)}
    for f in ds.features.values():
        assert f.dtype == np.float32 and f.flags.c_contiguous and np.isfinite(f).all()
    for m in (ds.train, ds.val, ds.test):
        assert m.shape == (1000, 500) and m.dtype == np.float32 and m.has_sorted_indices
        assert np.all(m.data == 1)
    total = ds.train.nnz + ds.val.nnz + ds.test.nnz
    assert 0.03 <= total / (1000 * 500) <= 0.05  # moderate density, ~4%
    assert 0.7 <= ds.train.nnz / total <= 0.85
    assert ds.train.getnnz(axis=1).min() >= 1  # every user has a train item
    assert ds.val.nnz > 0 and ds.test.nnz > 0


def test_default_is_a_fresh_copy(default):
    a = default_dataset()
    a.train.data[:] = 7
    a.features["image"][:] = 0
    assert _same(default_dataset(), default)
    assert load("synthetic").source == default.source


def test_generation_fast():
    t = time.perf_counter()
    make_dataset(seed=5)
    assert time.perf_counter() - t < 2.0  # ~0.1 s on an idle core


def test_deterministic_per_seed(default):
    assert _same(make_dataset(seed=0), default)
    other = make_dataset(seed=1)
    assert not _same(other, default)
    assert (other.train != default.train).nnz > 0
    assert not np.array_equal(other.features["image"], default.features["image"])
    assert other.source == "synthetic(users=1000, items=500, seed=1)"


def test_splits_disjoint_and_no_duplicates(default):
    ds = default
    assert ds.warnings == [f"{int((np.bincount(ds.train.indices, minlength=500) == 0).sum())}"
                           " item(s) never appear in train (cold items)"]
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert getattr(ds, a).multiply(getattr(ds, b)).nnz == 0


def test_cold_items_share(default):
    for split in ("test", "val"):
        assert 0.05 <= _cold_share(default, split) <= 0.20, split
    small = make_dataset(n_users=300, n_items=200, seed=3)
    assert 0.05 <= _cold_share(small, "test") <= 0.20
    none = make_dataset(n_users=300, n_items=200, seed=3, cold_item_frac=0.0)
    assert _cold_share(none, "test") < 0.05  # only items nobody happened to train on


def test_popularity_long_tailed(default):
    deg = np.sort(np.bincount(default.train.indices, minlength=500))[::-1]
    assert deg[:50].sum() > 0.25 * deg.sum()  # top 10% of items hold > 25% of train
    assert deg[-100:].sum() < 0.05 * deg.sum()


def test_planted_signal_is_learnable(default):
    """Co-occurrence and features beat popularity, features add to co-occurrence, and
    the modalities' informativeness orders them."""
    ds = default
    pop = _recall20(ds, np.tile(np.asarray(ds.train.sum(0)), (ds.n_users, 1)))
    tr = ds.train.toarray()
    norm = np.sqrt(tr.sum(0)) + 1e-9
    knn = tr @ ((tr.T @ tr) / norm[:, None] / norm[None, :])

    def profile(name):  # user = sum of its train items' normalised features
        x = ds.features[name] / np.linalg.norm(ds.features[name], axis=1, keepdims=True)
        return (tr @ x) @ x.T

    scores = {k: profile(k) for k in ds.modalities}
    recall = {k: _recall20(ds, v) for k, v in scores.items()}
    item_knn = _recall20(ds, knn)
    both = _recall20(ds, knn / knn.max(1, keepdims=True)
                     + 0.5 * scores["image"] / np.abs(scores["image"]).max(1, keepdims=True))
    assert pop < 0.2
    assert item_knn > pop + 0.1 and recall["image"] > pop + 0.1
    assert recall["image"] > recall["text"] > recall["audio"]
    assert both > item_knn + 0.03  # features know something co-occurrence does not


def test_modalities_argument():
    ds = make_dataset(n_users=100, n_items=60, modalities=[("v", 5, 1.0), ("w", 3, 0.0)])
    assert {k: v.shape for k, v in ds.features.items()} == {"v": (60, 5), "w": (60, 3)}
    assert "modalities=[v:5:1, w:3:0]" in ds.source
    assert make_dataset(n_users=100, n_items=60, modalities=()).modalities == []


@pytest.mark.parametrize("kwargs,name", [
    ({"n_users": 0}, "n_users"), ({"n_items": 3}, "n_items"), ({"seed": -1}, "seed"),
    ({"cold_share": 1.0}, "cold_share"), ({"modalities": [("x", 4, 1.5)]}, "informativeness"),
    ({"modalities": [("x", 4, 0.5), ("x", 2, 0.5)]}, "modalities"), ({"factors": 0}, "factors"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        make_dataset(**kwargs)


def test_write_load_round_trip(default, tmp_path):
    out = write(default, tmp_path / "syn")
    assert sorted(p.name for p in out.iterdir()) == [
        "audio_feat.npy", "image_feat.npy", "test.json", "text_feat.npy", "train.json", "val.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        back = load(out)
    assert _same(back, default)
    assert back.warnings == default.warnings


def test_write_refuses_to_overwrite(tmp_path):
    small = make_dataset(n_users=50, n_items=40, seed=2)
    out = write(small, tmp_path / "d")
    with pytest.raises(DataError, match="train.json.*overwrite"):
        write(small, out)
    np.save(out / "stale_feat.npy", np.ones((40, 2)))
    other = make_dataset(n_users=60, n_items=40, seed=4)
    write(other, out, overwrite=True)
    assert not (out / "stale_feat.npy").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert _same(load(out), other)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.json").write_text("")  # empty split files may be replaced
    write(small, tmp_path / "empty")


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mmssl.synthetic", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_writes_files(tmp_path):
    out = tmp_path / "cli"
    r = _cli("--out", str(out), "--users", "80", "--items", "50", "--seed", "3", "--factors", "8")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "80 users, 50 items" in r.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        back = load(out)
    assert _same(back, make_dataset(n_users=80, n_items=50, seed=3, factors=8))
    again = _cli("--out", str(out), "--users", "80", "--items", "50")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _cli("--out", str(out), "--users", "80", "--items", "50", "--overwrite").returncode == 0


@pytest.mark.parametrize("args,fragment", [
    (["--users", "abc"], "--users"),
    (["--users", "0"], "n_users"),
    (["--bogus"], "--bogus"),
    ([], "--out"),
])
def test_cli_bad_arguments(tmp_path, args, fragment):
    full = (["--out", str(tmp_path / "x")] if args else []) + args
    r = _cli(*full)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0 and "--overwrite" in r.stdout and "--factors" in r.stdout


def test_module_docstring_says_how_to_run():
    assert "python -m mmssl.synthetic --out" in synthetic.__doc__


def test_generated_size_is_the_one_parser_of_synthetic_specs():
    from mmssl.synthetic import generated_size

    assert generated_size("synthetic:300x200") == (300, 200)
    for bad in ("synthetic", "synthetic:300", "synthetic:0x5", "synthetic:05x5", "synthetic:3x5x", "data/tiktok",
                "synthetic:3 x5"):
        assert generated_size(bad) is None, bad
