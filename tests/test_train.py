"""End-to-end tests of fit() and the train CLI: determinism, exact resume, divergence, outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmssl.step
from mmssl.errors import DivergedError
from mmssl.metrics import popularity_scores, rank_metrics
from mmssl.train import fit
from mmssl.train_cli import main

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": {}, "no_adversarial": {"adversarial": False}, "no_contrastive": {"contrastive": False},
    "no_gumbel": {"gumbel": False}, "no_augment": {"augment": False}, "no_attention": {"attention": False},
    "one_modality": {"modalities": ["image"]}, "id_only": {"modalities": []},
}


def _val_curve(cfg, data, **kw):
    curve = []
    result = fit(cfg, data, on_epoch=lambda e, m, save: curve.append(m), **kw)
    return curve, result


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_end_to_end(tiny, small_cfg, variant):
    curve, result = _val_curve(small_cfg.replace(**VARIANTS[variant]), tiny)
    assert [m["epoch"] for m in curve] == [1, 2]
    for key in ("train/loss", "train/loss_bpr", "train/loss_cl", "train/loss_g", "train/loss_d",
                "val/recall@10", "val/ndcg@20", "val/precision@50", "val/hit@20", "time/epoch_s"):
        assert key in curve[-1], key
    assert 0 < result["test/recall@20"] <= 1 and result["best_epoch"] in (1, 2)
    assert result["val/recall@20"] == max(m["val/recall@20"] for m in curve)


def test_same_seed_same_metrics(tiny, small_cfg):
    a, ra = _val_curve(small_cfg, tiny)
    b, rb = _val_curve(small_cfg, tiny)
    strip = lambda curve: [{k: v for k, v in m.items() if not k.startswith("time/")} for m in curve]  # noqa: E731
    assert strip(a) == strip(b)
    assert ra["test/recall@20"] == rb["test/recall@20"]
    c, _ = _val_curve(small_cfg.replace(seed=8), tiny)
    assert strip(c) != strip(a)


def test_resume_reproduces_uninterrupted_run(tiny, small_cfg, tmp_path):
    cfg = small_cfg.replace(epochs=4)
    full, r_full = _val_curve(cfg, tiny)

    class Interrupt(Exception):
        pass

    def stop_after_2(epoch, metrics, save):
        save(tmp_path)
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, tiny, on_epoch=stop_after_2)
    tail, r_resumed = _val_curve(cfg, tiny, resume_from=tmp_path / "checkpoint.pt")
    assert [m["epoch"] for m in tail] == [3, 4]
    for a, b in zip(full[2:], tail):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
               {k: v for k, v in b.items() if not k.startswith("time/")}
    assert r_full["test/recall@20"] == r_resumed["test/recall@20"]
    assert r_full["best_epoch"] == r_resumed["best_epoch"]


def test_resume_rejects_a_different_config(tiny, small_cfg, tmp_path):
    fit(small_cfg.replace(epochs=1), tiny, on_epoch=lambda e, m, save: save(tmp_path))
    from mmssl.errors import ConfigError
    with pytest.raises(ConfigError, match="cl_weight"):
        fit(small_cfg.replace(cl_weight=0.9), tiny, resume_from=tmp_path)


def test_early_stopping_with_patience(tiny, small_cfg):
    curve, result = _val_curve(small_cfg.replace(epochs=30, patience=1, lr=0.5), tiny)
    assert len(curve) < 30 and result["stopped_early"]
    assert result["epochs_run"] == result["best_epoch"] + 1


def test_nan_loss_raises_diverged_error(tiny, small_cfg, monkeypatch):
    real = mmssl.step.info_nce
    monkeypatch.setattr(mmssl.step, "info_nce", lambda *a: real(*a) * float("nan"))
    with pytest.raises(DivergedError) as err:
        fit(small_cfg, tiny)
    assert err.value.epoch == 1 and err.value.term == "train/loss_cl"


def test_full_model_beats_id_only_and_popularity():
    """On the planted-signal default data set, modalities must help (seeded, CPU)."""
    from mmssl.synthetic import default_dataset
    from mmssl.config import Config

    data = default_dataset()
    cfg = Config(epochs=8, patience=0, device="cpu")  # the paper's lr; ~30 s on 2 CPU cores
    full = fit(cfg, data)
    id_only = fit(cfg.replace(modalities=[]), data)
    pop = rank_metrics(popularity_scores(data.train, data.n_users), data.train, data.val)
    assert full["val/recall@20"] > id_only["val/recall@20"] > pop["recall@20"]


# ---------------------------------------------------------------- CLI ----

def test_cli_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert main(["--smoke-test", "--out", str(out), "--set", "epochs=2"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    result = json.loads((out / "result.json").read_text())
    assert {"best_epoch", "seconds", "config", "test/recall@20", "val/recall@20"} <= set(result)
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    # the same folder again is refused (nothing is overwritten) ...
    from mmssl.errors import ConfigError
    with pytest.raises(ConfigError, match="already holds a run"):
        main(["--smoke-test", "--out", str(out)])
    # ... and --resume with a larger budget continues from epoch 3
    cfg = (out / "config.yaml").read_text().replace("epochs: 2", "epochs: 3")
    (out / "config.yaml").write_text(cfg)
    assert main(["--resume", str(out)]) == 0
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mmssl.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--out", "{tmp}/x", "--set", "bogus=1"], "bogus"),
    (["--out", "{tmp}/x", "--data", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--out", "{tmp}/x", "--config", "/nonexistent.yaml"], "nonexistent.yaml"),
    (["--out", "{tmp}/x", "--epochs", "many"], "--epochs"),
    (["--resume", "{tmp}"], "resum"),
    (["--out", "{tmp}/x", "--set", "modalities=[nope]"], "nope"),
    (["--out", "{tmp}/x", "--data", "synthetic:60y40"], "expected synthetic:UxI"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    p = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert needle in p.stderr


def test_cli_takes_a_generated_synthetic_set_like_search_and_ablation(tmp_path):
    assert main(["--data", "synthetic:60x40", "--epochs", "1", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert result["best_epoch"] == 1


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("precious\n")
    p = _cli("--smoke-test", "--out", str(tmp_path))
    assert p.returncode == 2 and "already holds a run" in p.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


def test_cli_divergence_is_exit_3(tmp_path):
    p = _cli("--smoke-test", "--out", str(tmp_path / "d"), "--set", "lr=1e30", "--set", "epochs=2")
    assert p.returncode == 3, p.stderr[-500:]
    assert "diverged at epoch" in p.stderr and "Traceback" not in p.stderr


def test_sampler_skips_users_with_every_item_and_refuses_when_none_is_left():
    """A user with every item in train has no negative to draw (the sampler used to loop forever)."""
    import numpy as np
    import scipy.sparse as sp

    from mmssl.errors import DataError
    from mmssl.step import BatchSampler

    full_rows = sp.csr_matrix(np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=np.float32))
    s = BatchSampler(full_rows, batch_size=8, rng=np.random.default_rng(0))
    assert sorted(s.active.tolist()) == [1, 2]
    users, pos, neg = s.sample()
    assert sorted(users.tolist()) == [1, 2] and all(full_rows[u, n] == 0 for u, n in zip(users, neg))
    with pytest.raises(DataError, match="no user has both a train item and an item left"):
        BatchSampler(sp.csr_matrix(np.ones((3, 2), dtype=np.float32)), batch_size=8, rng=np.random.default_rng(0))
