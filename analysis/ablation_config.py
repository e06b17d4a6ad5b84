"""The ablation file (``configs/ablation.yaml``): read, validate, resolve. No Ray, no training.

Keys (all optional except that ``full`` must be among explicit variants)::

    datasets:                       # list; default [synthetic]
      - synthetic                   # the embedded planted-signal data
      - synthetic:300x200           # a generated one of that size (seed 0)
      - ../shared/data/tiktok       # a data directory (either layout), relative to the cwd
      - {data: ../shared/data/tiktok, subset_users: 3000, name: tiktok-3k}
    base:
      config: configs/mmssl.yaml    # a config YAML, or the best.json of a finished search
      set: {adversarial: false}     # overrides (mapping, or list of key=value); aliases ok
      epochs: 40                    # of every run (--epochs)
      patience: 10
    variants:                       # name -> ANY config overrides; default: DEFAULT_VARIANTS
      full: {}
      w/o CL: {contrastive: false}
    seeds: 5                        # N (seeds 1..N) or an explicit list (--seeds)
    resources: {cpus_per_run: 1, gpus_per_run: 0, max_concurrent: 2}
    stats: {seed: 0, n_resamples: 9999}   # bootstrap of the user test
    out: runs/ablation
    name: ablation

Every error is a one-line :class:`mmssl.errors.ConfigError` naming the file and key:
unknown keys, unknown config keys in a variant or ``set``, wrong types/ranges, a variant
list without ``full``, duplicated variant or data-set names (also duplicated YAML keys).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmssl.config import Config, canonical_key, parse_override
from mmssl.errors import ConfigError
from mmssl.synthetic import generated_size

TOP_KEYS = ("datasets", "base", "variants", "seeds", "resources", "stats", "out", "name")
BASE_KEYS = ("config", "set", "epochs", "patience")
REFERENCE = "full"
# name -> overrides, in the order; "only <m>" per modality is inserted before ID-only
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "w/o ASL": {"adversarial": False},
    "w/o CL": {"contrastive": False},
    "w/o Gumbel": {"gumbel": False},
    "w/o Aug": {"augment": False},
    "w/o Attention": {"attention": False},
    "w/o fusion": {"fusion_weight": 0.0},
    "w/o modal-ID views": {"modal_id_weight": 0.0},
    "ID-only": {"modalities": []},
}


@dataclass
class DataSpec:
    """One data set: ``name`` (table column, unique), ``data`` (``synthetic[:UxI]`` or an
    absolute directory), ``subset_users`` (random users, seed 0) or None."""

    name: str
    data: str
    subset_users: int | None = None


@dataclass
class AblationSpec:
    """The resolved ablation file: ``base`` is a full config dict; ``variants`` None = the
    default set (resolved per data set, see :func:`variants_for`)."""

    path: str
    datasets: list[DataSpec]
    base: dict[str, Any]
    base_source: str
    variants: dict[str, dict[str, Any]] | None
    seeds: list[int]
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_concurrent: int | None = None
    stats_seed: int = 0
    n_resamples: int = 9999
    out: str = "runs/ablation"
    name: str = "ablation"
    sets: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: '{key}' given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The file's top-level mapping; ConfigError (one line) for a missing file, bad YAML or duplicates."""
    from mmssl.textfiles import read_text

    text = read_text(path, ConfigError)  # BOM / UTF-16 ok; not text -> one line naming the line and byte
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        d = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: bad YAML{at}: {getattr(e, 'problem', None) or 'invalid YAML'}") from None
    finally:
        loader.dispose()
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(d).__name__}")
    return d


def load_spec(path: str | os.PathLike, flags: dict[str, Any] | None = None) -> AblationSpec:
    """Read ``path`` and apply CLI ``flags`` (``epochs``, ``seeds``, ``out``, ``name``,
    ``gpus_per_run``, ``max_concurrent``, ``sets``: None = not given). Validates everything
    that does not need the data; raises ConfigError (one line)."""
    where = str(path)
    d = read_yaml(path)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    return spec_from_dict(d, where, flags)


