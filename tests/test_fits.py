"""tune.runner.run_fits: Ray tasks, per-key cache, failures recorded, progress callback.

Tiny synthetic runs (2 epochs) in a private local Ray with 2 CPUs; about 30-60 s.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mmssl.config import Config
from tune.runner import FitJob, config_hash, data_fingerprint, job_key, run_fits


@pytest.fixture(scope="module")
def base():
    return Config(embed_dim=16, n_heads=4, batch_size=32, epochs=2, patience=0, topk_rate=0.05,
                  device="cpu", adversarial=False).to_dict()


def _jobs(base, seeds=(1, 2), tag="full", per_user=True, **changes):
    out = []
    for s in seeds:
        cfg = {**base, **changes, "seed": s}
        out.append(FitJob(job_key("tiny", tag, s, cfg), "tiny", cfg, per_user))
    return out


def test_runs_cache_and_progress(ray_local, tiny, base, tmp_path):
    calls = []
    jobs = _jobs(base) + _jobs(base, seeds=(1,), tag="id-only", per_user=False, modalities=[])
    res = run_fits(jobs, {"tiny": tiny}, tmp_path, cpus_per_run=1, max_concurrent=2,
                   on_result=lambda r, done, total, eta: calls.append((r["key"], done, total, eta)))
    assert [r["key"] for r in res] == [j.key for j in jobs]
    assert all(r["status"] == "ok" and r["reason"] == "" and not r["cached"] for r in res)
    assert sorted(c[1] for c in calls) == [1, 2, 3] and {c[2] for c in calls} == {3}
    assert all(c[3] is not None and c[3] >= 0 for c in calls)
    assert calls[-1][3] == 0
    for r in res[:2]:
        pu = r["per_user"]
        assert list(pu.columns[:1]) == ["user"] and len(pu) == (np.diff(tiny.test.indptr) > 0).sum()
        for k in ("recall", "ndcg", "precision", "hit"):
            for K in (10, 20, 50):
                assert abs(pu[f"test/{k}@{K}"].mean() - r[f"test/{k}@{K}"]) < 1e-12
        assert r["best_epoch"] in (1, 2) and r["epochs_run"] == 2 and r["seconds"] > 0
    assert res[2]["per_user"] is None
    assert res[0]["test/recall@20"] != res[1]["test/recall@20"], "seeds must differ"
    # second call: everything from the cache, nothing runs, identical numbers and frames
    calls.clear()
    again = run_fits(jobs, {"tiny": tiny}, tmp_path, on_result=lambda *a: calls.append(a))
    assert calls == [] and all(r["cached"] for r in again)
    for a, b in zip(res, again):
        assert {k: v for k, v in a.items() if k.startswith(("test/", "val/"))} == \
               {k: v for k, v in b.items() if k.startswith(("test/", "val/"))}
    assert again[0]["per_user"].equals(res[0]["per_user"])
    # a record whose config hash no longer matches the job is not reused
    rec_path = tmp_path / f"{jobs[0].key}.json"
    rec = json.loads(rec_path.read_text())
    rec["config_hash"] = "0" * 16
    rec_path.write_text(json.dumps(rec))
    third = run_fits(jobs, {"tiny": tiny}, tmp_path, on_result=lambda *a: calls.append(a))
    assert [r["cached"] for r in third] == [False, True, True] and len(calls) == 1
    assert third[0]["test/recall@20"] == res[0]["test/recall@20"], "same seed, same result"


def test_diverged_is_cached_crash_is_retried(ray_local, tiny, base, tmp_path):
    good = _jobs(base, seeds=(3,))
    diverged = _jobs(base, seeds=(3,), tag="lr-huge", lr=1e30)
    crash = _jobs(base, seeds=(3,), tag="bad-modality", modalities=["no-such-modality"])
    jobs = good + diverged + crash
    res = run_fits(jobs, {"tiny": tiny}, tmp_path, on_result=lambda *a: None)
    assert [r["status"] for r in res] == ["ok", "failed", "failed"]
    assert res[1]["reason"].startswith("training diverged at epoch") and "\n" not in res[1]["reason"]
    assert res[2]["reason"].startswith("DataError") and "no-such-modality" in res[2]["reason"]
    assert res[1]["per_user"] is None and res[2]["per_user"] is None
    assert (tmp_path / f"{diverged[0].key}.json").is_file()
    assert not (tmp_path / f"{crash[0].key}.json").exists()
    calls = []
    again = run_fits(jobs, {"tiny": tiny}, tmp_path, on_result=lambda r, *a: calls.append(r["key"]))
    assert calls == [crash[0].key], "only the crashed run is retried"
    assert again[1]["cached"] and again[1]["status"] == "failed"
    calls.clear()
    run_fits(jobs, {"tiny": tiny}, tmp_path, retry_failed=True, on_result=lambda r, *a: calls.append(r["key"]))
    assert sorted(calls) == sorted([diverged[0].key, crash[0].key])


def test_bad_arguments(tiny, base, tmp_path):
    job = _jobs(base, seeds=(1,))[0]
    with pytest.raises(ValueError, match="duplicated job keys"):
        run_fits([job, job], {"tiny": tiny}, tmp_path)
    with pytest.raises(ValueError, match="unknown dataset name"):
        run_fits([job], {"other": tiny}, tmp_path)
    with pytest.raises(ValueError, match="max_concurrent"):
        run_fits([job], {"tiny": tiny}, tmp_path, max_concurrent=0)


def test_keys_and_hashes(tiny, base):
    a = {**base, "seed": 1}
    assert config_hash(a) == config_hash(dict(reversed(list(a.items()))))
    assert config_hash(a) == config_hash({**a, "device": "cuda"})
    assert config_hash(a) != config_hash({**a, "cl_weight": 0.031})
    key = job_key("data/tiktok x", "w/o ASL", 1, a)
    assert key.startswith("data_tiktok_x__w_o_ASL__seed1__") and "/" not in key
    assert data_fingerprint(tiny) == data_fingerprint(tiny.select_modalities(None))
    assert data_fingerprint(tiny) != data_fingerprint(tiny.select_modalities(tiny.modalities[:1]))
    assert data_fingerprint(tiny) != data_fingerprint(tiny.subset_users(100))


def test_a_run_no_node_can_hold_is_refused_before_any_task(ray_local, tiny, base, tmp_path):
    """A GPU request on a cluster without one would wait forever: one-line ConfigError instead."""
    from mmssl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--gpus-per-run 1: the Ray cluster \(1 node\) has no GPU"):
        run_fits(_jobs(base, seeds=(1,)), {"tiny": tiny}, tmp_path, cpus_per_run=1, gpus_per_run=1)
    with pytest.raises(ConfigError, match=r"^--cpus-per-run 64: the largest node"):
        run_fits(_jobs(base, seeds=(1,)), {"tiny": tiny}, tmp_path, cpus_per_run=64)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing cached
