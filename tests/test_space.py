"""The space file parser: every error case is one line naming the key; aliases; Optuna distributions."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mmssl.errors import ConfigError
from tune.space import load_space

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"search": {"cl_weight": {"dist": "loguniform", "low": 1e-3, "high": 1.0}}}


def write(tmp_path, d, text=None):
    p = tmp_path / "space.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(d))
    return str(p)


def error(tmp_path, d=None, text=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_space(write(tmp_path, d, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def with_search(**params):
    return {"search": params}


def test_repo_space_searches_all_ten_with_log_ranges():
    space = load_space(str(REPO / "configs" / "space.yaml"))
    wanted = {"gp_weight", "cl_weight", "adv_weight", "l2_weight", "gumbel_tau", "cl_tau", "aug_weight",
              "fusion_weight", "modal_id_weight", "topk_rate"}
    assert wanted <= set(space.params)
    for key in wanted:
        dist = space.optuna_space()[key]
        assert isinstance(dist, FloatDistribution) and dist.log and 0 < dist.low < dist.high, key
    assert space.metric == "val/recall@20" and space.num_samples >= 16 and space.final_seeds


def test_aliases_map_to_config_keys(tmp_path):
    d = {"search": {"lambda2": {"dist": "loguniform", "low": 1e-3, "high": 1.0},
                    "tau": {"dist": "loguniform", "low": 1e-4, "high": 1.0},
                    "tau_cl": {"dist": "loguniform", "low": 0.05, "high": 2.0},
                    "zeta": {"dist": "loguniform", "low": 0.1, "high": 100.0},
                    "omega": {"dist": "uniform", "low": 0.0, "high": 1.0},
                    "eta": {"dist": "uniform", "low": 0.0, "high": 1.0},
                    "lambda1": {"dist": "loguniform", "low": 0.01, "high": 1.0},
                    "lambda3": {"dist": "loguniform", "low": 1e-5, "high": 0.1},
                    "lambda4": {"dist": "loguniform", "low": 1e-7, "high": 1e-3}},
         "fixed": {"epochs": 7}}
    space = load_space(write(tmp_path, d))
    assert set(space.params) == {"cl_weight", "gumbel_tau", "cl_tau", "aug_weight", "fusion_weight",
                                 "modal_id_weight", "gp_weight", "adv_weight", "l2_weight"}
    assert space.max_epochs == 7


def test_distributions_map_to_optuna(tmp_path):
    d = with_search(
        cl_weight={"dist": "loguniform", "low": 1e-3, "high": 1.0},
        dropout={"dist": "uniform", "low": 0.0, "high": 0.5},
        fusion_weight={"dist": "uniform", "low": 0.0, "high": 1.0, "step": 0.25},
        n_layers={"dist": "int", "low": 1, "high": 4},
        batch_size={"dist": "int", "low": 256, "high": 4096, "log": True},
        embed_dim={"dist": "int", "low": 32, "high": 128, "step": 32},
        adversarial={"dist": "categorical", "choices": [True, False]},
    )
    s = load_space(write(tmp_path, d)).optuna_space()
    assert s["cl_weight"] == FloatDistribution(1e-3, 1.0, log=True)
    assert s["dropout"] == FloatDistribution(0.0, 0.5)
    assert s["fusion_weight"] == FloatDistribution(0.0, 1.0, step=0.25)
    assert s["n_layers"] == IntDistribution(1, 4)
    assert s["batch_size"] == IntDistribution(256, 4096, log=True)
    assert s["embed_dim"] == IntDistribution(32, 128, step=32)
    assert s["adversarial"] == CategoricalDistribution([True, False])


def test_yaml_11_exponent_strings_are_numbers(tmp_path):
    text = "search:\n  l2_weight: {dist: loguniform, low: 1e-7, high: 1e-3}\n"
    assert load_space(write(tmp_path, None, text)).optuna_space()["l2_weight"].low == pytest.approx(1e-7)


def test_sections_and_defaults(tmp_path):
    d = dict(MINIMAL, data="some/dir", subset_users=500, metric="val/ndcg@20", seed=4, name="x", out="o",
             budget={"num_samples": 8, "max_concurrent": 2, "cpus_per_trial": 2, "gpus_per_trial": 0.5,
                     "checkpoint_every": 3},
             asha={"grace_period": 2, "reduction_factor": 2}, final={"seeds": [7, 9]}, tpe={"n_startup_trials": 4})
    s = load_space(write(tmp_path, d))
    assert (s.data, s.subset_users, s.metric, s.seed, s.name, s.out) == ("some/dir", 500, "val/ndcg@20", 4, "x", "o")
    assert (s.num_samples, s.max_concurrent, s.cpus_per_trial, s.gpus_per_trial) == (8, 2, 2.0, 0.5)
    assert (s.grace_period, s.reduction_factor, s.final_seeds, s.n_startup_trials) == (2, 2.0, (7, 9), 4)
    assert load_space(write(tmp_path, dict(MINIMAL, final={"seeds": 3}))).final_seeds == (1, 2, 3)


def test_overrides_win_and_are_validated(tmp_path):
    s = load_space(write(tmp_path, dict(MINIMAL, asha={"grace_period": 2})))
    o = s.override(max_epochs=4, num_samples=6, data="synthetic", final_seeds=2,
                   sets=["lambda4=1e-4", "adversarial=false"], subset_users=100)
    assert o.max_epochs == 4 and o.num_samples == 6 and o.final_seeds == (1, 2) and o.subset_users == 100
    assert o.fixed["adversarial"] is False and o.fixed["l2_weight"] == 1e-4 and "cl_weight" in o.params
    with pytest.raises(ConfigError, match="nothing left to search"):  # --set pins a searched key
        s.override(sets=["cl_weight=0.2"])
    with pytest.raises(ConfigError, match="grace_period"):
        s.override(max_epochs=1)
    with pytest.raises(ConfigError, match="num-samples"):
        s.override(num_samples=0)
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        s.override(sets=["bogus=1"])


@pytest.mark.parametrize("d, text, needle", [
    (dict(MINIMAL, serach={}), None, "unknown top-level key 'serach'"),
    ({"fixed": {"epochs": 3}}, None, "missing 'search'"),
    ({"search": {}}, None, "'search' must be a non-empty mapping"),
    (with_search(cl_weight={"dist": "gaussian", "low": 0, "high": 1}), None, "search.cl_weight: unknown distribution 'gaussian'"),
    (with_search(cl_weight={"low": 0.1, "high": 1}), None, "search.cl_weight: unknown distribution None"),
    (with_search(cl_weight={"dist": "uniform", "low": 0.5, "high": 0.5}), None, "search.cl_weight: low (0.5) must be < high (0.5)"),
    (with_search(cl_weight={"dist": "uniform", "low": 0.9, "high": 0.1}), None, "search.cl_weight: low (0.9) must be < high"),
    (with_search(cl_weight={"dist": "loguniform", "low": 0.0, "high": 1.0}), None, "search.cl_weight: a log range must lie above 0"),
    (with_search(cl_weight={"dist": "loguniform", "low": -1.0, "high": 1.0}), None, "search.cl_weight: a log range must lie above 0"),
    (with_search(n_layers={"dist": "int", "low": 0, "high": 3, "log": True}), None, "search.n_layers: a log range must lie above 0"),
    (with_search(momentum={"dist": "uniform", "low": 0.1, "high": 0.9}), None, "unknown key 'momentum'"),
    (with_search(lambda9={"dist": "uniform", "low": 0.1, "high": 0.9}), None, "unknown key 'lambda9'"),
    (dict(MINIMAL, fixed={"epoch": 5}), None, "fixed: unknown key 'epoch'"),
    (dict(MINIMAL, fixed={"epochs": "many"}), None, "'epochs' must be int"),
    (dict(MINIMAL, fixed={"cl_weight": 0.1}), None, "'cl_weight' is both fixed and searched"),
    (dict(MINIMAL, fixed={"lambda2": 0.1}), None, "'cl_weight' is both fixed and searched"),
    (with_search(cl_weight={"dist": "uniform", "low": 0.1, "high": 0.9},
                 lambda2={"dist": "uniform", "low": 0.1, "high": 0.9}), None, "'cl_weight' given twice"),
    (with_search(topk_rate={"dist": "loguniform", "low": 0.01, "high": 2.0}), None, "search.topk_rate: value 2.0 is not valid"),
    (with_search(adversarial={"dist": "uniform", "low": 0.0, "high": 1.0}), None, "search.adversarial: value 0.0 is not valid"),
    (with_search(epochs={"dist": "int", "low": 5, "high": 50}), None, "search.epochs: 'epochs' cannot be searched"),
    (with_search(seed={"dist": "int", "low": 1, "high": 5}), None, "'seed' cannot be searched"),
    (with_search(cl_weight={"dist": "loguniform", "low": 1e-3, "high": 1.0, "step": 0.1}), None, "'step' is not a field of a loguniform"),
    (with_search(cl_weight={"dist": "uniform", "low": 0.0, "high": 1.0, "step": 0}), None, "search.cl_weight.step: must be > 0"),
    (with_search(cl_weight={"dist": "uniform", "low": 0.0, "high": 1.0, "step": 2}), None, "search.cl_weight.step"),
    (with_search(n_layers={"dist": "int", "low": 1.5, "high": 3}), None, "search.n_layers.low: must be an integer"),
    (with_search(n_layers={"dist": "int", "low": 1, "high": 3, "log": "yes"}), None, "search.n_layers.log"),
    (with_search(cl_weight={"dist": "uniform", "low": "abc", "high": 1}), None, "search.cl_weight.low: must be a finite number"),
    (with_search(cl_weight={"dist": "uniform", "high": 1}), None, "search.cl_weight: a uniform distribution needs 'low'"),
    (with_search(adversarial={"dist": "categorical", "choices": []}), None, "search.adversarial: choices must be a non-empty list"),
    (with_search(adversarial={"dist": "categorical", "choices": [True, True]}), None, "choices must be distinct"),
    (with_search(modalities={"dist": "categorical", "choices": [["image"], ["text"]]}), None, "choices must be scalars"),
    (with_search(cl_weight=0.1), None, "search.cl_weight: expected a mapping"),
    (dict(MINIMAL, metric="val/auc"), None, "metric: expected val/"),
    (dict(MINIMAL, metric="test/recall@20"), None, "metric: expected val/"),
    (dict(MINIMAL, budget={"num_samples": 0}), None, "budget.num_samples: must be an integer >= 1"),
    (dict(MINIMAL, budget={"num_sample": 4}), None, "unknown key 'budget.num_sample'"),
    (dict(MINIMAL, budget={"gpus_per_trial": -1}), None, "budget.gpus_per_trial: must be a number >= 0"),
    (dict(MINIMAL, budget={"cpus_per_trial": 0}), None, "budget.cpus_per_trial: must be a number > 0"),
    (dict(MINIMAL, asha={"reduction_factor": 1}), None, "asha.reduction_factor: must be a number > 1"),
    (dict(MINIMAL, asha={"grace": 1}), None, "unknown key 'asha.grace'"),
    (dict(MINIMAL, asha={"grace_period": 20}, fixed={"epochs": 10}), None, "asha.grace_period (20) must be <= the maximum epochs (10"),
    (dict(MINIMAL, final={"seeds": -1}), None, "final.seeds: must be an integer >= 0"),
    (dict(MINIMAL, final={"seeds": [1, 1]}), None, "final.seeds: seeds must be distinct"),
    (dict(MINIMAL, final={"runs": 3}), None, "unknown key 'final.runs'"),
    (dict(MINIMAL, data=3), None, "'data' must be a non-empty string"),
    (dict(MINIMAL, data="synthetic:300"), None, "data: expected 'synthetic', 'synthetic:<users>x<items>'"),
    (dict(MINIMAL, subset_users=0), None, "subset_users: must be an integer >= 1"),
    (dict(MINIMAL, budget=[1, 2]), None, "budget: expected a mapping"),
    (None, "search: {cl_weight: {dist: loguniform, low: 1e-3, high: 1.0}\n  oops: [\n", "bad YAML at line"),
    (None, "- just\n- a list\n", "expected a mapping of key: value at top level"),
])
def test_malformed_space_is_one_line_naming_the_key(tmp_path, d, text, needle):
    msg = error(tmp_path, d, text)
    assert needle in msg, msg
    assert msg.startswith(str(tmp_path / "space.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_space(str(tmp_path / "nope.yaml"))
