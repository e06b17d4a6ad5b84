"""A search space checked in full before Ray starts (issue 7, part 4), and what the search
CLI refuses up front (parts 3 and 5): no Ray is started by these tests."""
from __future__ import annotations

import json
import math

import optuna
import pytest
import yaml

from mmssl import jsonio
from mmssl.cli import run_main
from mmssl.errors import ConfigError
from mmssl.synthetic import make_dataset, write
from tune import search
from tune.space import load_space, space_changes


def _space(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def _error(tmp_path, text: str) -> str:
    p = _space(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_space(str(p))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ")
    return msg[len(f"{p}: "):]


# ----------------------------------------------------------------- steps


@pytest.mark.parametrize("spec, expected", [
    ("dropout: {dist: uniform, low: 0.0, high: 0.5, step: 0.2}",
     "search.dropout.step: high - low = 0.5 is not a multiple of the step 0.2, so Optuna would search [0, 0.4], "
     "not up to high = 0.5; choose a step that divides the range"),
    ("n_layers: {dist: int, low: 1, high: 4, step: 2}",
     "search.n_layers.step: high - low = 3 is not a multiple of the step 2, so Optuna would search [1, 3], "
     "not up to high = 4; choose a step that divides the range"),
    ("cl_tau: {dist: uniform, low: 0.1, high: 1.0, step: 0.25}",
     "search.cl_tau.step: high - low = 0.9 is not a multiple of the step 0.25, so Optuna would search [0.1, 0.85], "
     "not up to high = 1; choose a step that divides the range"),
])
def test_step_that_does_not_divide_the_range_is_refused(tmp_path, spec, expected):
    assert _error(tmp_path, f"search:\n  {spec}\n") == expected


@pytest.mark.parametrize("spec", ["dropout: {dist: uniform, low: 0.0, high: 0.5, step: 0.1}",
                                  "dropout: {dist: uniform, low: 0.1, high: 0.7, step: 0.3}",
                                  "n_layers: {dist: int, low: 1, high: 5, step: 2}"])
def test_steps_that_divide_the_range_pass(tmp_path, spec):
    load_space(str(_space(tmp_path, f"search:\n  {spec}\n")))


def test_search_cli_step_error_is_exit_2_before_ray(tmp_path, capsys):
    p = _space(tmp_path, "search:\n  dropout: {dist: uniform, low: 0.0, high: 0.5, step: 0.2}\n")
    rc = run_main(search.main, ["--space", str(p), "--out", str(tmp_path / "o")], prog="tune/search.py")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "search.dropout.step" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------- every value valid


@pytest.mark.parametrize("text, expected", [
    ("fixed: {embed_dim: 16}\nsearch:\n  n_heads: {dist: int, low: 2, high: 4}\n",
     "search.n_heads: value 3 with embed_dim=16 (fixed) is not valid ('n_heads' must divide embed_dim=16, got 3)"),
    ("fixed: {embed_dim: 16}\nsearch:\n  n_heads: {dist: categorical, choices: [2, 4, 6]}\n",
     "search.n_heads: value 6 with embed_dim=16 (fixed) is not valid ('n_heads' must divide embed_dim=16, got 6)"),
    ("search:\n  embed_dim: {dist: categorical, choices: [16, 24]}\n  n_heads: {dist: categorical, choices: [4, 16]}\n",
     "search.n_heads: value 16 with embed_dim=24 is not valid ('n_heads' must divide embed_dim=24, got 16)"),
    ("search:\n  embed_dim: {dist: int, low: 30, high: 34, step: 2}\n",  # default n_heads = 4
     "search.embed_dim: value 30 is not valid ('n_heads' must divide embed_dim=30, got 4)"),
    ("search:\n  n_heads: {dist: int, low: 1, high: 1000}\n",  # too many to enumerate: bounds
     "search.n_heads: value 1000 is not valid ('n_heads' must divide embed_dim=64, got 1000)"),
    ("search:\n  dropout: {dist: uniform, low: 0.5, high: 1.0}\n",
     "search.dropout: value 1.0 is not valid ('dropout' must be < 1, got 1.0)"),
    ("search:\n  topk_rate: {dist: categorical, choices: [0.01, 2]}\n",
     "search.topk_rate: value 2.0 is not valid ('topk_rate' must be in (0, 1], got 2.0)"),
])
def test_every_value_a_distribution_can_produce_must_be_valid(tmp_path, text, expected):
    assert _error(tmp_path, text) == expected + "; every value the distribution can produce must be valid"


def test_valid_enumerated_spaces_pass(tmp_path):
    space = load_space(str(_space(tmp_path, "fixed: {embed_dim: 48}\nsearch:\n"
                                  "  n_heads: {dist: categorical, choices: [1, 2, 3, 4, 6, 8]}\n"
                                  "  n_layers: {dist: int, low: 0, high: 4}\n")))
    assert space.params["n_heads"].values() == [1, 2, 3, 4, 6, 8]
    assert space.params["n_layers"].values() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("choices, expected", [
    ("[1, 1.0]", "choices must be distinct values, got 1.0 and 1.0 (equal as numbers) in [1, 1.0]"),
    ("[0.5, 5.0e-1]", "choices must be distinct values, got 0.5 and 0.5 (equal as numbers) in [0.5, 0.5]"),
])
def test_categorical_choices_equal_as_numbers_are_refused(tmp_path, choices, expected):
    assert _error(tmp_path, f"search:\n  cl_weight: {{dist: categorical, choices: {choices}}}\n") == \
        f"search.cl_weight: {expected}"


def test_bool_choices_that_equal_ints_are_refused(tmp_path):
    msg = _error(tmp_path, "search:\n  adversarial: {dist: categorical, choices: [true, 1]}\n")
    assert msg.startswith("search.adversarial: choices must be distinct values, got True and 1")


# ----------------------------------------------------------------- exact round trip

ROUND_TRIP = """\
fixed: {embed_dim: 48, epochs: 8}
search:
  dropout:   {dist: uniform, low: 0.0, high: 0.5, step: 0.1}
  cl_tau:    {dist: uniform, low: 0.05, high: 2.0}
  cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}
  lr:        {dist: categorical, choices: [1e-3, 5.4e-4, 0.01]}
  n_layers:  {dist: int, low: 0, high: 4, step: 2}
  refresh_every: {dist: int, low: 1, high: 64, log: true}
  n_heads:   {dist: categorical, choices: [1, 2, 3, 4, 6]}
  adversarial: {dist: categorical, choices: [true, false]}
  topk_rate: {dist: uniform, low: 0.001, high: 0.05}
"""

# what the file means: YAML 1.1 reads 1e-3 (no dot) as a string; the key is a float
MEANT = {"dropout": {"dist": "uniform", "low": 0.0, "high": 0.5, "step": 0.1},
         "cl_tau": {"dist": "uniform", "low": 0.05, "high": 2.0},
         "cl_weight": {"dist": "loguniform", "low": 1.0e-3, "high": 1.0},
         "lr": {"dist": "categorical", "choices": [0.001, 0.00054, 0.01]},
         "n_layers": {"dist": "int", "low": 0, "high": 4, "step": 2},
         "refresh_every": {"dist": "int", "low": 1, "high": 64, "log": True},
         "n_heads": {"dist": "categorical", "choices": [1, 2, 3, 4, 6]},
         "adversarial": {"dist": "categorical", "choices": [True, False]},
         "topk_rate": {"dist": "uniform", "low": 0.001, "high": 0.05}}


def _typed_equal(a, b):
    assert a == b
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # 0.0 vs 0, True vs 1 differ here


def test_search_json_round_trips_every_value_of_the_space_file(tmp_path):
    raw = yaml.safe_load(ROUND_TRIP)["search"]
    assert raw["lr"]["choices"][0] == "1e-3"  # the YAML trap the normalisation handles
    space = load_space(str(_space(tmp_path, ROUND_TRIP)))
    record = jsonio.loads(jsonio.dumps(space.to_dict(), default=str))
    _typed_equal(record["params"], MEANT)
    assert record["fixed"] == {"embed_dim": 48, "epochs": 8}
    assert space_changes(record, jsonio.loads(jsonio.dumps(space.to_dict(), default=str))) == []


def test_optuna_study_round_trips_every_value_of_the_space_file(tmp_path):
    space = load_space(str(_space(tmp_path, ROUND_TRIP)))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    dists = space.optuna_space()
    for _ in range(12):
        t = study.ask(dists)
        study.tell(t, float(len(t.params)))
    loaded = optuna.load_study(study_name="s", storage=storage)
    for trial in loaded.trials:
        assert trial.distributions == dists
        for key, d in trial.distributions.items():
            meant = MEANT[key]
            if meant["dist"] == "categorical":
                assert list(d.choices) == meant["choices"]
                assert trial.params[key] in meant["choices"]
                assert type(trial.params[key]) is type(meant["choices"][[c == trial.params[key] for c in meant["choices"]].index(True)])
            else:
                assert (d.low, d.high) == (meant["low"], meant["high"])
                assert d.log == (meant["dist"] == "loguniform" or meant.get("log", False))
                assert d.step == meant.get("step", 1 if meant["dist"] == "int" else None)
                assert meant["low"] <= trial.params[key] <= meant["high"]
    # every stepped value lies on the file's grid
    for trial in loaded.trials:
        k = trial.params["dropout"] / 0.1
        assert math.isclose(k, round(k), abs_tol=1e-9)
        assert trial.params["n_layers"] in (0, 2, 4)


def test_space_changes_names_each_change():
    a = {"params": {"dropout": {"dist": "uniform", "low": 0.0, "high": 0.5}}, "fixed": {"epochs": 60},
         "num_samples": 8, "path": "/x", "max_concurrent": 2}
    b = {"params": {"dropout": {"dist": "uniform", "low": 0.0, "high": 0.4}, "lr": {}}, "fixed": {"epochs": 80},
         "num_samples": 9, "path": "/y", "max_concurrent": 3}
    assert space_changes(a, b, ignore=("max_concurrent",)) == [
        "fixed.epochs 60 -> 80", "num_samples 8 -> 9", "search.dropout.high 0.5 -> 0.4", "search.lr added"]


# ----------------------------------------------------------------- resume and paths (no Ray)


@pytest.fixture
def fake_experiment(tmp_path):
    """An experiment folder as a search leaves it (only search.json matters before Ray)."""
    data = tmp_path / "data"
    write(make_dataset(n_users=60, n_items=40, seed=0), data)
    p = _space(tmp_path, f"data: {data}\nfixed: {{epochs: 3, embed_dim: 16, batch_size: 32}}\n"
                         "search:\n  cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}\n"
                         "budget: {num_samples: 2, max_concurrent: 1}\nasha: {grace_period: 1}\n")
    space = load_space(str(p)).override(**{"sets": []})
    exp = tmp_path / "out" / "exp"
    exp.mkdir(parents=True)
    from mmssl.data import fingerprint, load
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp = fingerprint(load(data))
    (exp / "search.json").write_text(jsonio.dumps({"version": search.RECORD_VERSION, "path": str(p), "overrides": {"sets": []},
                                                   "space": space.to_dict(), "data_fingerprint": fp}, default=str))
    return {"space": p, "data": data, "out": tmp_path / "out", "exp": exp}


def _resume(fx, capsys, *extra):
    rc = run_main(search.main, ["--resume", "--out", str(fx["out"]), "--name", "exp", *extra], prog="tune/search.py")
    err = capsys.readouterr().err.strip()
    errors = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("flags, named", [
    (["--gpus-per-trial", "0"], "--gpus-per-trial"), (["--num-samples", "4"], "--num-samples"),
    (["--data", "synthetic"], "--data"), (["--set", "lr=0.1"], "--set"), (["--max-epochs", "9"], "--max-epochs"),
    (["--cpus-per-trial", "2"], "--cpus-per-trial"), (["--seed", "3"], "--seed"), (["--subset-users", "9"], "--subset-users"),
])
def test_resume_refuses_flags_that_cannot_apply(fake_experiment, capsys, flags, named):
    err = _resume(fake_experiment, capsys, *flags)
    assert err == (f"tune/search.py: error: --resume continues the recorded search: {named} cannot change on resume "
                   "(allowed: --max-concurrent, --final-seeds, --address; --space/--out/--name locate it)")


def test_resume_refuses_a_changed_space_file(fake_experiment, capsys):
    p = fake_experiment["space"]
    p.write_text(p.read_text().replace("high: 1.0}", "high: 0.5}").replace("epochs: 3", "epochs: 4"))
    err = _resume(fake_experiment, capsys)
    assert "the search settings changed since the search started (fixed.epochs 3 -> 4; search.cl_weight.high 1.0 -> 0.5)" in err


def test_resume_refuses_changed_data_before_ray(fake_experiment, capsys):
    d = fake_experiment["data"]
    val, test = (d / "val.json").read_text(), (d / "test.json").read_text()
    (d / "val.json").write_text(test)
    (d / "test.json").write_text(val)
    err = _resume(fake_experiment, capsys)
    assert f"--resume {fake_experiment['exp'].resolve()}: the data changed since this run started (val split" in err or \
        f"--resume {fake_experiment['exp']}: the data changed since this run started (val split" in err
    assert "test split" in err


@pytest.mark.parametrize("make, expected", [
    (lambda t: (t / "f").write_text("x") and t / "f", "--out {p}: exists and is not a folder"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "sub", "--out {p}: {t}/f is a file, not a folder"),
])
def test_search_cli_out_path_errors_before_anything(tmp_path, capsys, make, expected):
    p = make(tmp_path)
    rc = run_main(search.main, ["--smoke-test", "--out", str(p)], prog="tune/search.py")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "tune/search.py: error: " + expected.format(p=p, t=tmp_path)


def test_search_cli_space_is_a_folder(tmp_path, capsys):
    rc = run_main(search.main, ["--space", str(tmp_path), "--out", str(tmp_path / "o")], prog="tune/search.py")
    assert rc == 2 and capsys.readouterr().err.strip() == f"tune/search.py: error: {tmp_path}: is a directory, not a file"


def test_search_cli_no_features_with_default_modalities_is_exit_2_before_ray(tmp_path, capsys):
    import numpy as np  # noqa: F401
    data = tmp_path / "data"
    write(make_dataset(n_users=60, n_items=40, seed=0), data)
    for f in data.glob("*_feat.npy"):
        f.unlink()
    p = _space(tmp_path, "search:\n  cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}\n")
    rc = run_main(search.main, ["--space", str(p), "--data", str(data), "--out", str(tmp_path / "o")],
                  prog="tune/search.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "no item features" in err[-1] and "modalities=[]" in err[-1]
    assert not list((tmp_path / "o").glob("*/search.json"))


# ----------------------------------------------------------------- Ray pieces without a Ray cluster


def test_resumable_limiter_applies_a_new_limit_on_restore():
    from ray.tune.search import Searcher

    from tune.searcher import ResumableLimiter

    class Stub(Searcher):
        def suggest(self, trial_id):
            return {}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    saved = ResumableLimiter(Stub(metric="m", mode="max"), 2).get_state()
    restored = ResumableLimiter(Stub(metric="m", mode="max"), 2)
    try:
        ResumableLimiter.max_concurrent_on_restore = 5
        restored.set_state(saved)
        assert restored.max_concurrent == 5
        ResumableLimiter.max_concurrent_on_restore = None
        restored.set_state(saved)
        assert restored.max_concurrent == 2  # the saved limit when no new one is given
    finally:
        ResumableLimiter.max_concurrent_on_restore = None


def test_final_seed_cache_is_strict_json_and_refuses_other_data(tmp_path):
    from mmssl.data import fingerprint
    from mmssl.errors import DataError
    from tune.runner import run_final
    space = load_space(str(_space(tmp_path, "search:\n  cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}\n"
                                            "final: {seeds: [1]}\n")))
    data = make_dataset(n_users=40, n_items=30, seed=0)
    fp = fingerprint(data)
    cfg = {"epochs": 1}
    cache = tmp_path / "final"
    cache.mkdir()
    result = {"test/recall@20": math.nan, "seed": 1}
    (cache / "seed_1.json").write_text(jsonio.dumps({"config": {**cfg, "seed": 1}, "data_fingerprint": fp,
                                                     "result": result}))
    json.loads((cache / "seed_1.json").read_text(), parse_constant=lambda t: pytest.fail(t))
    got = run_final(space, cfg, data, cache, data_fp=fp)  # all cached: no Ray needed
    assert got[0]["seed"] == 1 and math.isnan(got[0]["test/recall@20"])
    other = fingerprint(make_dataset(n_users=40, n_items=31, seed=0))
    with pytest.raises(DataError, match=r"seed_1.json: the data changed since this run started \(items 30 -> 31"):
        run_final(space, cfg, data, cache, data_fp=other)


@pytest.mark.parametrize("name", ["a/b", "..", "../x"])
def test_search_cli_name_must_be_one_folder(tmp_path, capsys, name):
    p = _space(tmp_path, "search:\n  cl_weight: {dist: loguniform, low: 1.0e-3, high: 1.0}\n")
    rc = run_main(search.main, ["--space", str(p), "--out", str(tmp_path / "o"), "--name", name], prog="tune/search.py")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"tune/search.py: error: {p}: name: must be one folder name (OUT/NAME holds the experiment), got {name!r}"


def test_resume_of_an_old_experiment_refuses_a_new_max_concurrent(fake_experiment, capsys):
    record = fake_experiment["exp"] / "search.json"
    d = jsonio.loads(record.read_text())
    d.pop("version")
    record.write_text(jsonio.dumps(d, default=str))
    err = _resume(fake_experiment, capsys, "--max-concurrent", "3")
    assert err == (f"tune/search.py: error: --resume: --max-concurrent cannot change for {fake_experiment['exp']}: "
                   "it was started before the limit could be changed on resume (its Ray state keeps the old limit)")
