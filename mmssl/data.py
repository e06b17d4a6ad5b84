"""Loading and validating recommendation data sets (interactions + item features).

``load(path)`` reads a directory in one of two layouts, detected automatically:

1. **MMSSL layout** -- ``train.json``, ``val.json``, ``test.json``, each
   ``{"<user id>": [item id, ...]}`` (an empty list is allowed), plus one
   ``<name>_feat.npy`` per modality (``float`` array ``[n_items, d_m]``, row i = item i).
2. **MMRec layout** -- exactly one ``<name>.inter`` tab-separated file whose
   header contains ``userID``, ``itemID`` and ``x_label`` (0/1/2 = train/val/test;
   other columns are ignored, column order is free), plus the same ``*_feat.npy``.

``load("synthetic")`` returns the project's embedded planted-signal data set
(:func:`mmssl.synthetic.default_dataset`).

Every defect that makes the data unusable raises :class:`mmssl.errors.DataError`
with one line naming the file and the defect. Oddities that do not (users
without train items, items never in train, interactions repeated across splits,
duplicates inside a split) are collected in ``Dataset.warnings`` and emitted once
per load as a :class:`DataWarning`. Both layouts go through the same assembly
step, so the same content gives identical arrays whichever layout holds it.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from mmssl.errors import ConfigError, DataError
from mmssl.fingerprint import fingerprint  # noqa: F401 -- re-exported: mmssl.data.fingerprint(ds)
from mmssl.textfiles import read_text, read_tsv

SPLITS = ("train", "val", "test")
FEATURE_SUFFIX = "_feat.npy"
INTER_COLUMNS = ("userID", "itemID", "x_label")
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
SPLIT_NEEDS = {"train": "the model has nothing to learn from",
               "val": "model selection and early stopping need validation interactions",
               "test": "the final evaluation needs test interactions"}
MAX_ID = 2**31 - 2  # ids must fit scipy's int32 sparse indices (with one to spare for the count)


class DataWarning(UserWarning):
    """Something about the data is odd but usable (see ``Dataset.warnings``)."""


@dataclass
class Dataset:
    """Implicit-feedback interactions split three ways, plus per-item modality features.

    ``train``/``val``/``test`` are ``(n_users, n_items)`` CSR matrices of float32 ones
    with sorted indices and no duplicates. ``features`` maps a modality name to a
    float32, C-contiguous ``[n_items, d_m]`` array; its insertion order is sorted by
    name. ``warnings`` holds the human-readable warnings collected at load.
    """

    n_users: int
    n_items: int
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    features: dict[str, np.ndarray]
    source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def modalities(self) -> list[str]:
        """Modality names, sorted."""
        return list(self.features)

    def select_modalities(self, names: list[str] | None) -> "Dataset":
        """Keep only the named modalities: ``None`` keeps all, ``[]`` keeps none (ID-only).

        Unknown names raise :class:`DataError` naming them and listing the available ones;
        so does ``None`` on data without features (the multi-modal model would silently
        be the ID-only one). The interaction matrices are shared with ``self``, not copied.
        """
        if names is None and not self.features:
            raise DataError(f"{self.source}: the data has no item features (no *{FEATURE_SUFFIX} file) but "
                            f"the config asks for the data's modalities (modalities: null, the default); "
                            f"add <name>{FEATURE_SUFFIX} files, or set modalities=[] for the ID-only model")
        if names is None:
            return replace(self, features=dict(self.features), warnings=list(self.warnings))
        names = [names] if isinstance(names, str) else names
        unknown = [n for n in names if n not in self.features]
        if unknown:
            available = ", ".join(self.features) or "none (ID-only data)"
            raise DataError(f"{self.source}: unknown modality {', '.join(map(repr, unknown))}; "
                            f"available: {available}")
        wanted = set(names)
        return replace(self, features={k: v for k, v in self.features.items() if k in wanted},
                       warnings=list(self.warnings))

    def subset_users(self, n: int, seed: int = 0) -> "Dataset":
        """A random subset of ``n`` users (all items kept), re-indexed 0..n-1 in id order.

        Users are drawn among those with at least one train interaction, so the
        subset's train split is never empty. ``n`` at least the number of such users
        returns all of them. Meant for cheap CPU runs.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"subset_users: n must be a positive integer, got {n!r}")
        eligible = np.flatnonzero(np.diff(self.train.indptr) > 0)
        keep = eligible if n >= len(eligible) else np.sort(
            np.random.default_rng(seed).choice(eligible, size=int(n), replace=False))
        mats = {s: _canonical(getattr(self, s)[keep]) for s in SPLITS}
        ds = Dataset(len(keep), self.n_items, mats["train"], mats["val"], mats["test"],
                     dict(self.features),
                     f"{self.source} [users: {len(keep)} of {self.n_users}, seed {seed}]", [])
        for s in ("val", "test"):
            if mats[s].nnz == 0:
                raise DataError(f"{ds.source}: the {SPLIT_NAMES[s]} split of the {len(keep)}-user subset "
                                f"is empty; {SPLIT_NEEDS[s]} (use more users)")
        ds.warnings = _interaction_warnings(ds, {})
        return ds

    def summary(self) -> str:
        """One line: users, items, split sizes, density, modalities with their widths."""
        mods = ", ".join(f"{k}:{v.shape[1]}" for k, v in self.features.items()) or "none (ID-only)"
        density = self.train.nnz / max(1, self.n_users * self.n_items)
        return (f"{self.n_users} users, {self.n_items} items, train/val/test = "
                f"{self.train.nnz}/{self.val.nnz}/{self.test.nnz} interactions "
                f"(train density {density:.4f}), modalities: {mods}")