def spec_from_dict(d: dict[str, Any], where: str, flags: dict[str, Any]) -> AblationSpec:
    """As :func:`load_spec`, from an already-read mapping ``d``."""
    unknown = [k for k in d if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(TOP_KEYS)})")
    datasets = _datasets(d.get("datasets", ["synthetic"]), where)
    base_d = d.get("base") or {}
    if not isinstance(base_d, dict):
        raise ConfigError(f"{where}: base: expected a mapping with keys {', '.join(BASE_KEYS)}")
    bad = [k for k in base_d if k not in BASE_KEYS]
    if bad:
        raise ConfigError(f"{where}: base: unknown key '{bad[0]}' (known: {', '.join(BASE_KEYS)})")
    source = base_d.get("config")
    base = _base_config(source, where)
    base.update(_overrides(base_d.get("set") or {}, f"{where}: base.set"))
    base.update({k: base_d[k] for k in ("epochs", "patience") if base_d.get(k) is not None})
    for s in flags.get("sets", []):  # the command line wins over the file
        key, value = parse_override(s)
        base[key] = value
    if flags.get("epochs") is not None:
        base["epochs"] = flags["epochs"]
    given = [f"--set {x}" for x in flags.get("sets", [])] + ([f"--epochs {flags['epochs']}"]
                                                               if flags.get("epochs") is not None else [])
    base = Config.from_dict(base, where=f"{where}: base" + (f" with {' '.join(given)}" if given else "")).to_dict()
    variants = d.get("variants")
    if variants is not None:
        variants = _variants(variants, base, where)
    seeds = _seeds(flags.get("seeds", d.get("seeds", 5)), where)
    res = d.get("resources") or {}
    if not isinstance(res, dict) or any(k not in ("cpus_per_run", "gpus_per_run", "max_concurrent") for k in res):
        raise ConfigError(f"{where}: resources: expected a mapping of cpus_per_run, gpus_per_run, max_concurrent")
    cpus = _num(res.get("cpus_per_run", 1), f"{where}: resources.cpus_per_run", positive=True)
    gpus = _num(flags.get("gpus_per_run", res.get("gpus_per_run", 0)), f"{where}: resources.gpus_per_run")
    mc = flags.get("max_concurrent", res.get("max_concurrent"))
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
        raise ConfigError(f"{where}: resources.max_concurrent must be a positive integer, got {mc!r}")
    st = d.get("stats") or {}
    if not isinstance(st, dict) or any(k not in ("seed", "n_resamples") for k in st):
        raise ConfigError(f"{where}: stats: expected a mapping of seed, n_resamples")
    n_res = st.get("n_resamples", 9999)
    if isinstance(n_res, bool) or not isinstance(n_res, int) or n_res < 100:
        raise ConfigError(f"{where}: stats.n_resamples must be an integer >= 100, got {n_res!r}")
    stats_seed = st.get("seed", 0)
    if isinstance(stats_seed, bool) or not isinstance(stats_seed, int):
        raise ConfigError(f"{where}: stats.seed must be an integer, got {stats_seed!r}")
    out, name = str(flags.get("out", d.get("out", "runs/ablation"))), str(flags.get("name", d.get("name", "ablation")))
    if not name or "/" in name:
        raise ConfigError(f"{where}: name must be a non-empty folder name, got {name!r}")
    return AblationSpec(path=os.path.abspath(where) if os.path.exists(where) else where, datasets=datasets,
                        base=base, base_source=str(source or "defaults"), variants=variants, seeds=seeds,
                        cpus_per_run=cpus, gpus_per_run=gpus, max_concurrent=mc, stats_seed=stats_seed,
                        n_resamples=n_res, out=out, name=name, sets=list(flags.get("sets", [])))


def variants_for(spec: AblationSpec, modalities: list[str]) -> dict[str, dict[str, Any]]:
    """Variant name -> full resolved config dict for a data set with ``modalities``.

    Default set: DEFAULT_VARIANTS with ``only <m>`` (modalities=[m]) per modality inserted
    before ID-only (only when the data has 2+ modalities: with one, ``only`` equals ``full``).
    A variant naming a modality the data lacks raises ConfigError.
    """
    if spec.variants is None:
        over = dict(DEFAULT_VARIANTS)
        ids = over.pop("ID-only")
        if len(modalities) > 1:
            over.update({f"only {m}": {"modalities": [m]} for m in modalities})
        over["ID-only"] = ids
    else:
        over = spec.variants
    out = {}
    for name, ov in over.items():
        cfg = Config.from_dict({**spec.base, **ov}, where=f"{spec.path}: variants.{name}").to_dict()
        missing = [m for m in (cfg["modalities"] or []) if m not in modalities]
        if missing:
            raise ConfigError(f"{spec.path}: variants.{name}: modality '{missing[0]}' is not in the data "
                              f"(available: {', '.join(modalities) or 'none'})")
        out[name] = cfg
    return out


