"""Inputs users really bring to a training run (issue 7, parts 2, 3 and 5): degenerate
splits, data without features, strict JSON outputs, changed data on resume, bad paths."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmssl import jsonio
from mmssl.cli import check_out_dir
from mmssl.data import fingerprint
from mmssl.errors import ConfigError, DataError
from mmssl.fingerprint import changes
from mmssl.synthetic import make_dataset, write
from mmssl.train import Run, fit
from mmssl.train_cli import main_entry
from tests.test_data import SPLITS, quiet_load, write_mmrec, write_mmssl


def _strict(text: str):
    """json.loads that rejects NaN/Infinity tokens, as jq or JSON.parse do."""
    def bad(token):
        raise ValueError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=bad)


def _one_line_exit_2(capsys, argv, prog_module=main_entry):
    rc = prog_module(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if not ln.startswith(("warning: ", "data: "))]
    assert len(errors) == 1, err  # progress lines before it are fine; the error is one line
    return errors[0]


# ----------------------------------------------------------------- part 2: splits


@pytest.mark.parametrize("layout", ["mmssl", "mmrec"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_empty_val_or_test_split_is_an_error_naming_it(tmp_path, layout, split):
    splits = {**SPLITS, split: {u: [] for u in SPLITS[split]}}
    root = (write_mmssl if layout == "mmssl" else write_mmrec)(tmp_path / "d", splits)
    with pytest.raises(DataError) as ei:
        quiet_load(root)
    name, code = {"val": ("validation", 1), "test": ("test", 2)}[split]
    need = {"val": "model selection and early stopping need validation interactions",
            "test": "the final evaluation needs test interactions"}[split]
    if layout == "mmssl":
        expected = f"{root / (split + '.json')}: the {name} split is empty (no interactions); {need}"
    else:
        expected = f"{root / 'tiny.inter'}: the {name} split is empty (no rows with x_label {code}); {need}"
    assert str(ei.value) == expected


def test_empty_val_split_of_a_user_subset_is_an_error():
    ds = make_dataset(n_users=60, n_items=40, seed=0)
    with pytest.raises(DataError, match=r"the (validation|test) split of the 1-user subset is empty"):
        for seed in range(50):  # some 1-user subset has no val (or no test) item
            ds.subset_users(1, seed=seed)


def test_train_cli_empty_val_split_exit_2_before_writing(tmp_path, capsys):
    root = write_mmssl(tmp_path / "d", {**SPLITS, "val": {0: []}})
    err = _one_line_exit_2(capsys, ["--data", str(root), "--out", str(tmp_path / "run")])
    assert err.endswith("the validation split is empty (no interactions); "
                        "model selection and early stopping need validation interactions")
    assert not (tmp_path / "run").exists()


def test_no_features_with_default_modalities_is_an_error(tmp_path, capsys):
    root = write_mmssl(tmp_path / "d", features={})
    ds = quiet_load(root)
    with pytest.raises(DataError) as ei:
        ds.select_modalities(None)
    assert str(ei.value) == (f"{root}: the data has no item features (no *_feat.npy file) but the config asks for "
                             "the data's modalities (modalities: null, the default); add <name>_feat.npy files, "
                             "or set modalities=[] for the ID-only model")
    err = _one_line_exit_2(capsys, ["--data", str(root), "--out", str(tmp_path / "run")])
    assert "no item features" in err and "modalities=[]" in err
    assert ds.select_modalities([]).modalities == []  # the explicit ID-only request still works


def test_modality_missing_from_the_data_is_an_error(tmp_path, capsys):
    root = write_mmssl(tmp_path / "d")  # image, text
    err = _one_line_exit_2(capsys, ["--data", str(root), "--out", str(tmp_path / "r"), "--set", "modalities=[image,audio]"])
    assert err.endswith(f"{root}: unknown modality 'audio'; available: image, text")


# ----------------------------------------------------------------- part 2: JSON


def test_jsonio_writes_null_and_restores_nonfinite():
    obj = {"test/recall@20": math.nan, "a": [1.0, math.inf, {"b": -math.inf}], "n": np.float32(0.5), "k": 3}
    text = jsonio.dumps(obj, why="because")
    parsed = _strict(text)
    assert parsed["test/recall@20"] is None and parsed["a"][1] is None and parsed["a"][2]["b"] is None
    assert parsed["nonfinite"] == {"/test~1recall@20": "nan", "/a/1": "inf", "/a/2/b": "-inf"}
    assert parsed["nonfinite_why"] == "because"
    back = jsonio.loads(text)
    assert math.isnan(back["test/recall@20"]) and back["a"][1] == math.inf and back["a"][2]["b"] == -math.inf
    assert back["n"] == 0.5 and back["k"] == 3 and "nonfinite" not in back
    assert jsonio.dumps({"x": 1.5}) == '{"x": 1.5}' and jsonio.loads('{"x": 1.5}') == {"x": 1.5}


def test_train_cli_writes_strict_json_when_metrics_are_nan(tmp_path, monkeypatch, capsys):
    real = Run.evaluate

    def nan_test(self, split):
        out = real(self, split)
        return {k: (math.nan if split == "test" else v) for k, v in out.items()}

    monkeypatch.setattr(Run, "evaluate", nan_test)
    out = tmp_path / "run"
    assert main_entry(["--smoke-test", "--out", str(out), "--set", "epochs=1", "--quiet"]) == 0
    result = _strict((out / "result.json").read_text())
    assert result["test/recall@20"] is None and result["nonfinite"]["/test~1recall@20"] == "nan"
    assert "not a finite number" in result["nonfinite_why"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict(line)
    _strict((out / "run.json").read_text())


def test_tune_state_json_is_strict_and_round_trips(tmp_path):
    from tune.trainable import STATE_FILE, Tracker
    t = Tracker("val/recall@20")
    t.save(tmp_path)  # best_select = -inf, best_value = nan before any epoch
    _strict((tmp_path / STATE_FILE).read_text())
    u = Tracker("val/recall@20")
    u.best_select = 5.0
    u.load(tmp_path)
    assert u.best_select == -math.inf and math.isnan(u.best_value)


# ----------------------------------------------------------------- part 3: fingerprint


def test_fingerprint_same_content_both_layouts_and_each_change_named(tmp_path):
    a = fingerprint(quiet_load(write_mmssl(tmp_path / "a")))
    assert a == fingerprint(quiet_load(write_mmrec(tmp_path / "b")))
    assert set(a["splits"]) == {"train", "val", "test"} and a["features"]["image"]["shape"] == [6, 3]
    swapped = fingerprint(quiet_load(write_mmssl(tmp_path / "c", {**SPLITS, "val": SPLITS["test"], "test": SPLITS["val"]})))
    assert changes(a, swapped) == ["val split (4 -> 4 interactions)", "test split (4 -> 4 interactions)"] or \
        changes(a, swapped) == [f"val split ({a['splits']['val']['nnz']} -> {swapped['splits']['val']['nnz']} interactions)",
                                f"test split ({a['splits']['test']['nnz']} -> {swapped['splits']['test']['nnz']} interactions)"]
    feats = {"image": np.zeros((7, 3)), "text": np.ones((7, 2), np.float32)}
    more = fingerprint(quiet_load(write_mmssl(tmp_path / "d", features=feats)))
    assert changes(a, more) == ["items 6 -> 7", "feature 'image' shape 6x3 -> 7x3", "feature 'text' shape 6x2 -> 7x2"]
    edited = fingerprint(quiet_load(write_mmssl(tmp_path / "e", features={"image": np.zeros((6, 3))})))
    assert changes(a, edited) == ["feature 'image' values", "feature 'text' removed"]
    assert changes(a, a) == []


def _data_dir(path: Path, n_items=80, seed=1) -> Path:
    write(make_dataset(n_users=120, n_items=n_items, seed=seed), path)
    return path


def test_fit_refuses_to_resume_on_other_data(tmp_path, small_cfg):
    cfg = small_cfg.replace(epochs=1)
    data = quiet_load(_data_dir(tmp_path / "d"))
    fit(cfg, data, on_epoch=lambda e, m, save: save(tmp_path / "ck"))
    other = quiet_load(_data_dir(tmp_path / "d2", n_items=81))
    with pytest.raises(DataError) as ei:
        fit(cfg.replace(epochs=2), other, resume_from=tmp_path / "ck")
    assert str(ei.value).startswith(f"{tmp_path / 'ck' / 'checkpoint.pt'}: the data changed since this run started "
                                    "(items 80 -> 81;")
    fit(cfg.replace(epochs=2), data, resume_from=tmp_path / "ck")  # the same data resumes


@pytest.mark.parametrize("change", ["swap_val_test", "more_items"])
def test_train_cli_resume_on_changed_data_exit_2_keeps_files(tmp_path, capsys, change):
    d = _data_dir(tmp_path / "d")
    out = tmp_path / "run"
    assert main_entry(["--data", str(d), "--out", str(out), "--set", "epochs=1", "--set", "embed_dim=16",
                       "--set", "batch_size=64", "--quiet"]) == 0
    capsys.readouterr()
    if change == "swap_val_test":
        os.replace(d / "val.json", d / "tmp.json")
        os.replace(d / "test.json", d / "val.json")
        os.replace(d / "tmp.json", d / "test.json")
        needle = "val split ("
    else:
        shutil.rmtree(d)
        _data_dir(d, n_items=81)
        needle = "items 80 -> 81"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "config.yaml").write_text((out / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    before["config.yaml"] = (out / "config.yaml").read_bytes()
    err = _one_line_exit_2(capsys, ["--resume", str(out)])
    assert "the data changed since this run started" in err and needle in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing rewritten or lost


# ----------------------------------------------------------------- part 5: paths and flags


def test_train_cli_out_is_an_existing_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("keep")
    err = _one_line_exit_2(capsys, ["--out", str(f), "--data", "/nonexistent/data"])  # --out checked first
    assert err == f"python -m mmssl.train: error: --out {f}: exists and is not a folder"
    assert f.read_text() == "keep"


def test_train_cli_out_below_a_file(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("keep")
    err = _one_line_exit_2(capsys, ["--out", str(f / "sub" / "run"), "--smoke-test"])
    assert err == f"python -m mmssl.train: error: --out {f / 'sub' / 'run'}: {f} is a file, not a folder"


def test_out_in_an_unwritable_folder(capsys):
    target = Path("/sys/mmssl-issue7-run")
    try:
        check_out_dir("/sys/x")
        pytest.skip("/sys is writable here")
    except ConfigError:
        pass
    err = _one_line_exit_2(capsys, ["--out", str(target), "--smoke-test"])
    assert err == f"python -m mmssl.train: error: --out {target}: cannot write to the folder /sys (to create {target} in): Permission denied"


def test_out_with_missing_parents_is_created(tmp_path):
    p = tmp_path / "a" / "b" / "c"
    assert check_out_dir(p) == p and not p.exists()  # checked, created later by the CLI


@pytest.mark.parametrize("args, needle", [
    (["--resume", "{f}"], "--resume {f}: exists and is not a folder"),
    (["--out", "{tmp}/r", "--config", "{tmp}"], "{tmp}: is a directory, not a file"),
    (["--out", "{tmp}/r", "--data", "{f}"], "{f}: not a directory"),
])
def test_train_cli_other_path_arguments(tmp_path, capsys, args, needle):
    f = tmp_path / "f.txt"
    f.write_text("x")
    err = _one_line_exit_2(capsys, [a.format(tmp=tmp_path, f=f) for a in args])
    assert needle.format(tmp=tmp_path, f=f) in err


@pytest.mark.parametrize("flag", [["--data", "synthetic"], ["--set", "lr=0.1"], ["--config", "x.yaml"],
                                  ["--subset-users", "10"], ["--seed", "3"], ["--out", "elsewhere"]])
def test_train_cli_resume_refuses_flags_that_cannot_apply(tmp_path, capsys, flag):
    err = _one_line_exit_2(capsys, ["--resume", str(tmp_path)] + flag)
    assert f"{flag[0]} cannot apply" in err


def test_synthetic_cli_paths(tmp_path, capsys):
    from mmssl.cli import run_main
    from mmssl.synthetic import main as synth_main
    f = tmp_path / "f.txt"
    f.write_text("x")
    for out, expected in ((f, f"--out {f}: exists and is not a folder"),
                          (f / "d", f"--out {f / 'd'}: {f} is a file, not a folder")):
        rc = run_main(synth_main, ["--out", str(out), "--users", "20", "--items", "10"], prog="synth")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == f"synth: error: {expected}"
