"""Tests of mmssl.data: both layouts, every error case, warnings, the real data sets."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mmssl.data import DataWarning, Dataset, load
from mmssl.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A tiny data set with every warning-worthy oddity: user 3 has no train item, item 5 is
# never in train, (0, 2) is in train and val, (1, 4) in val and test, train has one
# duplicate (0, 1). Users 0..3, items 0..5.
SPLITS = {
    "train": {0: [1, 0, 2, 1], 1: [3], 2: [0, 4], 3: []},
    "val": {0: [2], 1: [4], 2: [], 3: [5]},
    "test": {0: [3], 1: [4], 2: [5], 3: [1]},
}


def _features():
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((6, 3)),  # float64 on disk -> float32
            "text": rng.standard_normal((6, 2)).astype(np.float32)}


def write_mmssl(root: Path, splits=SPLITS, features=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s, d in splits.items():
        (root / f"{s}.json").write_text(json.dumps({str(u): v for u, v in d.items()}))
    for name, arr in (_features() if features is None else features).items():
        np.save(root / f"{name}_feat.npy", arr)
    return root


def write_mmrec(root: Path, splits=SPLITS, features=None) -> Path:
    """Same content as an MMRec .inter file (shuffled columns, an extra column)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["itemID\tx_label\ttimestamp\tuserID"]
    for code, s in enumerate(("train", "val", "test")):
        for u, items in splits[s].items():
            lines += [f"{i}\t{code}\t12345\t{u}" for i in items]
    (root / "tiny.inter").write_text("\n".join(lines) + "\n")
    for name, arr in (_features() if features is None else features).items():
        np.save(root / f"{name}_feat.npy", arr)
    return root


def quiet_load(path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load(path)


def expect_error(path, *fragments) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError) as ei:
            load(path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- good data

def test_mmssl_layout_content(tmp_path):
    ds = quiet_load(write_mmssl(tmp_path / "d"))
    assert (ds.n_users, ds.n_items) == (4, 6)
    assert ds.modalities == ["image", "text"] and list(ds.features) == ["image", "text"]
    for f in ds.features.values():
        assert f.dtype == np.float32 and f.flags.c_contiguous and f.shape[0] == 6
    np.testing.assert_array_equal(ds.features["image"], _features()["image"].astype(np.float32))
    expected_train = np.zeros((4, 6), np.float32)
    for u, items in SPLITS["train"].items():
        expected_train[u, items] = 1
    np.testing.assert_array_equal(ds.train.toarray(), expected_train)
    assert (ds.train.nnz, ds.val.nnz, ds.test.nnz) == (6, 3, 4)
    for m in (ds.train, ds.val, ds.test):
        assert m.format == "csr" and m.dtype == np.float32 and m.shape == (4, 6)
        assert m.has_sorted_indices and np.all(m.data == 1)
    assert ds.source == str(tmp_path / "d")


def test_both_layouts_identical(tmp_path):
    a = quiet_load(write_mmssl(tmp_path / "a"))
    b = quiet_load(write_mmrec(tmp_path / "b"))
    assert (a.n_users, a.n_items) == (b.n_users, b.n_items)
    for s in ("train", "val", "test"):
        ma, mb = getattr(a, s), getattr(b, s)
        for attr in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(ma, attr), getattr(mb, attr))
            assert getattr(ma, attr).dtype == getattr(mb, attr).dtype
    assert a.features.keys() == b.features.keys()
    for k in a.features:
        np.testing.assert_array_equal(a.features[k], b.features[k])
    assert a.warnings == b.warnings


