"""analysis/ablation.py end to end on tiny synthetic runs (local Ray, 2 CPUs), plus bad input.

The statistics are recomputed here from runs.csv / per_user.parquet with scipy and
statsmodels directly. A variant wired to nothing (``gumbel: false`` while the adversarial
part is off) must be flagged. About 1-2 minutes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats
from statsmodels.stats.multitest import multipletests

import tune.fits
from analysis import ablation
from mmssl.cli import run_main

REPO = Path(__file__).resolve().parents[1]
BASE_SET = {"embed_dim": 16, "n_heads": 4, "batch_size": 64, "topk_rate": 0.05, "adversarial": False,
            "eval_chunk": 64}
SPEC = {
    "datasets": ["synthetic:120x80"],
    "base": {"set": BASE_SET, "epochs": 2, "patience": 0},
    "variants": {"full": {}, "w/o CL": {"contrastive": False}, "wired to nothing": {"gumbel": False},
                 "ID-only": {"modalities": []}},
    "seeds": 3, "resources": {"cpus_per_run": 1, "max_concurrent": 2}, "stats": {"n_resamples": 999},
}
METRICS = [f"test/{m}@{k}" for k in (10, 20, 50) for m in ("recall", "precision", "ndcg", "hit")]


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def done(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abl")
    cfg = _write(tmp / "ablation.yaml", SPEC)
    rc = ablation.main(["--config", str(cfg), "--out", str(tmp), "--name", "a"])
    return {"rc": rc, "dir": tmp / "a", "cfg": cfg, "out": tmp}


def test_outputs(done):
    d = done["dir"]
    assert done["rc"] == 0
    runs = pd.read_csv(d / "runs.csv")
    for col in ("dataset", "variant", "seed", "status", "reason", "best_epoch", "epochs", "seconds",
                "val/recall@20", "test/ndcg@20"):
        assert col in runs.columns, col
    assert len(runs) == 4 * 3 and (runs["status"] == "ok").all()
    pu = pd.read_parquet(d / "per_user.parquet")
    assert list(pu.columns[:4]) == ["dataset", "variant", "seed", "user"] and set(METRICS) <= set(pu.columns)
    text = (d / "ablation.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    tex = (d / "ablation.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    html = (d / "ablation.html").read_text()
    assert "Plotly.newPlot" in html and re.search(r"<script[^>]*\bsrc\s*=", html) is None, "self-contained"
    md = (d / "ablation.md").read_text()
    assert "| full |" in md and "ttest_rel" in md and "Holm" in md and "[1, 2, 3]" in md


def test_per_user_means_equal_the_run_metrics(done):
    runs = pd.read_csv(done["dir"] / "runs.csv").set_index(["variant", "seed"])
    pu = pd.read_parquet(done["dir"] / "per_user.parquet")
    means = pu.groupby(["variant", "seed"])[METRICS].mean()
    assert len(means) == 12
    diff = (means - runs.loc[means.index, METRICS]).abs().to_numpy()
    assert diff.max() < 1e-12


def test_statistics_recomputed_with_scipy(done):
    d = done["dir"]
    runs = pd.read_csv(d / "runs.csv")
    pu = pd.read_parquet(d / "per_user.parquet")
    res = json.loads((d / "ablation.json").read_text())["results"]["synthetic:120x80"]
    md = (d / "ablation.md").read_text()
    for m in ("test/recall@20", "test/ndcg@20", "test/hit@50"):
        full = runs[runs["variant"] == "full"].set_index("seed")[m]
        p_seeds, p_users = {}, {}
        for var in ("w/o CL", "wired to nothing", "ID-only"):
            got = res[var]["metrics"][m]
            v = runs[runs["variant"] == var].set_index("seed")[m]
            assert got["mean"] == pytest.approx(v.mean(), abs=1e-12)
            assert got["std"] == pytest.approx(v.std(ddof=1), abs=1e-12)
            assert got["delta_pct"] == pytest.approx(100 * (v.mean() - full.mean()) / full.mean(), abs=1e-9)
            diff = v.loc[full.index] - full
            p = 1.0 if (diff == 0).all() else stats.ttest_rel(v.loc[full.index], full).pvalue
            assert got["p_seeds"] == pytest.approx(p, abs=1e-12)
            per = pu.pivot_table(index="user", columns="variant", values=m, aggfunc="mean")
            du = (per[var] - per["full"]).to_numpy()
            pw = 1.0 if (du == 0).all() else stats.wilcoxon(du).pvalue
            assert got["p_users"] == pytest.approx(pw, abs=1e-12)
            assert got["mean_diff_users"] == pytest.approx(du.mean(), abs=1e-12)
            if var == "w/o CL":
                assert got["ci_low"] <= du.mean() <= got["ci_high"] and got["ci_low"] < got["ci_high"]
            p_seeds[var], p_users[var] = p, pw
            if m == "test/recall@20":
                assert f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" in md
        names = list(p_seeds)
        for test, raw in (("p_seeds_holm", p_seeds), ("p_users_holm", p_users)):
            adj = multipletests([raw[n] for n in names], method="holm")[1]
            for n, a in zip(names, adj):
                assert res[n]["metrics"][m][test] == pytest.approx(a, abs=1e-12), (m, n, test)
        for n in names:
            r = res[n]["metrics"][m]
            assert r["significant"] == (r["p_seeds_holm"] < 0.05 and r["p_users_holm"] < 0.05)


def test_variant_wired_to_nothing_is_flagged(done):
    res = json.loads((done["dir"] / "ablation.json").read_text())["results"]["synthetic:120x80"]
    assert res["wired to nothing"]["identical_to_full"] is True
    assert not res["w/o CL"]["identical_to_full"] and not res["ID-only"]["identical_to_full"]
    assert "wired to nothing: identical to full: check its switches" in (done["dir"] / "ablation.md").read_text()


def test_rerun_skips_and_a_different_config_is_refused(done, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tune.fits, "print_progress", lambda r, *a: calls.append(r["key"]))
    before = (done["dir"] / "runs.csv").read_text()
    assert ablation.main(["--config", str(done["cfg"]), "--out", str(done["out"]), "--name", "a"]) == 0
    assert calls == [] and (done["dir"] / "runs.csv").read_text() == before
    spec_before = (done["dir"] / "spec.json").read_text()
    capsys.readouterr()
    rc = run_main(ablation.main, ["--config", str(done["cfg"]), "--out", str(done["out"]), "--name", "a",
                                  "--epochs", "3"], prog="ablation")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "different config" in err and "epochs" in err
    assert (done["dir"] / "spec.json").read_text() == spec_before and calls == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigterm, SIGINT ignored"])
def test_resume_after_interruption(how, ray_local, tmp_path, monkeypatch, request):
    """Ctrl-C, or SIGTERM (a scheduler's stop; mmssl.cli.sigterm_to_interrupt), after two runs;
    also in a job started with SIGINT ignored (``cmd &`` in a script), where SIGTERM must still stop it."""
    if how.endswith("ignored"):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    spec = dict(SPEC, variants={"full": {}, "ID-only": {"modalities": []}},
                resources={"cpus_per_run": 1, "max_concurrent": 1})
    cfg = _write(tmp_path / "r.yaml", spec)
    calls = []

    def interrupt_after_two(result, *a):
        calls.append(result["key"])
        if len(calls) == 2:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                    # the handler raises KeyboardInterrupt here
            pytest.fail("SIGTERM did not interrupt the ablation")

    monkeypatch.setattr(tune.fits, "print_progress", interrupt_after_two)
    assert ablation.main(["--config", str(cfg), "--out", str(tmp_path), "--name", "r"]) == 130
    assert len(list((tmp_path / "r" / "runs").glob("*.json"))) == 2
    assert not (tmp_path / "r" / "runs.csv").exists()
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(tune.fits, "print_progress", lambda r, *a: calls.append(r["key"]))
    assert ablation.main(["--resume", "--out", str(tmp_path), "--name", "r"]) == 0
    assert len(calls) == 4 and not set(calls) & set(first), "finished runs are not re-run"
    runs = pd.read_csv(tmp_path / "r" / "runs.csv")
    assert len(runs) == 6 and not runs.duplicated(["dataset", "variant", "seed"]).any()
    assert set(runs["run_key"]) == set(first) | set(calls)
    # the report names the command that defined the ablation, and the last one run on it
    md = (tmp_path / "r" / "ablation.md").read_text()
    assert f"python analysis/ablation.py --config {cfg} --out {tmp_path} --name r  # last run with: " \
           f"python analysis/ablation.py --resume --out {tmp_path} --name r" in md


def test_a_rule_broken_by_set_names_the_flag(tmp_path, capsys):
    cfg = _write(tmp_path / "ok.yaml", SPEC)
    rc = run_main(ablation.main, ["--config", str(cfg), "--out", str(tmp_path), "--set", "embed_dim=30"],
                  prog="ablation")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"{cfg}: base with --set embed_dim=30: 'n_heads' must divide embed_dim=30" in err, err


def test_an_empty_file_and_a_single_seed_are_warned_about(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    ablation.resolve(ablation.build_parser().parse_args(["--config", str(empty), "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert f"warning: {empty} is empty: every default is used (synthetic, the default variants, 5 seeds)" in err
    assert "1 seed" not in err
    one = _write(tmp_path / "one.yaml", dict(SPEC, seeds=1))
    ablation.resolve(ablation.build_parser().parse_args(["--config", str(one), "--out", str(tmp_path)]))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "warning: 1 seed: the seed-level paired t-test" in err
    ablation.resolve(ablation.build_parser().parse_args(["--config", str(one), "--out", str(tmp_path),
                                                         "--seeds", "2"]))
    assert capsys.readouterr().err == ""


BAD = {
    "unknown top-level key": ({"colour": 1}, "unknown key 'colour'"),
    "unknown config key in a variant": ({"variants": {"full": {}, "w/o X": {"adverserial": False}}},
                                        "unknown key 'adverserial'"),
    "wrong type in a variant": ({"variants": {"full": {}, "x": {"contrastive": "maybe"}}}, "'contrastive' must be bool"),
    "no full": ({"variants": {"w/o CL": {"contrastive": False}}}, "no 'full' variant"),
    "duplicated variant": ("variants:\n  full: {}\n  w/o CL: {contrastive: false}\n  w/o CL: {gumbel: false}\n",
                           "'w/o CL' given twice"),
    "duplicated data set": ({"datasets": ["synthetic", "synthetic"]}, "used twice"),
    "missing data dir": ({"datasets": ["/no/such/dir"]}, "no such data directory"),
    "bad seeds": ({"seeds": [1, 1]}, "seeds must be distinct"),
    "bad base key": ({"base": {"set": {"lr": -1}}}, "'lr' must be > 0"),
    "rule across keys in a variant": ({"variants": {"full": {}, "odd heads": {"n_heads": 3}}},
                                      "bad.yaml: variants.odd heads: 'n_heads' must divide embed_dim=64"),
    "unknown modality": ({"variants": {"full": {}, "only x": {"modalities": ["smell"]}}}, "modality 'smell'"),
    "bad yaml": ("variants: [full\n", "bad YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_exit_2_before_ray(case, tmp_path, monkeypatch, capsys):
    content, expected = BAD[case]
    path = tmp_path / "bad.yaml"
    if isinstance(content, str):
        path.write_text("datasets: [synthetic:120x80]\n" + content)
    else:
        _write(path, {**{"datasets": ["synthetic:120x80"]}, **content})

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start on bad input")

    import tune.runner
    monkeypatch.setattr(tune.runner, "ray_session", no_ray)
    monkeypatch.setattr(tune.runner, "init_ray", no_ray)
    rc = run_main(ablation.main, ["--config", str(path), "--out", str(tmp_path), "--name", "x"], prog="ablation")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and expected in err, err
    assert not (tmp_path / "x").exists(), "nothing written"


def test_cli_bad_file_and_help(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"variants": {"w/o CL": {"contrastive": False}}})
    p = subprocess.run([sys.executable, "analysis/ablation.py", "--config", str(bad), "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no 'full' variant" in p.stderr, p.stderr
    h = subprocess.run([sys.executable, "analysis/ablation.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert h.returncode == 0 and "--resume" in h.stdout and "--smoke-test" in h.stdout


def test_default_variants_and_any_override(tmp_path):
    from analysis.ablation_config import load_spec, variants_for

    spec = load_spec(_write(tmp_path / "d.yaml", {"base": {"set": {"embed_dim": 16}}}))
    got = variants_for(spec, ["audio", "image"])
    assert list(got) == ["full", "w/o ASL", "w/o CL", "w/o Gumbel", "w/o Aug", "w/o Attention", "w/o fusion",
                         "w/o modal-ID views", "only audio", "only image", "ID-only"]
    full = got["full"]
    changed = {name: {k for k in cfg if cfg[k] != full[k]} for name, cfg in got.items()}
    assert changed["w/o fusion"] == {"fusion_weight"} and got["w/o fusion"]["fusion_weight"] == 0.0
    assert changed["w/o modal-ID views"] == {"modal_id_weight"} and got["w/o modal-ID views"]["modal_id_weight"] == 0
    assert got["only image"]["modalities"] == ["image"] and got["ID-only"]["modalities"] == []
    assert all(cfg["embed_dim"] == 16 for cfg in got.values())
    assert "only audio" not in variants_for(spec, ["audio"]), "one modality: 'only' would equal full"
    spec = load_spec(_write(tmp_path / "e.yaml", {"variants": {"full": {}, "small omega": {"omega": 0.1, "lr": 0.01}}}),
                     {"epochs": 7, "sets": ["eta=0.2"]})
    got = variants_for(spec, ["image"])
    assert got["small omega"]["fusion_weight"] == 0.1 and got["small omega"]["lr"] == 0.01
    assert got["full"]["epochs"] == 7 and got["full"]["modal_id_weight"] == 0.2


@pytest.mark.parametrize("argv, expected", [
    (["--resume", "--epochs", "3"], "--epochs would change it"),
    (["--resume"], "spec.json not found"),
    ([], "--config FILE is required"),
])
def test_cli_resume_errors(argv, expected, tmp_path, capsys):
    rc = run_main(ablation.main, argv + ["--out", str(tmp_path), "--name", "none"], prog="ablation")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and expected in err, err


def test_existing_folder_rules(tmp_path):
    from mmssl.errors import ConfigError

    exp = tmp_path / "x"
    assert ablation.check_folder(exp, {"a": 1}) is False            # new folder
    (exp / "runs").mkdir(parents=True)
    assert ablation.check_folder(exp, {"a": 1}) is False            # only a (copied) run cache
    (exp / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an ablation folder"):
        ablation.check_folder(exp, {"a": 1})
    (exp / "notes.txt").unlink()
    (exp / ablation.SPEC_FILE).write_text(json.dumps({"fingerprint": {"a": 1, "seeds": [1, 2]}}))
    assert ablation.check_folder(exp, {"a": 1, "seeds": [1, 2]}) is True
    with pytest.raises(ConfigError, match=r"seeds: \[1, 2\] saved, \[1, 2, 3\] now"):
        ablation.check_folder(exp, {"a": 1, "seeds": [1, 2, 3]})


def test_out_that_is_a_file_and_a_config_that_is_not_text_are_one_line_errors(tmp_path, monkeypatch, capsys):
    def no_ray(*a, **k):
        raise AssertionError("Ray must not start on bad input")

    import tune.runner
    monkeypatch.setattr(tune.runner, "ray_session", no_ray)
    afile = tmp_path / "afile"
    afile.write_text("hi")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"datasets: [synthetic]\n\xff\xfe\x00garbage\n")
    cases = [(["--smoke-test", "--out", str(afile)], "not a folder"),
             (["--smoke-test", "--out", str(afile / "sub")], "not a folder"),
             (["--config", str(binary), "--out", str(tmp_path), "--name", "b"], "bin.yaml")]
    for argv, expected in cases:
        rc = run_main(ablation.main, argv, prog="ablation")
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and expected in err, (argv, err)
    assert afile.read_text() == "hi" and not (tmp_path / "b").exists()


def test_html_table_shows_the_best_mean_in_bold():
    """The legend promises bold for the best mean of a column: markdown ** becomes plotly <b>."""
    import pandas as pd

    from analysis.figures import table_figure

    fig = table_figure(pd.DataFrame({"tiktok Recall@20": ["**0.0610 ± 0.0040**", "0.0594 ± 0.0030"]},
                                    index=pd.Index(["full", "w/o fusion"], name="variant")))
    assert list(fig.data[0].cells.values[1]) == ["<b>0.0610 ± 0.0040</b>", "0.0594 ± 0.0030"]


def test_the_written_html_table_has_the_bold_best_mean(done):
    """ablation.html bolds the same cells as ablation.md (plotly's JSON writes < as \\u003c)."""
    import re

    bold = re.findall(r"\*\*(.+?)\*\*", (done["dir"] / "ablation.md").read_text())
    assert bold
    html = re.sub(r"\\u([0-9a-f]{4})", lambda m: chr(int(m.group(1), 16)),
                  (done["dir"] / "ablation.html").read_text())
    for text in bold:
        assert f"<b>{text}</b>" in html, text


def test_resume_with_a_different_config_file_is_refused(done, tmp_path, capsys):
    """--resume --config OTHER used to be ignored silently; the saved ablation is what continues."""
    other = _write(tmp_path / "other.yaml", {**SPEC, "seeds": [7, 8]})
    rc = run_main(ablation.main, ["--resume", "--config", str(other), "--out", str(done["out"]), "--name", "a"],
                  prog="ablation")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "differs from it in seeds" in err, err


def test_variant_names_are_text_not_markup_in_the_html_figures():
    """A variant called ``a <b>x</b> & y`` shows as that text: plotly would render the tags."""
    from analysis.figures import difference_figure, table_figure

    name = "a <b>x</b> & y"
    fig = table_figure(pd.DataFrame({"m": ["**0.1**", "0.2"]}, index=pd.Index(["full", name], name="variant")))
    assert fig.data[0].cells.values[0][1] == "a &lt;b&gt;x&lt;/b&gt; &amp; y"
    assert fig.data[0].cells.values[1][0] == "<b>0.1</b>"                  # our own bold still works
    stats = pd.DataFrame([dict(dataset="d", variant=v, metric="test/recall@20", mean_diff_users=0.01, ci_low=0.0,
                               ci_high=0.02, significant=False, p_seeds_holm=0.5, p_users_holm=0.5)
                          for v in ("full", name)])
    fig = difference_figure(stats, ["test/recall@20"])
    assert "a &lt;b&gt;x&lt;/b&gt; &amp; y" in [y for t in fig.data for y in (t.y or ())]
