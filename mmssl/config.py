"""One dataclass for every hyperparameter of MMSSL, loaded from YAML and ``--set`` overrides.

Keys follow ``shared/design/mmssl.md``; the paper's symbols are accepted as
aliases (``lambda1``..``lambda4``, ``tau``, ``tau_cl``, ``zeta``, ``omega``,
``eta``). Unknown keys and wrong types raise :class:`ConfigError` naming the key.

    cfg = Config.from_yaml("configs/mmssl.yaml", overrides=["cl_weight=0.1", "epochs=5"])
    cfg = Config.from_dict({"lambda2": 0.1})
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import yaml

from mmssl.errors import ConfigError

ALIASES = {
    "lambda1": "gp_weight", "lambda2": "cl_weight", "lambda3": "adv_weight", "lambda4": "l2_weight",
    "tau": "gumbel_tau", "tau_cl": "cl_tau", "zeta": "aug_weight", "omega": "fusion_weight",
    "eta": "modal_id_weight",
}


def _f(default, doc: str, symbol: str = ""):
    return field(default=default, metadata={"doc": doc, "symbol": symbol})


@dataclass(frozen=True)
class Config:
    """Resolved MMSSL configuration. Field metadata holds the paper symbol and meaning."""

    # --- loss weights and temperatures (searched) ---
    gp_weight: float = _f(0.3, "WGAN-GP gradient-penalty weight in the discriminator loss", "λ1")
    cl_weight: float = _f(0.03, "cross-modal contrastive (InfoNCE) loss weight", "λ2")
    adv_weight: float = _f(1.8e-3, "generator (adversarial) loss weight", "λ3")
    l2_weight: float = _f(1e-5, "L2 penalty on the batch's ego embeddings", "λ4")
    gumbel_tau: float = _f(0.002, "temperature of the Gumbel-softmax transform of A", "τ")
    cl_tau: float = _f(0.5, "InfoNCE temperature", "τ'")
    aug_weight: float = _f(100.0, "weight of the augmented signal cos(h_u, h_i) added to a real row", "ζ")
    fusion_weight: float = _f(0.55, "weight of the normalised modality views in h_u, h_i", "ω")
    modal_id_weight: float = _f(0.36, "weight of the attention output in the GNN's layer 0", "η")
    topk_rate: float = _f(0.01, "neighbours per user in a generated graph: max(1, round(rate·|I|))", "k rate")
    # --- architecture ---
    refresh_every: int = _f(1, "batches between rebuilds of the generated graphs", "T")
    embed_dim: int = _f(64, "embedding size", "d")
    n_layers: int = _f(2, "GNN (LightGCN) layers", "L")
    n_heads: int = _f(4, "inter-modal attention heads (must divide embed_dim)", "H")
    dropout: float = _f(0.2, "dropout of the modality projections")
    d_dropout1: float = _f(0.31, "discriminator dropout after its first layer")
    d_dropout2: float = _f(0.5, "discriminator dropout after its second layer")
    # --- optimisation ---
    lr: float = _f(5.4e-4, "AdamW learning rate of the model")
    lr_d: float = _f(3e-4, "Adam learning rate of the discriminator (betas 0.5, 0.9)")
    batch_size: int = _f(1024, "users per batch (one positive, one negative each)")
    epochs: int = _f(100, "maximum epochs; an epoch is ceil(|train| / batch_size) batches")
    patience: int = _f(10, "epochs without a better val/recall@20 before early stopping (0 = never stop early)")
    # --- component switches (ablations); all on = the paper's method ---
    adversarial: bool = _f(True, "discriminator + generator loss (off: λ1, λ3, τ, ζ unused)")
    contrastive: bool = _f(True, "cross-modal InfoNCE loss (off: λ2, τ' unused)")
    gumbel: bool = _f(True, "Gumbel-softmax real rows (off: the raw observed row, normalised)")
    augment: bool = _f(True, "the ζ·cos(h_u, h_i) term of the real rows")
    attention: bool = _f(True, "inter-modal attention (off: plain mean over modalities)")
    modalities: list[str] | None = _f(None, "modalities to use; null = all of the data's, [] = ID-only LightGCN")
    # --- run ---
    seed: int = _f(2023, "random seed (data sampling, init, dropout, Gumbel noise)")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    amp: bool = _f(False, "bfloat16 autocast on CUDA (ignored on CPU)")
    eval_chunk: int = _f(2048, "users per chunk of the full-ranking evaluation and graph rebuild")
    disc_impl: str = _f("factored", "discriminator input: factored (exact, rows never formed) | dense "
                                    "(B x |I| rows; the reference form, for checking)")

    def __post_init__(self):
        _validate(self)

    # -- construction -------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "config") -> "Config":
        """Build from a mapping; aliases accepted, unknown keys and wrong types rejected."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of key: value, got {type(d).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for raw_key, value in d.items():
            key = canonical_key(str(raw_key), where)
            if key in out:
                raise ConfigError(f"{where}: '{key}' given twice (once as an alias)")
            out[key] = _coerce(key, types[key], value, where)
        try:
            return cls(**out)
        except ConfigError as e:  # a rule across keys (e.g. n_heads | embed_dim): name the source too
            msg = str(e)
            if where != "config" and msg.startswith("config: "):
                msg = f"{where}: {msg[len('config: '):]}"
            raise ConfigError(msg) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> "Config":
        """Load ``path`` (None = defaults) then apply ``key=value`` overrides (values parsed as YAML)."""
        d: dict[str, Any] = {}
        if path is not None:
            d = read_yaml_mapping(path)
        d = {canonical_key(str(k), str(path)): v for k, v in d.items()}
        for item in overrides:
            key, value = parse_override(item)
            d[key] = value
        return cls.from_dict(d, where=str(path) if path else "config")

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied (aliases accepted, validated)."""
        d = self.to_dict()
        for k, v in changes.items():
            d[canonical_key(k)] = v
        return Config.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["modalities"] is not None:
            d["modalities"] = list(d["modalities"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def canonical_key(key: str, where: str = "config") -> str:
    """The config key for ``key`` (itself or a paper alias); ConfigError if unknown."""
    key = ALIASES.get(key, key)
    if key not in _FIELD_NAMES:
        raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(_FIELD_NAMES)}; "
                          f"aliases: {', '.join(ALIASES)})")
    return key


def parse_override(item: str) -> tuple[str, Any]:
    """``"cl_weight=0.1"`` -> ``("cl_weight", 0.1)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, _, text = item.partition("=")
    key = canonical_key(key.strip(), f"--set {item}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; one-line ConfigError otherwise."""
    from mmssl.textfiles import read_text  # a BOM / UTF-16 file reads as the clean UTF-8 one

    text = read_text(path, ConfigError)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: bad YAML{at}: {problem}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at top level, got {type(d).__name__}")
    return d


def _coerce(key: str, typ: Any, value: Any, where: str) -> Any:
    """Check (and where lossless, convert) ``value`` to the field's type."""
    typ = str(typ)
    bad = ConfigError(f"{where}: '{key}' must be {typ.replace(' | None', ' or null')}, got {value!r}")
    if typ == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if typ == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    return float(value)
                except ValueError:
                    raise bad from None
            raise bad
        return float(value)
    if typ == "str":
        if isinstance(value, str):
            return value
        raise bad
    if typ == "list[str] | None":
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    raise AssertionError(f"unhandled field type {typ} for {key}")


def _validate(c: Config) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config: '{key}' {what}, got {getattr(c, key)!r}")

    for key in ("gp_weight", "cl_weight", "adv_weight", "l2_weight", "aug_weight",
                "fusion_weight", "modal_id_weight", "dropout", "d_dropout1", "d_dropout2"):
        need(getattr(c, key) >= 0, key, "must be >= 0")
    for key in ("gumbel_tau", "cl_tau", "lr", "lr_d"):
        need(getattr(c, key) > 0, key, "must be > 0")
    need(0 < c.topk_rate <= 1, "topk_rate", "must be in (0, 1]")
    for key in ("dropout", "d_dropout1", "d_dropout2"):
        need(getattr(c, key) < 1, key, "must be < 1")
    for key in ("refresh_every", "embed_dim", "n_heads", "batch_size", "epochs", "eval_chunk"):
        need(getattr(c, key) >= 1, key, "must be >= 1")
    need(c.n_layers >= 0, "n_layers", "must be >= 0")
    need(c.patience >= 0, "patience", "must be >= 0")
    need(c.embed_dim % c.n_heads == 0, "n_heads", f"must divide embed_dim={c.embed_dim}")
    need(c.disc_impl in ("factored", "dense"), "disc_impl", "must be factored or dense")
    dev = c.device
    need(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
         "device", "must be auto, cpu, cuda or cuda:N")


_FIELD_NAMES = [f.name for f in fields(Config)]


def coerce_value(key: str, value: Any, where: str = "config") -> Any:
    """``value`` converted to the type of config key ``key`` (alias accepted), as ``from_dict`` does.

    Only the type is checked (e.g. ``"1e-3"`` -> ``0.001`` for a float key, ``2.0`` -> ``2``
    for an int key), not the ranges or cross-key rules. Raises :class:`ConfigError`.
    """
    key = canonical_key(key, where)
    return _coerce(key, {f.name: f.type for f in fields(Config)}[key], value, where)