# ----------------------------------------------------------------------------- entry point

def load(path: str | os.PathLike) -> Dataset:
    """Load a data set directory (layout detected), or ``"synthetic"`` for the embedded one."""
    if isinstance(path, str) and path == "synthetic":
        from mmssl.synthetic import default_dataset  # lazy: synthetic imports this module
        return default_dataset()
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: " + ("not a directory" if root.exists() else
                                       "data directory does not exist"))

    json_files = [root / f"{s}.json" for s in SPLITS]
    has_json = any(p.exists() for p in json_files)
    inter_files = sorted(p for p in root.glob("*.inter") if p.is_file())
    if has_json and inter_files:
        raise DataError(f"{root}: both MMSSL split files (train/val/test.json) and an MMRec "
                        f"file ({inter_files[0].name}) are present; keep one layout")
    if not has_json and not inter_files:
        raise DataError(f"{root}: no data found: expected train.json/val.json/test.json "
                        f"(MMSSL layout) or one <name>.inter file (MMRec layout)")

    features = _load_features(root)
    if has_json:
        splits = {}
        for s, p in zip(SPLITS, json_files):
            if not p.is_file():
                raise DataError(f"{p}: missing split file (the MMSSL layout needs "
                                f"train.json, val.json and test.json)")
            splits[s] = _read_json_split(p)
    else:
        if len(inter_files) > 1:
            raise DataError(f"{root}: {len(inter_files)} .inter files found "
                            f"({', '.join(p.name for p in inter_files)}); expected exactly one")
        splits = _read_inter(inter_files[0])

    ds = _assemble(splits, features, source=str(root))
    if ds.warnings:
        warnings.warn(f"{root}: " + "; ".join(ds.warnings), DataWarning, stacklevel=2)
    return ds


def from_interactions(n_users: int, n_items: int,
                      splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      features: dict[str, np.ndarray], source: str) -> Dataset:
    """Build a :class:`Dataset` from ``{split: (user ids, item ids)}`` arrays (no I/O, no warn).

    Used by the synthetic generator; duplicates are removed and warnings collected
    exactly as :func:`load` does.
    """
    mats, dups = {}, {}
    for s in SPLITS:
        u, i = (np.asarray(a, dtype=np.int64) for a in splits[s])
        if len(u) and (min(u.min(), i.min()) < 0 or u.max() >= n_users or i.max() >= n_items):
            raise DataError(f"{source}: {s} split has ids outside {n_users} users x {n_items} items")
        mats[s], dups[s] = _to_csr(u, i, n_users, n_items)
    feats = {k: np.ascontiguousarray(features[k], dtype=np.float32) for k in sorted(features)}
    ds = Dataset(n_users, n_items, mats["train"], mats["val"], mats["test"], feats, source, [])
    ds.warnings = _interaction_warnings(ds, dups)
    return ds


# ----------------------------------------------------------------------------- features