def spec_fingerprint(spec: AblationSpec, resolved: dict[str, dict[str, dict[str, Any]]],
                     data_prints: dict[str, str]) -> dict[str, Any]:
    """What must match for an existing ``OUT/NAME`` to be continued: per data set its source,
    subset, data fingerprint and every variant's resolved config; the seeds; the stats settings."""
    return json.loads(json.dumps({
        "datasets": {ds.name: {"data": ds.data, "subset_users": ds.subset_users, "fingerprint": data_prints[ds.name],
                               "variants": resolved[ds.name]} for ds in spec.datasets},
        "seeds": spec.seeds, "stats": {"seed": spec.stats_seed, "n_resamples": spec.n_resamples}}, default=str))


# --------------------------------------------------------------------------- pieces
def _datasets(value: Any, where: str) -> list[DataSpec]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: datasets: expected a non-empty list")
    out = []
    for i, item in enumerate(value):
        w = f"{where}: datasets[{i}]"
        if isinstance(item, str):
            item = {"data": item}
        if not isinstance(item, dict) or "data" not in item or any(k not in ("data", "subset_users", "name") for k in item):
            raise ConfigError(f"{w}: expected a path, 'synthetic[:<users>x<items>]' or a mapping "
                              "with data (and subset_users, name)")
        data = str(item["data"])
        if data.startswith("synthetic"):
            if data != "synthetic" and generated_size(data) is None:
                raise ConfigError(f"{w}: expected 'synthetic' or 'synthetic:<users>x<items>', got {data!r}")
        elif not Path(data).is_dir():
            raise ConfigError(f"{w}: {data}: " + ("not a directory" if Path(data).exists() else "no such data directory"))
        else:
            data = os.path.abspath(data)
        sub = item.get("subset_users")
        if sub is not None and (isinstance(sub, bool) or not isinstance(sub, int) or sub < 1):
            raise ConfigError(f"{w}: subset_users must be a positive integer, got {sub!r}")
        name = str(item.get("name") or (data if data.startswith("synthetic") else Path(data).name))
        out.append(DataSpec(name=name, data=data, subset_users=sub))
    names = [d.name for d in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{where}: datasets: the name '{dup}' is used twice (give one a 'name')")
    return out


def _base_config(source: Any, where: str) -> dict[str, Any]:
    """Canonical overrides from a config YAML or a search's best.json (its ``config``)."""
    if source is None:
        return {}
    path = Path(str(source))
    if path.suffix == ".json":
        try:
            best = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where}: base.config: {path}: no such file") from None
        except ValueError as e:
            raise ConfigError(f"{where}: base.config: {path}: not JSON ({e})") from None
        if not isinstance(best, dict) or not isinstance(best.get("config"), dict):
            raise ConfigError(f"{where}: base.config: {path}: no 'config' mapping (is it a search's best.json?)")
        return _overrides(best["config"], str(path))
    from mmssl.config import read_yaml_mapping

    return _overrides(read_yaml_mapping(path), str(path))


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, list):
        return dict(parse_override(str(s)) for s in value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of config key: value (or a list of key=value)")
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = canonical_key(str(k), where)
        if key in out:
            raise ConfigError(f"{where}: '{key}' given twice (once as an alias)")
        out[key] = v
    return out


def _variants(value: Any, base: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: variants: expected a mapping of name: {{config key: value}}")
    out = {}
    for name, ov in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: variants: a variant name must be a non-empty string, got {name!r}")
        w = f"{where}: variants.{name}"
        ov = _overrides(ov or {}, w)
        Config.from_dict({**base, **ov}, where=w)  # types and ranges
        out[name] = ov
    if REFERENCE not in out:
        raise ConfigError(f"{where}: variants: no '{REFERENCE}' variant (every variant is compared with it)")
    return out


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, str):  # --seeds 5 or --seeds 1,2,3
        parts = [p for p in value.split(",") if p.strip()]
        try:
            value = [int(p) for p in parts] if "," in value else int(value)
        except ValueError:
            raise ConfigError(f"{where}: seeds: expected N or a list of integers, got {value!r}") from None
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            raise ConfigError(f"{where}: seeds: expected a non-empty list of integers, got {value!r}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: seeds: seeds must be distinct, got {value!r}")
        return list(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: seeds: expected a positive count or a list, got {value!r}")
    return list(range(1, value + 1))


def _num(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)
