"""analysis/sensitivity.py part 1 (no training): importance, boundary check, figures, bad input.

The search folders are built directly (tests/fake_search.py): an Optuna study with known
trials, states and values, and the tables tune/search.py writes. A few seconds each.
"""
from __future__ import annotations

import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import TrialState

from analysis import report as rep
from analysis import sensitivity
from analysis.boundary import check_boundaries, scaled
from analysis.importance import importances
from analysis.search_folder import load_search
from fake_search import PARAMS, boundary_search, importance_search
from tune.space import Param


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = sensitivity.run_main(sensitivity.main, list(argv), prog="sensitivity.py")
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def imp_folder(tmp_path_factory):
    return importance_search(tmp_path_factory.mktemp("imp") / "search")


def test_importance_equals_optunas_evaluators_on_the_complete_trials(imp_folder, capsys, tmp_path):
    rc, out, err = _run(capsys, "--study", str(imp_folder), "--out", str(tmp_path / "s"), "--no-png")
    assert rc == 0, err
    table = pd.read_csv(tmp_path / "s" / "importance.csv")
    assert set(table.columns) == {"hyperparameter", "evaluator", "importance"}
    # independently: reload the study, keep its COMPLETE trials, run Optuna's evaluators
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{imp_folder / 'study.db'}")
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(complete) == 30 and len(study.trials) == 40
    ref = optuna.create_study(direction="maximize")
    ref.add_trials(complete)
    expected = {"fANOVA": optuna.importance.get_param_importances(ref, evaluator=FanovaImportanceEvaluator(seed=0)),
                "PED-ANOVA": optuna.importance.get_param_importances(ref, evaluator=PedAnovaImportanceEvaluator())}
    for name, values in expected.items():
        got = table[table["evaluator"] == name].set_index("hyperparameter")["importance"]
        assert set(got.index) == set(PARAMS)
        for p, v in values.items():
            assert got[p] == pytest.approx(v, abs=1e-12), (name, p)
    assert table[table["evaluator"] == "fANOVA"].iloc[0]["hyperparameter"] == "cl_weight"  # the planted driver
    # the report says how many trials were used and that the others were left out
    html = (tmp_path / "s" / "report.html").read_text()
    assert "30 COMPLETE trials" in html and "8 PRUNED" in html and "2 FAIL" in html
    assert "importance: 30 COMPLETE trials used; left out: 2 FAIL, 8 PRUNED" in out


def test_counting_pruned_trials_would_change_the_importance(imp_folder):
    """Control: the COMPLETE-only rule matters on this study (the test above can fail)."""
    study = load_search(imp_folder).study
    ours = importances(study, list(PARAMS)).table
    wrong = optuna.create_study(direction="maximize")
    for t in study.get_trials():
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            last = t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)] - 0.2
            wrong.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=last))
    alt = optuna.importance.get_param_importances(wrong, evaluator=FanovaImportanceEvaluator(seed=0))
    got = ours[ours["evaluator"] == "fANOVA"].set_index("hyperparameter")["importance"]
    assert max(abs(got[p] - alt[p]) for p in PARAMS) > 1e-3


def test_best_trials_at_a_bound_raise_the_warning(tmp_path, capsys):
    folder = boundary_search(tmp_path / "low", "low")
    rc, out, err = _run(capsys, "--study", str(folder), "--no-png")
    assert rc == 0, err
    warn_lines = [ln for ln in err.splitlines() if ln.startswith("warning: boundary:")]
    assert len(warn_lines) == 1, err
    assert "cl_weight" in warn_lines[0] and "lower bound 0.001" in warn_lines[0] and "widen the range" in warn_lines[0]
    b = pd.read_csv(folder / "sensitivity" / "boundary.csv")
    assert list(b.columns[:3]) == ["hyperparameter", "bound", "value"] and "share" in b.columns
    row = b[(b["hyperparameter"] == "cl_weight") & (b["bound"] == "low")].iloc[0]
    assert row["share"] == 1.0 and bool(row["warning"]) and row["n_top"] == 3
    assert b["warning"].sum() == 1
    html = (folder / "sensitivity" / "report.html").read_text()
    assert re.search(r'class="warn">[^<]*cl_weight: 3/3 of the top trials lie within 5% of the lower bound 0.001: '
                     r'widen the range', html)


def test_best_trials_inside_the_range_raise_no_warning(tmp_path, capsys):
    folder = boundary_search(tmp_path / "inside", "inside")
    rc, out, err = _run(capsys, "--study", str(folder), "--no-png")
    assert rc == 0, err
    assert "warning: boundary" not in err
    b = pd.read_csv(folder / "sensitivity" / "boundary.csv")
    assert len(b) == 2 * len(PARAMS) and not b["warning"].any()
    assert 'class="warn"' not in (folder / "sensitivity" / "report.html").read_text()


def test_nearness_is_measured_in_the_distributions_own_scale():
    p = PARAMS["cl_weight"]  # log range 1e-3 .. 1
    # 0.04 is 3.9% of the range from the low bound on a linear scale, but 53% on the log scale
    assert scaled([0.04], p)[0] == pytest.approx(math.log(40) / math.log(1000))
    trials = pd.DataFrame({"status": ["completed"] * 3, "objective": [0.3, 0.2, 0.1], "cl_weight": [0.04] * 3,
                           "dropout": [0.25] * 3, "n_layers": [2] * 3})
    _, warns = check_boundaries(trials, PARAMS)
    assert warns == []
    lin = {"cl_weight": Param("cl_weight", "uniform", 1e-3, 1.0)}
    _, warns = check_boundaries(trials, lin)
    assert [(w.hyperparameter, w.bound) for w in warns] == [("cl_weight", "low")]


