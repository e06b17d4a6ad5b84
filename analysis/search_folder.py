"""Read a finished search folder (``tune/search.py``'s ``OUT/NAME/``) for the analyses.

A finished search holds ``search.json`` (the resolved space), ``trials.parquet``
(or ``trials.csv``), ``curves.parquet``, ``best.json`` and ``study.db`` (the Optuna
study, ``study_name="mmssl"``); see ``tune/results.py`` for every column. An
interrupted search has no ``best.json`` yet: it is refused with a one-line
:class:`~mmssl.errors.ConfigError` that says how to finish it.

:func:`load_search` returns a :class:`SearchFolder`; :func:`space_from_dict`
rebuilds the :class:`tune.space.Space` recorded in ``search.json`` (so the
analysis does not need the original space file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmssl.errors import ConfigError
from tune.space import Param, Space

REQUIRED = ("search.json", "best.json", "curves.parquet", "study.db")
STUDY_NAME = "mmssl"  # tune.runner.STUDY_NAME (not imported: that module starts Ray's imports)


@dataclass
class SearchFolder:
    """A finished search: its space, tables and Optuna study.

    ``trials``: one row per trial (``status`` in completed / stopped_early / failed,
    one column per searched hyperparameter, ``objective``, ``optuna_number``, ...);
    ``curves``: one row per (trial, epoch); ``best``: ``best.json`` as a dict;
    ``study``: the ``optuna.Study`` loaded from ``study.db`` (read only by us).
    """

    path: Path
    space: Space
    trials: pd.DataFrame
    curves: pd.DataFrame
    best: dict[str, Any]
    study: Any

    @property
    def metric(self) -> str:
        """The searched validation metric, e.g. ``val/recall@20``."""
        return self.space.metric

    @property
    def data_name(self) -> str:
        """The data set as the search named it (``synthetic:300x200``, a directory name, ...)."""
        data = str(self.best.get("data") or self.space.data)
        name = data if data.startswith("synthetic") else Path(data).name or data
        subset = self.best.get("subset_users") or self.space.subset_users
        return f"{name} (random {subset}-user subset)" if subset else name

    def best_params(self) -> dict[str, Any]:
        """The best trial's searched values (``best.json`` ``params``); empty if every trial failed."""
        return dict(self.best.get("params") or {})


def space_from_dict(d: dict[str, Any], where: str) -> Space:
    """The :class:`Space` saved by ``Space.to_dict`` in ``search.json``; ConfigError if malformed."""
    try:
        params = {}
        for k, p in d["params"].items():
            fields = {f: (tuple(v) if f == "choices" else v) for f, v in p.items() if f != "key"}
            if fields.get("dist") in ("uniform", "int"):  # search.json files written before the fix of
                fields.setdefault("low", 0)                 # Space.to_dict dropped a bound equal to 0
                fields.setdefault("high", 0)
            params[k] = Param(key=k, **fields)
        kw = {k: v for k, v in d.items() if k != "params"}
        kw["final_seeds"] = tuple(kw.get("final_seeds") or ())
        return Space(params=params, **kw)
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{where}: 'space' is not a space written by tune/search.py ({type(e).__name__}: {e})") from None


def load_search(path: str | Path) -> SearchFolder:
    """Load the finished search in ``path``.

    Raises ConfigError (one line, naming the folder and the missing/broken file) when
    ``path`` is not a folder, is not a search, or is an unfinished search.
    """
    import optuna

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"--study {folder}: no such folder (give a search folder OUT/NAME of tune/search.py)")
    if not (folder / "search.json").is_file():
        raise ConfigError(f"--study {folder}: not a search folder (no search.json; run tune/search.py first)")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if not (folder / "trials.parquet").is_file() and not (folder / "trials.csv").is_file():
        missing.append("trials.parquet")
    if missing:
        raise ConfigError(f"--study {folder}: not a finished search (missing {', '.join(missing)}); finish it with "
                          f"python tune/search.py --resume --out {folder.parent} --name {folder.name}")
    saved = _json(folder / "search.json")
    if not isinstance(saved.get("space"), dict):
        raise ConfigError(f"{folder / 'search.json'}: no 'space' mapping (not written by tune/search.py)")
    space = space_from_dict(saved["space"], str(folder / "search.json"))
    best = _json(folder / "best.json")
    trials = _table(folder, "trials")
    curves = _table(folder, "curves")
    for col in ("status", "objective", *space.params):
        if col not in trials.columns:
            raise ConfigError(f"{folder}: the trials table has no column '{col}' (not this search's table)")
    for col in ("trial_id", "epoch"):
        if col not in curves.columns:
            raise ConfigError(f"{folder / 'curves.parquet'}: no column '{col}'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{folder / 'study.db'}")
    except Exception as e:  # noqa: BLE001 - optuna/sqlalchemy/sqlite raise many types for a bad db
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{folder / 'study.db'}: cannot load the Optuna study '{STUDY_NAME}' ({msg})") from None
    return SearchFolder(folder, space, trials, curves, best, study)


def _json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _table(folder: Path, name: str) -> pd.DataFrame:
    parquet, csv = folder / f"{name}.parquet", folder / f"{name}.csv"
    try:
        return pd.read_parquet(parquet) if parquet.is_file() else pd.read_csv(csv)
    except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types for a damaged file
        bad = parquet if parquet.is_file() else csv
        raise ConfigError(f"{bad}: unreadable table ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
