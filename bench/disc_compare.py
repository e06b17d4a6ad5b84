"""Dense vs factored discriminator (``disc_impl``), interleaved batch by batch in one process.

Used by ``bench/epoch.py --compare-disc-impl`` (TikTok, Baby) and ``--scaling`` (synthetic
catalogues of growing |I|, same users); run those, not this module:

    python bench/epoch.py --compare-disc-impl --threads 1 --batches 3
    python bench/epoch.py --scaling 2000,8000,32000 --threads 1 --batches 2 --set batch_size=256
    python bench/epoch.py --compare-disc-impl --smoke-test

Variants, each its own ``mmssl.train.Run`` built from the same seed (same initial weights,
same batches): ``dense-today`` is the code as it was before issue 6 (its D-step backward
also computes the unused gradient w.r.t. the interpolated rows, and the graphs are rebuilt
by :func:`generator_graph_before`, the rebuild code of that time, verbatim),
``dense`` the dense path now (``disc_impl: dense``), ``factored`` the default. Before batch b every
variant's torch RNG is set to the same state, so they draw the same dropout masks, Gumbel
noise and α: the loss terms must agree (printed as a check). Each round runs the variants
in a rotating order. The factored variant's warm-up batch runs under a dispatch mode that
fails the run if a dense row tensor (≥ B rows of width |I|) appears in the forward, D or G
phase; the dense variant's is shown for contrast.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import defaultdict

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

import mmssl.graph as graph
import mmssl.model as model_mod
from mmssl.data import Dataset
from mmssl.step import PhaseTimer, train_step
from mmssl.train import Run

VARIANTS = {"dense-today": ("dense", False), "dense": ("dense", True), "factored": ("factored", True)}
ROW_PHASES = ("forward", "d_step", "g_step")
MIB = 2.0 ** 20


class RowTensorWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records dense 2-D tensors with a side |I| and the other >= B (parameter shapes excluded), per phase."""

    def __init__(self, n_items: int, batch: int, param_side: int):
        super().__init__()
        self.n_items, self.batch, self.param_side = n_items, batch, param_side
        self.phase: str | None = None
        self.found: list[tuple[str, tuple, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.phase in ROW_PHASES:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dim() == 2:
                    a, b = t.shape
                    if self.param_side in (a, b):
                        continue
                    if (b == self.n_items and a >= self.batch) or (a == self.n_items and b >= self.batch):
                        self.found.append((self.phase, tuple(t.shape), str(func)))
        return out


class PhaseRecorder:
    """PhaseTimer that also tells a RowTensorWatch which phase runs, and records peak memory rise."""

    def __init__(self, device, mem, watch: RowTensorWatch | None = None):
        self.timer, self.mem, self.watch = PhaseTimer(device), mem, watch
        self.rise: dict[str, float] = defaultdict(float)

    @property
    def totals(self):
        return self.timer.totals

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self.mem.reset() if self.mem else 0.0
        if self.watch is not None:
            self.watch.phase = name
        with self.timer(name):
            yield
        if self.watch is not None:
            self.watch.phase = None
        if self.mem:
            self.rise[name] = max(self.rise[name], self.mem.peak() - start)


@torch.no_grad()
def generator_graph_before(f_u, f_i, k: int, chunk: int = 2048) -> graph.GeneratedGraph:
    """``mmssl.graph.generator_graph`` and ``modality_id_operators`` as they were before issue 6
    (commit e73a31a), verbatim: torch.topk over whole [chunk, |I|] score blocks, a composite-key
    argsort for the item side. The ``dense-today`` baseline rebuilds its graphs with it."""
    n_users, n_items = f_u.shape[0], f_i.shape[0]
    fu, fi = F.normalize(f_u.float(), dim=1), F.normalize(f_i.float(), dim=1)
    cols = torch.empty(n_users, k, dtype=torch.int64, device=f_u.device)
    for s in range(0, n_users, chunk):
        cols[s:s + chunk] = torch.topk(fu[s:s + chunk] @ fi.T, k, dim=1).indices
    n_users, k = cols.shape
    device = cols.device
    flat = cols.reshape(-1)
    rows = torch.arange(n_users, device=device).repeat_interleave(k)
    crow = torch.arange(0, n_users * k + 1, k, device=device)
    sorted_cols, _ = torch.sort(cols, dim=1)
    sorted_flat = sorted_cols.reshape(-1)
    ones = torch.full((n_users * k,), 1.0 / math.sqrt(k), device=device)
    g_u = torch.sparse_csr_tensor(crow, sorted_flat, ones, size=(n_users, n_items))
    inv_sqrt_deg_i = torch.bincount(flat, minlength=n_items).float().clamp(min=1).rsqrt()
    order = torch.argsort(flat * n_users + rows)
    t_rows, t_cols = flat[order], rows[order]
    t_crow = torch.zeros(n_items + 1, dtype=torch.int64, device=device)
    t_crow[1:] = torch.cumsum(torch.bincount(t_rows, minlength=n_items), 0)
    g_i = torch.sparse_csr_tensor(t_crow, t_cols, inv_sqrt_deg_i[t_rows], size=(n_items, n_users))
    g_u_t = torch.sparse_csr_tensor(t_crow, t_cols, ones, size=(n_items, n_users))
    g_i_t = torch.sparse_csr_tensor(crow, sorted_flat, inv_sqrt_deg_i[sorted_flat], size=(n_users, n_items))
    return graph.GeneratedGraph(graph.SparseOp(g_u, g_u_t), graph.SparseOp(g_i, g_i_t), cols)


@contextlib.contextmanager
def _old_rebuild(on: bool):
    """Inside: the model rebuilds its graphs with :func:`generator_graph_before`."""
    saved = model_mod.generator_graph
    if on:
        model_mod.generator_graph = generator_graph_before
    try:
        yield
    finally:
        model_mod.generator_graph = saved


def _batch(run: Run, timer, d_grads_only: bool, seed: int) -> tuple[float, torch.Tensor]:
    with _old_rebuild(not d_grads_only):
        return _batch_inner(run, timer, d_grads_only, seed)


def _batch_inner(run: Run, timer, d_grads_only: bool, seed: int) -> tuple[float, torch.Tensor]:
    dev = run.device
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    users, pos, neg = (torch.from_numpy(a).to(dev) for a in run.sampler.sample())
    terms = train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg, run.cfg,
                       run.step % run.cfg.refresh_every == 0, timer, d_grads_only=d_grads_only)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    run.step += 1
    return time.perf_counter() - t0, terms


def stats(v: list[float]) -> tuple[float, float, float]:
    return statistics.median(v), min(v), max(v)


def compare(name: str, data: Dataset, cfg, device, mem, batches: int, variants=tuple(VARIANTS),
            check_rows: bool = True, evaluate: bool = True) -> dict:
    """Interleaved timing of ``variants``; returns per-variant per-phase lists of s/batch and more."""
    runs = {v: Run(cfg.replace(disc_impl=VARIANTS[v][0]), data, device) for v in variants}
    any_run = next(iter(runs.values()))
    B, I = any_run.sampler.batch, data.n_items
    h1 = any_run.disc.lin1.weight.shape[0] if any_run.disc is not None else -1
    print(f"\n=== {name}: {data.n_users} users, {I} items, {data.train.nnz} train, modalities "
          + ", ".join(f"{m}:{x.shape[1]}" for m, x in any_run.data.features.items())
          + f"; B={B}, {any_run.sampler.n_batches} batches/epoch, threads={torch.get_num_threads()}")
    # warm-up batch of each variant; the factored one (and dense, for contrast) under the row watch
    rows_found = {}
    for v, run in runs.items():
        watch = RowTensorWatch(I, B, h1) if check_rows and v in ("dense", "factored") else None
        with (watch if watch is not None else contextlib.nullcontext()):
            _batch(run, PhaseRecorder(device, None, watch), VARIANTS[v][1], seed=12345)
        if watch is not None:
            rows_found[v] = watch.found
    for v, found in rows_found.items():
        shapes = sorted({(ph, s) for ph, s, _ in found})
        print(f"    dense row tensors (>= {B} x {I}) in forward/d_step/g_step, {v}: "
              + (", ".join(f"{ph}:{'x'.join(map(str, s))}" for ph, s in shapes[:6]) if shapes else "none"))
    if "factored" in rows_found:
        assert not rows_found["factored"], f"factored path made dense row tensors: {rows_found['factored'][:5]}"
    times = {v: defaultdict(list) for v in runs}
    rise = {v: defaultdict(float) for v in runs}
    terms = {v: [] for v in runs}
    order = list(runs)
    for b in range(batches):
        for v in order[b % len(order):] + order[:b % len(order)]:     # rotate who goes first
            t = PhaseRecorder(device, mem)
            wall, tr = _batch(runs[v], t, VARIANTS[v][1], seed=1000 + b)
            for ph, s in t.totals.items():
                times[v][ph].append(s)
                rise[v][ph] = max(rise[v][ph], t.rise[ph])
            times[v]["total"].append(wall)
            terms[v].append(tr)
    base = "dense" if "dense" in runs else order[0]            # same rebuild as factored: only D differs
    ref = torch.stack(terms[base])
    diffs = {v: float(((torch.stack(terms[v]) - ref).abs() / ref.abs().clamp_min(1e-12)).max()) for v in runs}
    first = {v: float(((terms[v][0] - terms[base][0]).abs() / terms[base][0].abs().clamp_min(1e-12)).max())
             for v in runs}
    print(f"    loss terms vs {base}, max relative difference: first timed batch "
          + ", ".join(f"{v} {d:.1e}" for v, d in first.items()) + f"; over all {batches} batches "
          + ", ".join(f"{v} {d:.1e}" for v, d in diffs.items())
          + " (float32; the runs drift apart by rounding once their weights are updated"
          + ("; dense-today's rebuild also breaks exact ties between items differently)" if "dense-today" in runs
             else ")"))
    print(f"    s/batch over {batches} interleaved batches: median [min, max]")
    phases = [ph for ph in ("forward", "rebuild", "d_step", "g_step", "total") if ph in times[order[0]]]
    head = "".join(f"{v:>27}" for v in runs)
    ratios = [v for v in runs if v != "factored" and "factored" in runs]
    print(f"    {'phase':<9}{head}" + "".join(f"{v + '/factored':>22}" for v in ratios))
    for ph in phases:
        cells = "".join("{:>9.3f} [{:.3f}, {:.3f}]".format(*stats(times[v][ph])).rjust(27) for v in runs)
        rat = "".join(f"{statistics.median(times[v][ph]) / statistics.median(times['factored'][ph]):>21.2f}x"
                      for v in ratios)
        print(f"    {ph:<9}{cells}{rat}")
    if mem is not None:
        print(f"    peak memory rise in d_step ({mem.what()}): "
              + ", ".join(f"{v} {rise[v]['d_step'] / MIB:.0f} MiB" for v in runs))
    out = {"times": times, "rise": rise, "diffs": diffs, "n_batches": any_run.sampler.n_batches, "B": B,
           "rows_found": rows_found}
    if evaluate and "factored" in runs:
        t0 = time.perf_counter()
        runs["factored"].evaluate("val")
        out["eval_s"] = time.perf_counter() - t0
        per_batch = statistics.median(times["factored"]["total"])
        print(f"    epoch estimate, factored: {per_batch:.3f} s/batch x {out['n_batches']} batches + evaluation "
              f"{out['eval_s']:.2f} s = {per_batch * out['n_batches'] + out['eval_s']:.0f} s"
              + "".join(f"; {v}: {statistics.median(times[v]['total']) * out['n_batches'] + out['eval_s']:.0f} s"
                        for v in ratios))
    del runs
    return out


def synthetic_catalogue(n_users: int, n_items: int, degree: int, seed: int) -> Dataset:
    """Random interactions (``degree`` train items per user, 1 val, 1 test) and two 128-d random modalities."""
    rng = np.random.default_rng(seed)
    per_user = degree + 2
    cols = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    rows = np.repeat(np.arange(n_users), per_user).reshape(n_users, per_user)

    def csr(sl):
        r, c = rows[:, sl].ravel(), cols[:, sl].ravel()
        m = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n_users, n_items))
        m.sort_indices()
        return m

    feats = {m: rng.standard_normal((n_items, 128), dtype=np.float32) for m in ("audio", "image")}
    return Dataset(n_users, n_items, csr(slice(0, degree)), csr(slice(degree, degree + 1)),
                   csr(slice(degree + 1, degree + 2)), feats, f"random {n_users} x {n_items}")