def _fake_sweeps(search, keys, seeds=(1, 2, 3)) -> tuple[pd.DataFrame, dict]:
    from analysis.sweep import grid

    rng = np.random.default_rng(0)
    grids = {k: grid(search.space.params[k], search.best_params()[k], 4) for k in keys}
    rows = [{"hyperparameter": k, "value": v, "seed": s, "run_key": f"{k}-{v}-{s}", "status": "ok",
             **{m: float(rng.uniform(0.1, 0.4)) for m in ("val/recall@20", "val/ndcg@20", "test/recall@20",
                                                           "test/ndcg@20")}}
            for k, g in grids.items() for v in g for s in seeds]
    return pd.DataFrame(rows), {"seeds": seeds, "epochs": 3, "grids": grids}


def _build(folder, sweep_keys=()):
    search = load_search(folder)
    imp = importances(search.study, list(search.space.params))
    boundary, warns = check_boundaries(search.trials, search.space.params)
    sweeps, info = _fake_sweeps(search, sweep_keys) if sweep_keys else (None, None)
    return search, rep.build(search, imp, boundary, warns, sweeps, info)


def test_one_axis_plot_and_one_sweep_panel_per_hyperparameter(imp_folder):
    search, report = _build(imp_folder, sweep_keys=list(PARAMS))
    figs = report.figures
    assert [n for n in figs if n.startswith("axis_")] == [f"axis_{k}" for k in PARAMS]
    assert [n for n in figs if n.startswith("sweep_")] == [f"sweep_{k}" for k in PARAMS]
    for k, p in PARAMS.items():
        axis = figs[f"axis_{k}"]
        assert [t.name for t in axis.data] == ["completed", "stopped early (ASHA)", "failed", "best trial"]
        n_by = {t.name: len(t.x) for t in axis.data}
        assert (n_by["completed"], n_by["stopped early (ASHA)"], n_by["failed"], n_by["best trial"]) == (30, 8, 2, 1)
        assert axis.layout.xaxis.type == ("log" if p.dist == "loguniform" else "linear")
        sweep = figs[f"sweep_{k}"]
        metrics = ["val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20"]
        assert [t.name for t in sweep.data] == [n for m in metrics for n in (f"{m} ± std", m)] + ["searched best"]
        best = sweep.data[-1]
        assert list(best.x) == [search.best_params()[k]] * 2
        mean = sweep.data[1]
        assert len(mean.x) == len(set(mean.x)) >= 4  # one point per value (mean over 3 seeds)
    for name in ("importance", "history", "curves", "parallel"):
        assert name in figs
    assert sum(n.startswith("contour_") for n in figs) == 2
    curves = figs["curves"]
    assert len(curves.data) == 38  # one line per trial that reported an epoch (failed ones did not)


def test_html_is_self_contained(imp_folder):
    _, report = _build(imp_folder, sweep_keys=["cl_weight"])
    html = report.html()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "external script source"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?https?:", html, re.I)
    assert html.count("<script type=\"text/javascript\">") >= 1 and "Plotly.newPlot" in html
    for name in report.figures:
        assert f'id="fig-{name}"' in html


@pytest.mark.parametrize("case", ["not_finished", "not_searched", "bad_yaml", "no_folder"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(imp_folder, tmp_path, capsys, case):
    out = tmp_path / "out"
    study = imp_folder
    args = ["--study", str(study), "--out", str(out), "--no-png"]
    if case == "not_finished":
        import shutil
        study = tmp_path / "copy"
        shutil.copytree(imp_folder, study)
        (study / "best.json").unlink()
        args[1] = str(study)
    elif case == "not_searched":
        (tmp_path / "s.yaml").write_text("sweep: {cl_tau: {}}\n")
        args += ["--sweep", str(tmp_path / "s.yaml")]
    elif case == "bad_yaml":
        (tmp_path / "s.yaml").write_text("sweep: [cl_weight\n")
        args += ["--sweep", str(tmp_path / "s.yaml")]
    else:
        args[1] = str(tmp_path / "nowhere")
    rc, _, err = _run(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    want = {"not_finished": "not a finished search (missing best.json", "not_searched": "'cl_tau' was not searched",
            "bad_yaml": "bad YAML", "no_folder": "no such folder"}[case]
    assert want in lines[0]
    assert not out.exists()


def test_search_json_space_round_trips_a_bound_of_zero(tmp_path):
    """Space.to_dict once dropped ``low: 0.0`` (0.0 == False); the analysis rebuilds the exact space."""
    from analysis.search_folder import space_from_dict
    from fake_search import space_for

    space = space_for(tmp_path / "x")
    assert space.to_dict()["params"]["dropout"]["low"] == 0.0
    assert space_from_dict(space.to_dict(), "search.json") == space
    old = space.to_dict()
    del old["params"]["dropout"]["low"]  # a search.json written before the fix
    assert space_from_dict(old, "search.json").params["dropout"] == PARAMS["dropout"]


def test_out_that_is_a_file_is_refused_before_any_work(imp_folder, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for argv in (["--study", str(imp_folder), "--out", str(afile)], ["--smoke-test", "--out", str(afile)]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and "not a folder" in err and "Traceback" not in err, err
        assert "smoke test: running" not in out  # refused before the search smoke test starts
    assert afile.read_text() == "hi"