def test_warnings_counted_and_emitted_once(tmp_path):
    root = write_mmssl(tmp_path / "d")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = load(root)
    ours = [w for w in rec if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    assert ds.warnings == [
        "1 user(s) have no train interactions",
        "1 item(s) never appear in train (cold items)",
        "interactions repeated across splits: train/val 1, val/test 1",
        "1 duplicate interaction(s) inside splits removed (train 1)",
    ]
    for w in ds.warnings:
        assert w in str(ours[0].message)


def test_clean_data_has_no_warnings(tmp_path):
    splits = {"train": {0: [0, 1], 1: [1, 2]}, "val": {0: [2]}, "test": {1: [0]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = load(write_mmssl(tmp_path / "d", splits, features={}))
    assert ds.warnings == [] and ds.modalities == [] and (ds.n_users, ds.n_items) == (2, 3)


def test_ids_only_counts_and_float16(tmp_path):
    """Without features n_items = max item id + 1; float16 features become float32."""
    splits = {"train": {0: [7]}, "val": {4: [1]}, "test": {1: [2]}}
    ds = quiet_load(write_mmssl(tmp_path / "a", splits, features={}))
    assert (ds.n_users, ds.n_items) == (5, 8)
    f16 = {"img": np.ones((9, 2), np.float16)}
    ds = quiet_load(write_mmssl(tmp_path / "b", splits, features=f16))
    assert ds.n_items == 9 and ds.features["img"].dtype == np.float32


def test_select_modalities(tmp_path):
    ds = quiet_load(write_mmssl(tmp_path / "d"))
    assert ds.select_modalities(None).modalities == ["image", "text"]
    assert ds.select_modalities(["text"]).modalities == ["text"]
    assert ds.select_modalities(["text", "image"]).modalities == ["image", "text"]
    none = ds.select_modalities([])
    assert none.modalities == [] and none.n_items == 6 and none.train.nnz == ds.train.nnz
    assert ds.modalities == ["image", "text"]  # the original is untouched
    with pytest.raises(DataError, match=r"'video'.*available: image, text"):
        ds.select_modalities(["image", "video"])


def test_subset_users(tmp_path):
    ds = quiet_load(write_mmssl(tmp_path / "d"))
    sub = ds.subset_users(2, seed=1)
    assert (sub.n_users, sub.n_items) == (2, 6)
    assert sub.modalities == ds.modalities
    assert sub.train.getnnz(axis=1).min() >= 1  # drawn among users with train items
    # Rows are original rows, in id order: find them back.
    rows = [next(u for u in range(ds.n_users) if (ds.train[u] != sub.train[k]).nnz == 0
                 and (ds.test[u] != sub.test[k]).nnz == 0) for k in range(2)]
    assert rows == sorted(rows)
    again = ds.subset_users(2, seed=1)
    assert (again.train != sub.train).nnz == 0
    assert ds.subset_users(100).n_users == 3  # user 3 has no train item
    with pytest.raises(ConfigError):
        ds.subset_users(0)


def test_summary_one_line(tmp_path):
    s = quiet_load(write_mmssl(tmp_path / "d")).summary()
    assert "\n" not in s
    for frag in ("4 users", "6 items", "6/3/4", "image:3", "text:2"):
        assert frag in s


def test_load_synthetic_keyword():
    ds = load("synthetic")
    assert ds.source == "synthetic(users=1000, items=500, seed=0)"
    assert (ds.n_users, ds.n_items) == (1000, 500)


# ----------------------------------------------------------------------------- errors

def _edit_json(root: Path, split: str, text: str) -> Path:
    (root / f"{split}.json").write_text(text)
    return root


@pytest.mark.parametrize("split,text,fragments", [
    ("val", '{"12": [1, "a"]}', ["val.json", "user '12'", "non-integer item id 'a'"]),
    ("train", '{"0": [1.5]}', ["train.json", "user '0'", "non-integer item id 1.5"]),
    ("train", '{"0": [true]}', ["train.json", "non-integer item id True"]),
    ("test", '{"0": [-3]}', ["test.json", "user '0'", "negative item id -3"]),
    ("test", '{"x": [1]}', ["test.json", "non-integer user id 'x'"]),
    ("test", '{"-1": [1]}', ["test.json", "negative user id '-1'"]),
    ("test", '{"01": [1]}', ["test.json", "'01'"]),
    ("test", '{"1": [1], "1": [2]}', ["test.json", "duplicate user id '1'"]),
    ("val", '{"0": 3}', ["val.json", "user '0'", "expected a list"]),
    ("val", '[[0, 1]]', ["val.json", "expected a JSON object"]),
    ("val", '{"0": [1, 2],\n "1": [3,, 4]}', ["val.json", "malformed JSON", "line 2"]),
    ("train", '{"0": [], "1": []}', ["train.json", "train split is empty"]),
    ("train", '{"0": [99]}', ["train.json", "user '0'", "item id 99", "6", "100"]),
])
def test_json_errors(tmp_path, split, text, fragments):
    expect_error(_edit_json(write_mmssl(tmp_path / "d"), split, text), *fragments)


def test_missing_directory_and_split(tmp_path):
    expect_error(tmp_path / "nope", "nope", "does not exist")
    root = write_mmssl(tmp_path / "d")
    (root / "val.json").unlink()
    expect_error(root, "val.json", "missing split file")


def test_layout_detection(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    np.save(root / "image_feat.npy", np.ones((3, 2)))
    expect_error(root, "empty", "no data found")
    both = write_mmssl(tmp_path / "both")
    write_mmrec(both)
    expect_error(both, "tiny.inter", "keep one layout")
    two = write_mmrec(tmp_path / "two")
    (two / "other.inter").write_text((two / "tiny.inter").read_text())
    expect_error(two, "2 .inter files", "expected exactly one")


@pytest.mark.parametrize("features,fragments", [
    ({"image": np.ones((6, 2)), "text": np.ones((5, 2))}, ["text_feat.npy", "5 rows", "6 rows"]),
    ({"image": np.ones((4, 2))}, ["item id", "feature row count 4", "number of items 6"]),
    ({"image": np.array([[np.nan, 1.0]] * 5 + [[np.inf, -np.inf]])},
     ["image_feat.npy", "7 non-finite"]),
    ({"image": np.ones((6, 2), dtype=np.int64)}, ["image_feat.npy", "floating point", "int64"]),
    ({"image": np.ones(6)}, ["image_feat.npy", "2-D"]),
    ({"image": np.ones((6, 2, 2))}, ["image_feat.npy", "2-D"]),
    ({"image": np.ones((6, 0))}, ["image_feat.npy", "0 columns"]),
    ({"image": np.full((6, 2), 1e300)}, ["image_feat.npy", "overflow float32"]),
])
def test_feature_errors(tmp_path, features, fragments):
    expect_error(write_mmssl(tmp_path / "d", features=features), *fragments)


def test_unreadable_npy(tmp_path):
    root = write_mmssl(tmp_path / "d")
    (root / "text_feat.npy").write_bytes(b"this is not numpy")
    expect_error(root, "text_feat.npy", "cannot read")
    (root / "text_feat.npy").unlink()
    np.save(root / "text_feat.npy", np.array([{"a": 1}] * 6, dtype=object))  # needs pickle
    expect_error(root, "text_feat.npy", "cannot read")


@pytest.mark.parametrize("text,fragments", [
    ("userID\titemID\n0\t1\n", ["tiny.inter", "missing column", "x_label"]),
    ("user\titem\tlabel\n0\t1\t0\n", ["tiny.inter", "userID, itemID, x_label"]),
    ("", ["tiny.inter", "empty file"]),
    ("userID\titemID\tx_label\n0\t1\t0\n0\t2\n", ["tiny.inter", "line 3", "expected 3", "found 2"]),
    ("userID\titemID\tx_label\n0\t1\t0\n0\ta\t0\n", ["tiny.inter", "line 3", "non-integer itemID 'a'"]),
    ("userID\titemID\tx_label\n0\t1.0\t0\n", ["tiny.inter", "line 2", "non-integer itemID"]),
    ("userID\titemID\tx_label\n-2\t1\t0\n", ["tiny.inter", "line 2", "negative userID '-2'"]),
    ("userID\titemID\tx_label\n0\t1\t3\n", ["tiny.inter", "line 2", "x_label", "got 3"]),
    ("userID\titemID\tx_label\n0\t1\t1\n0\t2\t2\n", ["tiny.inter", "train split is empty"]),
    ("userID\titemID\tx_label\n0\t1\t0\n1\t60\t1\n1\t2\t2\n", ["tiny.inter", "line 3", "item id 60", "6"]),
])
def test_inter_errors(tmp_path, text, fragments):
    root = write_mmrec(tmp_path / "d")
    (root / "tiny.inter").write_text(text)
    expect_error(root, *fragments)


# ----------------------------------------------------------------------------- real data

def _timed_load(name):
    path = SHARED / name
    if not (path / "train.json").exists():
        pytest.skip(f"{path} not available")
    t = time.perf_counter()
    ds = quiet_load(path)
    return ds, time.perf_counter() - t


def test_real_tiktok():
    ds, seconds = _timed_load("tiktok")
    assert (ds.n_users, ds.n_items) == (9308, 6710)
    assert (ds.train.nnz, ds.val.nnz, ds.test.nnz) == (59541, 3051, 6130)
    assert ds.modalities == ["audio", "image"]
    assert all(f.shape == (6710, 128) and f.dtype == np.float32 for f in ds.features.values())
    assert "10 user(s) have no train interactions" in ds.warnings
    assert "465 item(s) never appear in train (cold items)" in ds.warnings
    assert seconds < 2.0, seconds


def test_real_baby():
    ds, seconds = _timed_load("baby")
    assert (ds.n_users, ds.n_items) == (19445, 7050)
    assert (ds.train.nnz, ds.val.nnz, ds.test.nnz) == (119674, 20559, 20559)
    assert ds.modalities == []
    assert seconds < 2.0, seconds
