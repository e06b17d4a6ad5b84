from pathlib import Path

import pytest

from mmssl.config import ALIASES, Config, parse_override
from mmssl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_reference_yaml_equals_defaults():
    assert Config.from_yaml(ROOT / "configs" / "mmssl.yaml") == Config()


def test_aliases_map_to_keys():
    values = {alias: 0.123 for alias in ALIASES}
    cfg = Config.from_dict(values)
    for alias, key in ALIASES.items():
        assert getattr(cfg, key) == pytest.approx(0.123), alias


def test_alias_and_key_together_is_an_error():
    with pytest.raises(ConfigError, match="cl_weight"):
        Config.from_dict({"lambda2": 0.1, "cl_weight": 0.2})


@pytest.mark.parametrize("bad, key", [
    ({"nope": 1}, "nope"), ({"epochs": "ten"}, "epochs"), ({"epochs": 2.5}, "epochs"),
    ({"adversarial": "yes"}, "adversarial"), ({"cl_weight": [1]}, "cl_weight"),
    ({"gumbel_tau": 0}, "gumbel_tau"), ({"topk_rate": 1.5}, "topk_rate"), ({"n_heads": 5}, "n_heads"),
    ({"device": "tpu"}, "device"), ({"modalities": [1, 2]}, "modalities"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        Config.from_dict(bad)


def test_overrides_parse_as_yaml_and_accept_aliases(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\nomega: 0.1\n")
    cfg = Config.from_yaml(p, ["eta=0.5", "modalities=[image]", "adversarial=false", "lr=1e-3"])
    assert (cfg.epochs, cfg.fusion_weight, cfg.modal_id_weight) == (7, 0.1, 0.5)
    assert cfg.modalities == ["image"] and cfg.adversarial is False and cfg.lr == 1e-3
    assert parse_override("modalities=[]") == ("modalities", [])


@pytest.mark.parametrize("text, needle", [("epochs: [1\n", "line"), ("- 1\n- 2\n", "mapping"),
                                          ("bogus: 1\n", "bogus")])
def test_bad_yaml_files(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        Config.from_yaml(p)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="no such file"):
        Config.from_yaml("/nonexistent/c.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        Config.from_yaml(None, ["epochs"])


def test_replace_and_roundtrip():
    cfg = Config().replace(tau=0.01, modalities=["a"])
    assert cfg.gumbel_tau == 0.01 and Config.from_dict(cfg.to_dict()) == cfg


def test_readme_config_table_matches_the_metadata():
    """README's configuration table lists every key with its metadata doc and default (it is not generated)."""
    from dataclasses import fields
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[2].strip(): line for line in text.splitlines()
            if line.startswith("|") and line.count("`") >= 4 and len(line.split("|")) > 5}
    for f in fields(Config):
        row = rows.get(f"`{f.name}`")
        assert row is not None, f"README config table lacks {f.name}"
        assert f.metadata["doc"].replace("|", "\\|") in row, f.name
        assert f"`{f.default}`" in row, f.name