def scaling(sizes: list[int], n_users: int, cfg, device, mem, batches: int) -> list[dict]:
    """Dense vs factored per-batch time and D-step memory over catalogue sizes (same users)."""
    rows = []
    for n_items in sizes:
        data = synthetic_catalogue(n_users, n_items, degree=6, seed=0)
        res = compare(f"synthetic |I|={n_items}", data, cfg, device, mem, batches,
                      variants=("dense", "factored"), check_rows=False, evaluate=False)
        rows.append({"items": n_items, **{f"{v}_s": statistics.median(res["times"][v]["total"]) for v in
                                          ("dense", "factored")},
                     **{f"{v}_d_step_s": statistics.median(res["times"][v]["d_step"]) for v in ("dense", "factored")},
                     **{f"{v}_mib": res["rise"][v]["d_step"] / MIB for v in ("dense", "factored")}})
    print(f"\n=== scaling with |I| ({n_users} users, B={cfg.batch_size}): median s/batch and D-step memory rise")
    print(f"    {'|I|':>7}{'dense s':>10}{'factored s':>12}{'ratio':>8}{'dense d_step':>14}{'fact d_step':>13}"
          f"{'dense MiB':>11}{'fact MiB':>10}")
    for r in rows:
        print(f"    {r['items']:>7}{r['dense_s']:>10.2f}{r['factored_s']:>12.2f}{r['dense_s'] / r['factored_s']:>7.2f}x"
              f"{r['dense_d_step_s']:>14.2f}{r['factored_d_step_s']:>13.2f}{r['dense_mib']:>11.0f}"
              f"{r['factored_mib']:>10.0f}")
    return rows
