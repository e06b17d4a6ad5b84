"""Multi-node search on a ``ray.cluster_utils.Cluster`` (one machine, three Ray nodes).

A head (driver only, no CPU) and two worker nodes with one CPU each. The real ``tune/search.py`` joins
the cluster with ``--address``; a test callback kills the worker node of the first
trial that runs on a worker, right after that trial's checkpoint at epoch 2. The trial
must be retried (Tune ``FailureConfig``) from its checkpoint, not from epoch 1, and the
search must finish every trial, spread over more than one node, with one Optuna trial
per Tune trial. Then the resource checks, with a fake GPU resource. About 1-2 minutes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import optuna
import pandas as pd
import pytest
import ray
from ray import tune
from ray.cluster_utils import Cluster

from mmssl.errors import ConfigError
from spaces import tiny_space
from tune import search
from tune.runner import check_resources, ray_session
from tune.trainable import NODE_KEY

NUM_SAMPLES, EPOCHS = 4, 6
SPACE = tiny_space(data="synthetic:200x120", epochs=EPOCHS, num_samples=NUM_SAMPLES, embed_dim=16)
_CLUSTER: dict = {}  # the Cluster and its worker nodes; module-level: Tune pickles its callbacks


class KillWorkerNode(tune.Callback):
    """Kill the worker node of the first trial reporting epoch >= 3 there (its checkpoint is at 2)."""

    def __init__(self):
        self.killed_trial = None
        self.epochs: dict[str, list[int]] = {}
        self.epochs_at_kill: list[int] = []
        self.recoveries: list[str] = []
        self.epochs_at_recover: list[int] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs.setdefault(trial.trial_id, []).append(int(result["epoch"]))
        workers = _CLUSTER.get("workers", {})
        node = workers.get(result.get(NODE_KEY))
        if self.killed_trial is None and node is not None and result["epoch"] >= 3:
            self.killed_trial = trial.trial_id
            self.epochs_at_kill = list(self.epochs[trial.trial_id])
            _CLUSTER["cluster"].remove_node(node, allow_graceful=False)
            _CLUSTER["killed"] = result.get(NODE_KEY)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recoveries.append(trial.trial_id)
        # results already in flight when the node died (e.g. epoch 4 with its checkpoint) still
        # arrive after the kill: the retry starts after the last epoch seen before recovery
        self.epochs_at_recover = list(self.epochs.get(trial.trial_id, []))


@pytest.fixture(scope="module")
def cluster():
    temp_dir = tempfile.mkdtemp(prefix="mmssl-cl-", dir="/tmp")
    # Cluster writes the address of "the current cluster" under Ray's default temp root:
    # keep it in ours, so that nobody's plain ray.init() attaches to this cluster
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir,
                                                          "include_dashboard": False})
        workers = [c.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(2)]
        c.wait_for_nodes()
        _CLUSTER.update(cluster=c, workers={w.node_id: w for w in workers}, head=c.head_node.node_id)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.shutdown()
        _CLUSTER.clear()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def killed_search(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    space = out / "space.yaml"
    space.write_text(SPACE)
    killer = KillWorkerNode()
    t0 = time.time()
    rc = search.main(["--space", str(space), "--out", str(out), "--name", "multi", "--address", cluster.address],
                     callbacks=[killer])
    return {"rc": rc, "dir": out / "multi", "killer": killer, "seconds": time.time() - t0}


def test_trials_spread_over_nodes_and_all_finish(killed_search):
    assert killed_search["rc"] == 0
    trials = pd.read_csv(killed_search["dir"] / "trials.csv")
    assert len(trials) == NUM_SAMPLES and trials["trial_id"].is_unique
    assert (trials["status"] == "completed").all(), trials[["trial_id", "status", "reason"]]
    assert (trials["epochs"] == EPOCHS).all()
    assert trials["node_id"].notna().all() and trials["device"].eq("cpu").all()
    assert trials["node_ip"].notna().all()
    nodes = {n for row in trials["nodes"] for n in row.split(";")}
    assert len(nodes) > 1, "every trial ran on one node"
    assert all(row.split(";")[-1] == last for row, last in zip(trials["nodes"], trials["node_id"]))
    print(f"\ncluster search: {killed_search['seconds']:.0f} s; nodes per trial: {list(trials['nodes'])}")


def test_killed_node_trial_is_retried_from_its_checkpoint(killed_search):
    killer = killed_search["killer"]
    tid = killer.killed_trial
    assert tid is not None, "no trial ran on a worker node"
    assert killer.recoveries == [tid]  # retried once, by Tune's FailureConfig
    seen = killer.epochs[tid]
    assert killer.epochs_at_kill[-1] >= 3, seen
    before, after = killer.epochs_at_recover, seen[len(killer.epochs_at_recover):]
    assert after, seen
    restart = after[0]
    assert restart != 1, f"the retry started from scratch: {seen}"
    assert (restart - 1) % 2 == 0 and 2 <= restart - 1 <= before[-1], f"not from a checkpoint (every 2): {seen}"
    assert after == list(range(restart, EPOCHS + 1)), seen
    trials = pd.read_csv(killed_search["dir"] / "trials.csv").set_index("trial_id")
    assert trials.loc[tid, "node_id"] != _CLUSTER["killed"]  # it finished elsewhere
    assert trials.loc[tid, "nodes"].split(";")[0] == _CLUSTER["killed"]
    print(f"\nkilled node's trial {tid}: epochs {seen}; trials requested {NUM_SAMPLES}, finished "
          f"{len(trials)}, retried {len(killer.recoveries)}, duplicated {len(trials) - trials.index.nunique()}")


def test_study_keeps_one_trial_per_tune_trial(killed_search):
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{killed_search['dir'] / 'study.db'}")
    trials = pd.read_csv(killed_search["dir"] / "trials.csv")
    assert len(study.trials) == NUM_SAMPLES
    ids = [t.user_attrs["ray_trial_id"] for t in study.trials]
    assert sorted(ids) == sorted(trials["trial_id"])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    killed = next(t for t in study.trials if t.user_attrs["ray_trial_id"] == killed_search["killer"].killed_trial)
    assert sorted(killed.intermediate_values) == list(range(1, EPOCHS + 1))


def test_gpu_and_cpu_requests_checked_against_the_nodes(killed_search, cluster, tmp_path):
    with ray_session(address=cluster.address):
        check_resources(1, 0)
        with pytest.raises(ConfigError, match="has no GPU"):
            check_resources(1, 0.25)
        with pytest.raises(ConfigError, match="largest node .* has 1 CPU"):
            check_resources(2, 0)
    # the CLI refuses before any trial starts
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with pytest.raises(ConfigError, match="--gpus-per-trial 0.5: the Ray cluster .* has no GPU"):
        search.main(["--space", str(space), "--out", str(tmp_path), "--name", "gpu", "--address", cluster.address,
                     "--gpus-per-trial", "0.5"])
    assert not list((tmp_path / "gpu").glob("trial_*"))
    # a node with a (fake) GPU resource: fractions fit, more than one GPU does not
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, temp_dir=cluster.head_node.get_temp_dir_path())
    cluster.wait_for_nodes()
    try:
        with ray_session(address=cluster.address):
            check_resources(1, 0.25)
            check_resources(1, 1)
            with pytest.raises(ConfigError, match="--gpus-per-trial 2: the largest node .* has 1 GPU"):
                check_resources(1, 2)
    finally:
        cluster.remove_node(gpu_node)


def test_check_resources_on_node_lists():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # dead nodes do not count
    check_resources(16, 0, nodes)
    check_resources(4, 0.25, nodes)
    check_resources(8, 2, nodes)
    with pytest.raises(ConfigError, match="has 2 GPU"):
        check_resources(1, 3, nodes)
    with pytest.raises(ConfigError, match="has 16 CPU"):
        check_resources(17, 0, nodes)
    with pytest.raises(ConfigError, match="no GPU"):
        check_resources(1, 0.5, [{"Alive": True, "Resources": {"CPU": 4.0}}])