def _load_features(root: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """Read every ``<name>_feat.npy``: 2-D, floating point, finite, same row count."""
    out: dict[str, tuple[np.ndarray, Path]] = {}
    for p in sorted(root.glob("*" + FEATURE_SUFFIX)):
        if not p.is_file():
            continue
        name = p.name[: -len(FEATURE_SUFFIX)]
        if not name:
            raise DataError(f"{p}: feature file needs a modality name: <name>{FEATURE_SUFFIX}")
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 -- any unreadable file is a data error
            raise DataError(_one_line(f"{p}: cannot read .npy file ({type(e).__name__}: {e})")) from e
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise DataError(f"{p}: features must be a 2-D array [n_items, dim], "
                            f"got shape {getattr(arr, 'shape', '?')}")
        if arr.dtype.kind != "f":
            raise DataError(f"{p}: features must be floating point, got dtype {arr.dtype}")
        if arr.shape[1] == 0:
            raise DataError(f"{p}: features have 0 columns")
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise DataError(f"{p}: {bad} non-finite value(s) (NaN/inf) in features")
        with np.errstate(over="ignore"):
            arr32 = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.dtype.itemsize > 4 and not np.isfinite(arr32).all():
            raise DataError(f"{p}: values overflow float32")
        if out:
            arr0, p0 = next(iter(out.values()))
            if arr32.shape[0] != arr0.shape[0]:
                raise DataError(f"{p}: {arr32.shape[0]} rows but {p0.name} has {arr0.shape[0]} "
                                f"rows (every feature file needs one row per item)")
        out[name] = (arr32, p)
    return out


# ----------------------------------------------------------------------------- interactions

class _Split:
    """One split's interactions; ``where(k)`` describes interaction k for error messages."""

    def __init__(self, file: Path, users: np.ndarray, items: np.ndarray,
                 where: Callable[[int], str], max_user: int = -1):
        self.file, self.users, self.items, self.where = file, users, items, where
        # JSON keys with an empty list still count toward n_users.
        self.max_user = max(max_user, int(users.max()) if len(users) else -1)


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs (keeps duplicate keys visible)."""


def _read_json_split(p: Path) -> _Split:
    """Parse ``{"<user id>": [item ids]}`` strictly: integer ids, no duplicate keys."""
    text = read_text(p)  # a BOM / UTF-16 loads as the clean UTF-8 file
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(obj, _Pairs):
        raise DataError(f"{p}: expected a JSON object {{\"<user id>\": [item ids]}}, "
                        f"got {type(obj).__name__}")
    user_ids: dict[int, list] = {}
    for key, items in obj:
        uid = _parse_key(p, key)
        if uid in user_ids:
            raise DataError(f"{p}: duplicate user id '{key}'")
        if isinstance(items, _Pairs) or not isinstance(items, list):
            got = "an object" if isinstance(items, _Pairs) else type(items).__name__
            raise DataError(f"{p}: user '{key}': expected a list of item ids, got {got}")
        if not all(type(x) is int and 0 <= x <= MAX_ID for x in items):
            x = next(x for x in items if not (type(x) is int and 0 <= x <= MAX_ID))
            what = ("non-integer" if type(x) is not int else "negative" if x < 0
                    else f"too large (max {MAX_ID})")
            raise DataError(f"{p}: user '{key}' has {what} item id {x!r}")
        user_ids[uid] = items
    lengths = np.fromiter(map(len, user_ids.values()), dtype=np.int64, count=len(user_ids))
    users = np.repeat(np.fromiter(user_ids, dtype=np.int64, count=len(user_ids)), lengths)
    items = np.fromiter((x for lst in user_ids.values() for x in lst), dtype=np.int64,
                        count=int(lengths.sum()))
    # Keys are canonical, so str(user id) is the key as written.
    return _Split(p, users, items, lambda k: f"user '{users[k]}'", max(user_ids, default=-1))


def _parse_id(text: str) -> int:
    """A non-negative integer id written in decimal, else ValueError("negative"/"non-integer"/...)."""
    if text.isascii() and text.isdigit():
        if int(text) > MAX_ID:
            raise ValueError(f"too large (max {MAX_ID})")
        return int(text)
    raise ValueError("negative" if text[:1] == "-" and text[1:].isascii() and text[1:].isdigit()
                     else "non-integer")


def _parse_key(p: Path, key: str) -> int:
    """A JSON key must be a canonical non-negative integer string."""
    try:
        uid = _parse_id(key)
    except ValueError as e:
        raise DataError(f"{p}: {e} user id '{key}'") from None
    if key != str(uid):
        raise DataError(f"{p}: user id '{key}' is not a canonical integer (leading zero)")
    return uid


def _read_inter(p: Path) -> dict[str, _Split]:
    """Parse an MMRec ``.inter`` TSV with header columns userID, itemID, x_label.

    Read with :func:`mmssl.textfiles.read_tsv` (pandas): a BOM, UTF-16, CRLF/CR line
    ends, quoted fields, blank lines and extra columns load as the clean file does.
    """
    table, line_no = read_tsv(p, INTER_COLUMNS)
    ids = {}
    for col in INTER_COLUMNS:
        values = table[col]
        ok = values.str.fullmatch(r"[0-9]{1,10}").to_numpy()
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            _tsv_int(p, int(line_no[k]), col, values.iloc[k])  # raises the one-line DataError
        ids[col] = values.to_numpy().astype(np.int64)
        big = np.flatnonzero(ids[col] > MAX_ID)
        if len(big):
            _tsv_int(p, int(line_no[big[0]]), col, values.iloc[int(big[0])])
    x = ids["x_label"]
    bad = np.flatnonzero((x < 0) | (x > 2))
    if len(bad):
        raise DataError(f"{p}: line {line_no[bad[0]]}: x_label must be 0, 1 or 2 (train/val/test), "
                        f"got {x[bad[0]]}")
    out = {}
    for code, s in enumerate(SPLITS):
        sel = x == code
        out[s] = _Split(p, ids["userID"][sel], ids["itemID"][sel],
                        lambda k, ln=line_no[sel]: f"line {ln[k]}")
    return out


def _tsv_int(p: Path, n: int, col: str, value: str) -> int:
    """One TSV field as a non-negative integer id, or a DataError naming file, line, column."""
    try:
        return _parse_id(value.strip())
    except ValueError as e:
        raise DataError(f"{p}: line {n}: {e} {col} {value!r}") from None


# ----------------------------------------------------------------------------- assembly

def _assemble(splits: dict[str, _Split], features: dict[str, tuple[np.ndarray, Path]],
              source: str) -> Dataset:
    """Check ranges, build the CSR matrices and collect warnings (shared by both layouts)."""
    for code, (s, split) in enumerate(splits.items()):  # the protocol needs all three
        if len(split.items) == 0:
            what = f"no rows with x_label {code}" if split.file.suffix == ".inter" else "no interactions"
            raise DataError(f"{split.file}: the {SPLIT_NAMES[s]} split is empty ({what}); "
                            f"{SPLIT_NEEDS[s]}")
    n_users = 1 + max(s.max_user for s in splits.values())
    if features:
        arr0, file0 = next(iter(features.values()))
        n_items = arr0.shape[0]
        referenced = 1 + max(int(s.items.max()) for s in splits.values() if len(s.items))
        for s in splits.values():
            bad = np.flatnonzero(s.items >= n_items)
            if len(bad):
                k = int(bad[0])
                raise DataError(f"{s.file}: {s.where(k)}: item id {int(s.items[k])} is out of "
                                f"range: feature row count {n_items} ({file0.name}) != number of "
                                f"items {referenced} referenced by the splits")
    else:
        n_items = 1 + max(int(s.items.max()) for s in splits.values() if len(s.items))
    return from_interactions(n_users, n_items, {k: (s.users, s.items) for k, s in splits.items()},
                             {k: v[0] for k, v in features.items()}, source)


def _to_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
            ) -> tuple[sp.csr_matrix, int]:
    """Deduplicated CSR of float32 ones; also returns how many duplicates were dropped."""
    keys = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))  # sorted
    rows, cols = np.divmod(keys, n_items)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_users))])
    m = sp.csr_matrix((np.ones(len(keys), dtype=np.float32), cols, indptr), shape=(n_users, n_items))
    return _canonical(m), len(users) - len(keys)


def _canonical(m: sp.spmatrix) -> sp.csr_matrix:
    """CSR, float32 ones, sorted indices, no duplicates."""
    m = sp.csr_matrix(m, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    m.data[:] = 1.0
    return m


def _interaction_warnings(ds: Dataset, dups: dict[str, int]) -> list[str]:
    """Human-readable warnings about usable-but-odd interactions (not emitted here)."""
    out = []
    no_train = int(np.count_nonzero(np.diff(ds.train.indptr) == 0))
    if no_train:
        out.append(f"{no_train} user(s) have no train interactions")
    cold = ds.n_items - int(np.count_nonzero(np.bincount(ds.train.indices, minlength=ds.n_items)))
    if cold:
        out.append(f"{cold} item(s) never appear in train (cold items)")
    keys = {s: flat_keys(getattr(ds, s)) for s in SPLITS}  # sorted: canonical CSR is row-major, sorted
    pairs = (("train", "val"), ("train", "test"), ("val", "test"))
    counts = {f"{a}/{b}": len(np.intersect1d(keys[a], keys[b], assume_unique=True)) for a, b in pairs}
    overlaps = [f"{k} {n}" for k, n in counts.items() if n]
    if overlaps:
        out.append("interactions repeated across splits: " + ", ".join(overlaps))
    if any(dups.values()):
        parts = ", ".join(f"{s} {n}" for s, n in dups.items() if n)
        out.append(f"{sum(dups.values())} duplicate interaction(s) inside splits removed ({parts})")
    return out


def flat_keys(m: sp.csr_matrix) -> np.ndarray:
    """Row-major flat indices ``row * n_cols + col`` (int64) of a CSR's stored entries; sorted for canonical CSR."""
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows * m.shape[1] + m.indices.astype(np.int64)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())
