"""The search-space file: parsed and validated completely before Ray starts.

A space file is YAML with these top-level keys (only ``search`` is required)::

    data: synthetic              # "synthetic" or a data directory (either layout), relative to the cwd
    subset_users: null           # an int: search on a random subset of that many users (cheap CPU runs)
    fixed: {epochs: 100}         # any mmssl Config key (paper aliases accepted), held fixed
    search:                      # config key (or alias) -> distribution
      cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}
      dropout:   {dist: uniform, low: 0.0, high: 0.5, step: 0.05}
      n_layers:  {dist: int, low: 1, high: 4}
      adversarial: {dist: categorical, choices: [true, false]}
    metric: val/recall@20        # the validation metric to maximise
    budget: {num_samples: 32, max_concurrent: 4, cpus_per_trial: 1, gpus_per_trial: 0, checkpoint_every: 5}
    asha: {grace_period: 5, reduction_factor: 3}
    final: {seeds: 5}            # re-train the best config with 5 seeds (or a list of seeds)
    tpe: {n_startup_trials: 10}  # optional TPE settings
    seed: 0                      # sampler seed (the trials' own Config seed is fixed.seed)
    name: mmssl-search           # experiment folder name under ``out``
    out: runs/search

Every defect is a :class:`mmssl.errors.ConfigError` whose one-line message names the
file and the key. :func:`load_space` reads a file; :meth:`Space.override` applies the
CLI flags and re-validates; :meth:`Space.optuna_space` gives the Optuna distributions.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from mmssl.config import Config, canonical_key, coerce_value, parse_override, read_yaml_mapping
from mmssl.errors import ConfigError
from mmssl.synthetic import generated_size

TOP_KEYS = ("data", "subset_users", "fixed", "search", "metric", "budget", "asha", "final", "tpe",
            "seed", "name", "out")
DIST_FIELDS = {  # distribution -> (required fields, optional fields)
    "loguniform": (("low", "high"), ()),
    "uniform": (("low", "high"), ("step",)),
    "int": (("low", "high"), ("step", "log")),
    "categorical": (("choices",), ()),
}
NOT_SEARCHABLE = {"epochs": "the budget (fixed.epochs / --max-epochs) and ASHA's max_t",
                  "seed": "the final re-training's seeds (final.seeds)",
                  "device": "Ray's GPU assignment (budget.gpus_per_trial)"}
PAIR_LIMIT = 4096  # value pairs checked per two parameters (beyond: the longer list at its bounds)
MAX_ENUM = 256  # int ranges / categoricals / stepped grids up to this size are checked value by value
METRIC_RE = re.compile(r"^val/(recall|ndcg|precision|hit)@(10|20|50)$")
# section -> {key: (kind, default)}; kind: "int" (>= 1), "pos" (> 0), "nonneg" (>= 0), "rf" (> 1)
SECTIONS = {
    "budget": {"num_samples": ("int", 32), "max_concurrent": ("int", 4), "cpus_per_trial": ("pos", 1.0),
               "gpus_per_trial": ("nonneg", 0.0), "checkpoint_every": ("int", 5),
               "max_failures": ("int0", 2)},
    "asha": {"grace_period": ("int", 5), "reduction_factor": ("rf", 3.0)},
    "tpe": {"n_startup_trials": ("int", 10)},
}


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a config key and its distribution."""

    key: str
    dist: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def to_optuna(self) -> BaseDistribution:
        """The Optuna distribution this parameter is sampled from."""
        if self.dist == "loguniform":
            return FloatDistribution(self.low, self.high, log=True)
        if self.dist == "uniform":
            return FloatDistribution(self.low, self.high, step=self.step)
        if self.dist == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(list(self.choices))

    def extremes(self) -> list[Any]:
        """Values that must all be valid for the model (the bounds, or every choice)."""
        return list(self.choices) if self.dist == "categorical" else [self.low, self.high]

    def values(self) -> list[Any]:
        """Every value the distribution can produce when there are at most ``MAX_ENUM``
        (categorical, int range, stepped uniform grid), else the bounds only."""
        if self.dist == "categorical":
            return list(self.choices)
        if self.dist == "int":  # a log int range still produces every integer in it
            step = self.step or 1
            if (self.high - self.low) // step + 1 <= MAX_ENUM:
                return list(range(int(self.low), int(self.high) + 1, int(step)))
        elif self.dist == "uniform" and self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            if n + 1 <= MAX_ENUM:
                return [self.low + k * self.step for k in range(n)] + [self.high]
        return [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """The space-file form: ``dist`` plus the fields given (``log`` only when true)."""
        d: dict[str, Any] = {"dist": self.dist}
        if self.dist == "categorical":
            d["choices"] = list(self.choices)
            return d
        d.update(low=self.low, high=self.high)
        if self.step is not None:
            d["step"] = self.step
        if self.log and self.dist == "int":
            d["log"] = True
        return d


@dataclass(frozen=True)
class Space:
    """A validated space file plus the CLI overrides; see the module docstring for the keys."""

    path: str
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    subset_users: int | None = None
    metric: str = "val/recall@20"
    num_samples: int = 32
    max_concurrent: int = 4
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    checkpoint_every: int = 5
    max_failures: int = 2  # Tune's FailureConfig: retries of a trial whose worker/node died
    grace_period: int = 5
    reduction_factor: float = 3.0
    final_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    n_startup_trials: int = 10
    seed: int = 0
    name: str = "mmssl-search"
    out: str = "runs/search"

    @property
    def max_epochs(self) -> int:
        return int(self.fixed.get("epochs", Config().epochs))

    def base_config(self) -> dict[str, Any]:
        """The fixed part of every trial's config (canonical keys)."""
        return dict(self.fixed)

    def optuna_space(self) -> dict[str, BaseDistribution]:
        return {k: p.to_optuna() for k, p in self.params.items()}

    def override(self, max_epochs: int | None = None, final_seeds: Any = None, sets: Any = (),
                 **changes: Any) -> "Space":
        """A copy with CLI overrides (``None`` = keep), re-validated as a whole.

        ``sets`` are ``key=value`` strings (``--set``): they update ``fixed``; a searched
        key given there is pinned to that value and leaves the search.
        """
        kw = {k: v for k, v in changes.items() if v is not None}
        fixed = dict(self.fixed)
        params = dict(self.params)
        for item in sets:
            key, value = parse_override(item)
            fixed[key] = value
            params.pop(key, None)
        if max_epochs is not None:
            fixed["epochs"] = _number(max_epochs, "int", f"{self.path}: --max-epochs")
        kw["fixed"] = _check_fixed(fixed, f"{self.path} (with --set/--max-epochs)")
        if not params:
            raise ConfigError(f"{self.path}: --set pinned every searched hyperparameter; nothing left to search")
        _check_extremes(params, kw["fixed"], self.path)
        kw["params"] = params
        if final_seeds is not None:
            kw["final_seeds"] = _seeds(final_seeds, self.path)
        for key in ("num_samples", "max_concurrent", "checkpoint_every", "grace_period", "n_startup_trials"):
            if key in kw:
                kw[key] = _number(kw[key], "int", f"{self.path}: --{key.replace('_', '-')}")
        for key, kind in (("cpus_per_trial", "pos"), ("gpus_per_trial", "nonneg"), ("reduction_factor", "rf"),
                          ("max_failures", "int0")):
            if key in kw:
                kw[key] = _number(kw[key], kind, f"{self.path}: --{key.replace('_', '-')}")
        if "subset_users" in kw:
            kw["subset_users"] = _number(kw["subset_users"], "int", f"{self.path}: --subset-users")
        space = dataclasses.replace(self, **kw)
        _check_whole(space)
        return space

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (for the experiment folder's ``search.json``)."""
        d = dataclasses.asdict(self)
        d["params"] = {k: p.to_dict() for k, p in self.params.items()}
        d["final_seeds"] = list(self.final_seeds)
        return d


def load_space(path: str) -> Space:
    """Read and validate a space file; ConfigError (one line, naming the key) on any defect."""
    raw = read_yaml_mapping(path)
    where = str(path)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key '{unknown[0]}' (known: {', '.join(TOP_KEYS)})")
    if "search" not in raw or raw["search"] is None:
        raise ConfigError(f"{where}: missing 'search' (a mapping of hyperparameter: distribution)")
    fixed = _check_fixed(_mapping(raw.get("fixed"), f"{where}: fixed"), where)
    params = _check_search(raw["search"], fixed, where)
    kw: dict[str, Any] = {"path": where, "params": params, "fixed": fixed}
    for sec, spec in SECTIONS.items():
        d = _mapping(raw.get(sec), f"{where}: {sec}")
        for key, value in d.items():
            if key not in spec:
                raise ConfigError(f"{where}: unknown key '{sec}.{key}' (known: {', '.join(spec)})")
            kw[key] = _number(value, spec[key][0], f"{where}: {sec}.{key}")
    final = _mapping(raw.get("final"), f"{where}: final")
    for key in final:
        if key != "seeds":
            raise ConfigError(f"{where}: unknown key 'final.{key}' (known: seeds)")
    if "seeds" in final:
        kw["final_seeds"] = _seeds(final["seeds"], where)
    for key in ("data", "name", "out"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise ConfigError(f"{where}: '{key}' must be a non-empty string, got {raw[key]!r}")
            kw[key] = raw[key]
    if raw.get("subset_users") is not None:
        kw["subset_users"] = _number(raw["subset_users"], "int", f"{where}: subset_users")
    if "seed" in raw:
        kw["seed"] = _number(raw["seed"], "int0", f"{where}: seed")
    if "metric" in raw:
        kw["metric"] = raw["metric"]
    space = Space(**kw)
    _check_whole(space)
    return space


# ----------------------------------------------------------------------------- helpers

def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _number(value: Any, kind: str, where: str) -> int | float:
    """Check a budget-like number; kinds: int (>= 1), int0 (>= 0), pos (> 0), nonneg (>= 0), rf (> 1)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind in ("int", "int0"):
        ok = ok_type and float(value).is_integer() and value >= (1 if kind == "int" else 0)
        if not ok:
            raise ConfigError(f"{where}: must be an integer >= {1 if kind == 'int' else 0}, got {value!r}")
        return int(value)
    bound = {"pos": (0, "> 0"), "nonneg": (0, ">= 0"), "rf": (1, "> 1")}[kind]
    ok = ok_type and (value >= bound[0] if kind == "nonneg" else value > bound[0])
    if not ok:
        raise ConfigError(f"{where}: must be a number {bound[1]}, got {value!r}")
    return float(value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    """``final.seeds``: a count N (seeds 1..N) or an explicit list of distinct integers."""
    if isinstance(value, list):
        seeds = tuple(_number(v, "int0", f"{where}: final.seeds") for v in value)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: final.seeds: seeds must be distinct, got {value!r}")
        return seeds
    n = _number(value, "int0", f"{where}: final.seeds")
    return tuple(range(1, n + 1))


def _check_fixed(fixed: dict, where: str) -> dict[str, Any]:
    """Canonical keys, each type-checked by building a Config from them."""
    out: dict[str, Any] = {}
    for raw_key, value in fixed.items():
        key = canonical_key(str(raw_key), f"{where}: fixed")
        if key in out:
            raise ConfigError(f"{where}: fixed: '{key}' given twice (once as an alias)")
        out[key] = value
    cfg = Config.from_dict(out, where=f"{where}: fixed")
    return {k: getattr(cfg, k) for k in out}


def _float(value: Any, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def _check_param(key: str, spec: Any, where: str) -> Param:
    w = f"{where}: search.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{w}: expected a mapping like {{dist: loguniform, low: .., high: ..}}, got {spec!r}")
    dist = spec.get("dist")
    if dist not in DIST_FIELDS:
        raise ConfigError(f"{w}: unknown distribution {dist!r} (known: {', '.join(DIST_FIELDS)})")
    required, optional = DIST_FIELDS[dist]
    for f in spec:
        if f != "dist" and f not in required + optional:
            raise ConfigError(f"{w}: '{f}' is not a field of a {dist} distribution "
                              f"(fields: {', '.join(required + optional)})")
    for f in required:
        if f not in spec:
            raise ConfigError(f"{w}: a {dist} distribution needs '{f}'")
    if dist == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{w}: choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{w}: choices must be scalars (number, string, bool, null), got {c!r}")
        typed = []
        for c in choices:  # the value a trial gets (e.g. YAML's string "1e-3" -> 0.001 for a float key)
            try:
                v = coerce_value(key, c, w)
            except ConfigError:
                v = c  # reported with its key by the value check
            typed.append(v if isinstance(v, (bool, int, float)) else c)
        for i, a in enumerate(typed):
            for b in typed[i + 1:]:
                if a == b:  # Optuna finds a choice by ==: 1, 1.0 and true are one choice to it
                    raise ConfigError(f"{w}: choices must be distinct values, got {a!r} and {b!r} "
                                      f"(equal as numbers) in {choices!r}")
        return Param(key, dist, choices=tuple(typed))
    low, high = _float(spec["low"], f"{w}.low"), _float(spec["high"], f"{w}.high")
    if low >= high:
        raise ConfigError(f"{w}: low ({low:g}) must be < high ({high:g})")
    log = dist == "loguniform" or spec.get("log", False) is True
    if "log" in spec and not isinstance(spec["log"], bool):
        raise ConfigError(f"{w}.log: must be true or false, got {spec['log']!r}")
    if log and low <= 0:
        raise ConfigError(f"{w}: a log range must lie above 0, got low = {low:g}")
    step = None
    if "step" in spec:
        step = _float(spec["step"], f"{w}.step")
        if step <= 0 or step > high - low:
            raise ConfigError(f"{w}.step: must be > 0 and <= high - low ({high - low:g}), got {step:g}")
        if log:
            raise ConfigError(f"{w}: 'step' cannot be combined with a log scale")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, n):
            top = low + math.floor(n + 1e-9) * step
            raise ConfigError(f"{w}.step: high - low = {high - low:g} is not a multiple of the step {step:g}, "
                              f"so Optuna would search [{low:g}, {top:g}], not up to high = {high:g}; "
                              f"choose a step that divides the range")
    if dist == "int":
        for name, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and not float(v).is_integer():
                raise ConfigError(f"{w}.{name}: must be an integer for an int distribution, got {v:g}")
        return Param(key, dist, int(low), int(high), int(step) if step else None, log)
    return Param(key, dist, low, high, step, log)


def _check_search(search: Any, fixed: dict[str, Any], where: str) -> dict[str, Param]:
    if not isinstance(search, dict) or not search:
        raise ConfigError(f"{where}: 'search' must be a non-empty mapping of hyperparameter: distribution")
    params: dict[str, Param] = {}
    for raw_key, spec in search.items():
        key = canonical_key(str(raw_key), f"{where}: search")
        if key in NOT_SEARCHABLE:
            raise ConfigError(f"{where}: search.{raw_key}: '{key}' cannot be searched; it is set by "
                              f"{NOT_SEARCHABLE[key]}")
        if key in params:
            raise ConfigError(f"{where}: search: '{key}' given twice (once as an alias)")
        if key in fixed:
            raise ConfigError(f"{where}: '{key}' is both fixed and searched")
        param = _check_param(str(raw_key), spec, where)
        params[key] = dataclasses.replace(param, key=key)
    _check_extremes(params, fixed, where)
    return params


def _check_extremes(params: dict[str, Param], fixed: dict[str, Any], where: str) -> None:
    """Every value a distribution can produce, on top of ``fixed``, must make a valid Config.

    Each parameter's :meth:`Param.values` (all of them for categoricals, int ranges and
    stepped grids up to ``MAX_ENUM`` values; the bounds otherwise: the model's rules on a
    float are bounds) is checked alone and with every value of every other parameter,
    which covers the Config's cross-key rules (all between two keys, e.g. ``n_heads``
    must divide ``embed_dim``); past ``PAIR_LIMIT`` pairs the longer list is cut to its
    bounds. The first invalid value is named with what it was paired with.
    """
    def check(values: dict[str, Any], key: str) -> None:
        try:
            Config.from_dict({**fixed, **values})
        except ConfigError as e:
            msg = str(e).split(": ", 1)[-1]
            others = [f"{k}={v!r}" + ("" if k in params else " (fixed)") for k, v in values.items() if k != key]
            fixed_dep = [f"{k}={v!r} (fixed)" for k, v in fixed.items() if k in msg and k not in values]
            ctx = others + fixed_dep
            with_ = f" with {', '.join(ctx)}" if ctx else ""
            raise ConfigError(f"{where}: search.{key}: value {values[key]!r}{with_} is not valid ({msg}); "
                              f"every value the distribution can produce must be valid") from None

    values = {k: p.values() for k, p in params.items()}
    keys = list(params)
    for key in keys:
        for v in values[key]:
            check({key: v}, key)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            va, vb = values[a], values[b]
            if len(va) * len(vb) > PAIR_LIMIT:  # keep it fast: the longer list at its bounds only
                va, vb = (va, vb[:: max(1, len(vb) - 1)]) if len(va) <= len(vb) else (va[:: max(1, len(va) - 1)], vb)
            for x in va:
                for y in vb:
                    check({b: y, a: x}, b)


def _check_whole(space: Space) -> None:
    """Checks that involve several sections (run again after the CLI overrides)."""
    w = space.path
    if not isinstance(space.metric, str) or not METRIC_RE.match(space.metric):
        raise ConfigError(f"{w}: metric: expected val/<recall|ndcg|precision|hit>@<10|20|50>, "
                          f"got {space.metric!r}")
    if space.data.startswith("synthetic:") and generated_size(space.data) is None:
        raise ConfigError(f"{w}: data: expected 'synthetic', 'synthetic:<users>x<items>' or a directory, "
                          f"got {space.data!r}")
    if "/" in space.name or "\\" in space.name or space.name.strip() in ("", ".", ".."):
        raise ConfigError(f"{w}: name: must be one folder name (OUT/NAME holds the experiment), got {space.name!r}")
    if space.grace_period > space.max_epochs:
        raise ConfigError(f"{w}: asha.grace_period ({space.grace_period}) must be <= the maximum "
                          f"epochs ({space.max_epochs}; fixed.epochs or --max-epochs)")


def space_changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """What differs between two :meth:`Space.to_dict` records (as read back from JSON), one
    phrase each: ``"search.dropout.high 0.5 -> 0.4"``, ``"fixed.epochs 60 -> 80"``, ``"num_samples 8 -> 9"``.
    ``path``, ``name``, ``out`` (where the file and the experiment are) and ``ignore`` are skipped."""
    out: list[str] = []
    skip = {"path", "name", "out", *ignore}
    for key in sorted((set(old) | set(new)) - skip):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in ("params", "fixed") and isinstance(a, dict) and isinstance(b, dict):
            label = "search" if key == "params" else "fixed"
            for k in sorted(set(a) | set(b)):
                if k not in b:
                    out.append(f"{label}.{k} removed")
                elif k not in a:
                    out.append(f"{label}.{k} added")
                elif a[k] != b[k]:
                    if isinstance(a[k], dict) and isinstance(b[k], dict):
                        out += [f"{label}.{k}.{f} {a[k].get(f)!r} -> {b[k].get(f)!r}"
                                for f in sorted(set(a[k]) | set(b[k])) if a[k].get(f) != b[k].get(f)]
                    else:
                        out.append(f"{label}.{k} {a[k]!r} -> {b[k]!r}")
        else:
            out.append(f"{key} {a!r} -> {b!r}")
    return out
