"""Where an MMSSL training epoch spends its time and memory, per phase, on real data sizes.

Run from the repository root (the venv active):

    python bench/epoch.py                                  # TikTok and Baby, default config, CPU ok
    python bench/epoch.py --data tiktok --batches 9        # more batches -> steadier medians
    python bench/epoch.py --compare-no-adversarial         # + the same table with adversarial=false
    python bench/epoch.py --device cuda --full-epoch       # GPU: whole epochs, no extrapolation
    python bench/epoch.py --set batch_size=2048 --set eval_chunk=4096 --threads 1
    python bench/epoch.py --smoke-test                     # tiny synthetic data, seconds
    python bench/epoch.py --compare-disc-impl --threads 1 --batches 3   # dense vs factored D, interleaved
    python bench/epoch.py --scaling 2000,8000,32000 --threads 1 --batches 2 --set batch_size=256

Data sets (``--data-root``, default ``../shared/data`` next to the repository):
(a) ``tiktok``: real interactions and features (9,308 users, 6,710 items, 2 modalities);
(b) ``baby``: real interactions (19,445 users, 7,050 items) with seeded random float32
features of the paper's widths, ``image`` 4096 and ``text`` 384 (the real ones are not
available).

It drives the real training code: ``mmssl.train.Run`` (model, discriminator, optimizers,
sampler) and ``mmssl.step.train_step`` with ``mmssl.step.PhaseTimer``, which times the
phases ``forward`` (incl. building the batch's fake/real rows), ``rebuild`` (generated
graphs for all users), ``d_step`` (discriminator loss with gradient penalty, backward,
step) and ``g_step`` (generator loss through D, the model's backward and optimizer step);
``other`` is the rest of the batch (sampling, host->device). Evaluation is
``Run.evaluate("val")`` (one eval-mode forward + full ranking of all users with
validation items), compared with a bare chunked ``scores = U @ I.T`` + ``topk(50)`` on the
same embeddings and device (``bare_topk`` of bench/eval_speed.py; target ratio <= 1.5).

By default N batches are timed after one warm-up batch and the epoch figures are
EXTRAPOLATED: per-phase median s/batch x batches per epoch (printed as such);
``--full-epoch`` times whole epochs (``Run.train_epoch``) instead, median over
``--epochs`` epochs (use it on a GPU; a full-method TikTok epoch is minutes on 2 CPU cores).
Timings are medians; memory is the peak per phase: on CPU the process peak RSS
(``ru_maxrss``, whose high-water mark is reset before each phase through
``/proc/self/clear_refs`` where the kernel allows it; otherwise it is the peak since start),
on CUDA ``torch.cuda.max_memory_allocated``. The script also asserts one forward pass per
batch and reports the largest dense tensor a training batch and an evaluation create (it
must stay below users x items).

``--compare-disc-impl`` replaces the per-phase table by the interleaved comparison of the
discriminator implementations (``disc_impl: dense`` before and after issue 6, and
``factored``), batch by batch, with the no-dense-row-tensor assertion on the factored
path; ``--scaling`` times dense vs factored on random catalogues of the given sizes
(bench/disc_compare.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import resource
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from eval_speed import bare_topk, median_times  # noqa: E402
import disc_compare  # noqa: E402

from mmssl.cli import run_main  # noqa: E402
from mmssl.config import Config  # noqa: E402
from mmssl.data import Dataset, DataWarning, load  # noqa: E402
from mmssl.errors import DataError  # noqa: E402
from mmssl.metrics import evaluate  # noqa: E402
from mmssl.step import PhaseTimer, train_step  # noqa: E402
from mmssl.train import Run, resolve_device  # noqa: E402

PHASES = ("forward", "rebuild", "d_step", "g_step")
BABY_WIDTHS = {"image": 4096, "text": 384}
MIB = 2.0 ** 20


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a stretch of code: CUDA max_memory_allocated, or the CPU process peak RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.resettable = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = True
            except OSError:
                pass

    def what(self) -> str:
        if self.cuda:
            return "CUDA max_memory_allocated"
        return ("process peak RSS (ru_maxrss), high-water mark reset before each phase" if self.resettable
                else "process peak RSS (ru_maxrss) since start (could not reset it per phase)")

    def reset(self) -> float:
        """Start a stretch; returns the memory in use now (bytes)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return float(torch.cuda.memory_allocated(self.device))
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> float:
        """Peak since the last reset (bytes)."""
        if self.cuda:
            return float(torch.cuda.max_memory_allocated(self.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class MeasuringTimer:
    """The training code's PhaseTimer plus the peak memory and call count of every phase."""

    def __init__(self, device: torch.device, mem: PeakMemory):
        self.timer, self.mem = PhaseTimer(device), mem
        self.peak: dict[str, float] = defaultdict(float)
        self.rise: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()

    @property
    def totals(self) -> dict[str, float]:
        return self.timer.totals

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self.mem.reset()
        with self.timer(name):
            yield
        peak = self.mem.peak()
        self.calls[name] += 1
        self.peak[name] = max(self.peak[name], peak)
        self.rise[name] = max(self.rise[name], peak - start)


# ----------------------------------------------------------------------------- checks
class ForwardCounter:
    """Counts the model's forward-pass entry points (wrapping the instance's methods)."""

    NAMES = ("modality_views", "propagate", "rebuild_graphs")

    def __init__(self, model):
        self.counts: Counter = Counter()
        for name in self.NAMES:
            orig = getattr(model, name)

            def counted(*a, _orig=orig, _name=name, **k):
                self.counts[_name] += 1
                return _orig(*a, **k)
            setattr(model, name, counted)   # instance attribute: shadows the method

    def take(self) -> Counter:
        c, self.counts = self.counts, Counter()
        return c


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest dense allocation any op makes (forward and backward; views excluded)."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, (), ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                numel = t.untyped_storage().nbytes() // t.element_size()   # a view counts its base
                if numel > self.numel:
                    self.numel, self.shape, self.op = numel, tuple(t.shape), str(func)
        return out


# ----------------------------------------------------------------------------- data
def baby_with_features(root: Path, seed: int) -> Dataset:
    data = load(root / "baby")
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal((data.n_items, w), dtype=np.float32) for m, w in BABY_WIDTHS.items()}
    return dataclasses.replace(data, features=feats,
                               source=f"{data.source} + random features "
                                      + ", ".join(f"{m}:{w}" for m, w in BABY_WIDTHS.items()))


def datasets(args) -> dict[str, Dataset]:
    if args.smoke_test:
        from mmssl.synthetic import make_dataset
        return {"smoke": make_dataset(n_users=300, n_items=200, seed=0)}
    root = Path(args.data_root)
    if not root.is_absolute():
        root = (REPO / root).resolve() if not root.exists() else root
    names = ["tiktok", "baby"] if args.data == "both" else [args.data]
    for name in names:
        if not (root / name).is_dir():
            raise DataError(f"{root / name}: data set not found (expected {args.data_root}/{name}; "
                            f"pass --data-root or run with --smoke-test)")
    out = {}
    for name in names:
        out[name] = load(root / "tiktok") if name == "tiktok" else baby_with_features(root, args.feature_seed)
    return out


# ----------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_batch(run: Run, timer) -> float:
    """One batch exactly as Run.train_epoch runs it (sample, rebuild every T, train_step); wall s."""
    sync(run.device)
    t0 = time.perf_counter()
    users, pos, neg = (torch.from_numpy(a).to(run.device) for a in run.sampler.sample())
    rebuild = run.step % run.cfg.refresh_every == 0
    terms = train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg,
                       run.cfg, rebuild, timer)
    sync(run.device)
    wall = time.perf_counter() - t0
    run.step += 1
    if not torch.isfinite(terms).all():
        print(f"  warning: non-finite loss term at step {run.step}: {terms.tolist()}")
    return wall


def per_phase_occurrences(run: Run) -> dict[str, float]:
    n = run.sampler.n_batches
    has_mods = bool(run.model.modalities)
    adv = run.disc is not None and has_mods
    return {"forward": n, "rebuild": math.ceil(n / run.cfg.refresh_every) if has_mods else 0,
            "d_step": n if adv else 0, "g_step": n, "other": n}


def measure_training(run: Run, args, mem: PeakMemory, counter: ForwardCounter) -> dict:
    n_batches = run.sampler.n_batches
    run.model.train()
    if run.disc is not None:
        run.disc.train()
    peak, rise = defaultdict(float), defaultdict(float)
    per_batch: dict[str, list[float]] = defaultdict(list)   # phase -> s per batch where it ran
    forwards: list[Counter] = []
    occ = per_phase_occurrences(run)
    timed = 0
    if not args.full_epoch:
        # N batches; more (< refresh_every) if none of them rebuilt the graphs but an epoch would
        while timed < args.batches or (occ["rebuild"] and not per_batch["rebuild"]):
            timed += 1
            t = MeasuringTimer(run.device, mem)
            wall = one_batch(run, t)
            forwards.append(counter.take())
            for ph in PHASES:
                if t.calls[ph]:
                    per_batch[ph].append(t.totals[ph])
                    peak[ph], rise[ph] = max(peak[ph], t.peak[ph]), max(rise[ph], t.rise[ph])
            per_batch["other"].append(wall - sum(t.totals.values()))
            per_batch["total"].append(wall)
        s_batch = {ph: statistics.median(v) for ph, v in per_batch.items()}
        s_epoch = {ph: s_batch[ph] * occ[ph] for ph in (*PHASES, "other") if ph in s_batch}
        epoch_walls = None
    else:
        epoch_totals: dict[str, list[float]] = defaultdict(list)
        epoch_walls = []
        for _ in range(args.epochs):
            t = MeasuringTimer(run.device, mem)
            sync(run.device)
            t0 = time.perf_counter()
            run.train_epoch(timer=t)
            sync(run.device)
            wall = time.perf_counter() - t0
            epoch_walls.append(wall)
            c = counter.take()
            forwards.append(Counter({k: v / n_batches for k, v in c.items()}))
            for ph in PHASES:
                if t.calls[ph]:
                    epoch_totals[ph].append(t.totals[ph])
                    peak[ph], rise[ph] = max(peak[ph], t.peak[ph]), max(rise[ph], t.rise[ph])
            epoch_totals["other"].append(wall - sum(t.totals.values()))
        s_epoch = {ph: statistics.median(v) for ph, v in epoch_totals.items()}
        s_batch = {ph: s_epoch[ph] / max(1, occ[ph]) for ph in s_epoch}
        s_batch["total"] = statistics.median(epoch_walls) / n_batches
    return {"s_batch": s_batch, "s_epoch": s_epoch, "peak": peak, "rise": rise, "forwards": forwards,
            "epoch_walls": epoch_walls, "timed": timed, "occ": occ}


def measure_evaluation(run: Run, args, mem: PeakMemory) -> dict:
    d, cfg, dev = run.data, run.cfg, run.device
    start = mem.reset()
    sync(dev)
    t0 = time.perf_counter()
    run.evaluate("val")
    sync(dev)
    first = time.perf_counter() - t0
    peak = mem.peak()
    with torch.no_grad():
        run.model.eval()
        out = run.model()
        run.model.train()
    U, I = out.h_user, out.h_item
    val_users = torch.as_tensor(np.flatnonzero(np.diff(d.val.indptr) > 0), device=dev)
    Uv = U.index_select(0, val_users)
    fns = [lambda: bare_topk(U, I, 50, cfg.eval_chunk),
           lambda: bare_topk(Uv, I, 50, cfg.eval_chunk),
           lambda: evaluate(U, I, [d.train], d.val, chunk_size=cfg.eval_chunk, prefix="val/"),
           lambda: run.evaluate("val")]
    bare_all, bare_val, metrics_only, full = median_times(fns, args.eval_runs, dev)
    return {"full": full, "metrics": metrics_only, "bare_all": bare_all, "bare_val": bare_val,
            "n_val_users": int(val_users.numel()), "first": first, "peak": peak, "rise": peak - start}


def first_layer_pass(run: Run, runs: int) -> float:
    """Median seconds of one batch-sized block of rows through the discriminator's first layer."""
    x = torch.rand(run.sampler.batch, run.data.n_items, device=run.device)
    with torch.no_grad():
        return median_times([lambda: run.disc.first_layer(x)], runs, run.device)[0]


def largest_dense(run: Run) -> tuple[int, tuple, str]:
    """One training batch and one evaluation under a dispatch mode: the largest dense tensor."""
    mode = LargestTensor()
    with mode:
        one_batch(run, PhaseTimer(run.device))
        run.evaluate("val")
    return mode.numel, mode.shape, mode.op


# ----------------------------------------------------------------------------- report
def fmt_s(x: float) -> str:
    return f"{x:10.3f}" if x < 100 else f"{x:10.1f}"


def bench_one(name: str, data: Dataset, cfg: Config, device: torch.device, args, label: str) -> dict:
    mem = PeakMemory(device)
    mem.reset()
    run = Run(cfg, data, device)
    counter = ForwardCounter(run.model)
    n_batches, B = run.sampler.n_batches, run.sampler.batch
    U, I = run.data.n_users, run.data.n_items
    mods = ", ".join(f"{m}:{x.shape[1]}" for m, x in run.data.features.items()) or "none"
    print(f"\n=== {name} [{label}]: {U} users, {I} items, {run.data.train.nnz} train interactions, "
          f"modalities {mods}")
    print(f"    device={device} threads={torch.get_num_threads()} batch_size={cfg.batch_size} "
          f"eval_chunk={cfg.eval_chunk} refresh_every={cfg.refresh_every} k={run.model.k} "
          f"adversarial={cfg.adversarial} loadavg={tuple(round(x, 2) for x in os.getloadavg())}")
    if run.disc is not None:
        w = run.disc.lin1.weight
        gflop = 2.0 * B * w.shape[0] * w.shape[1] / 1e9
        print(f"    discriminator first layer: {w.shape[1]} x {w.shape[0]} (|I| x |I|/4; "
              f"{w.numel() / 1e6:.2f} M weights, {w.numel() * 4 / MIB:.0f} MiB fp32); one pass of a "
              f"{B}-row block through it = {gflop:.1f} GFLOP; rows per batch: {len(run.model.modalities)} "
              f"fake x {B} + {B} real")
    else:
        print("    no discriminator (adversarial=false or ID-only)")

    # warm-up batch, run under a dispatch mode that records the largest dense tensor
    numel, shape, op = largest_dense(run)
    counter.take()
    covers_all = U <= max(B, cfg.eval_chunk)
    verdict = ("n/a here: a batch or an eval chunk covers all users" if covers_all
               else ("OK, no dense U x I" if numel < U * I else "FAIL: a dense U x I tensor"))
    print(f"    largest dense tensor in one training batch + one evaluation: {'x'.join(map(str, shape))} "
          f"= {numel / (U * I):.0%} of U x I ({U} x {I}), from {op} -> {verdict}")

    tr = measure_training(run, args, mem, counter)
    bad = [dict(c) for c in tr["forwards"]
           if c["modality_views"] != 1 or c["propagate"] != 1 or c["rebuild_graphs"] > 1]
    fw = tr["forwards"]
    unit = "epochs" if args.full_epoch else "batches"
    print(f"    forward passes per batch: modality_views {max(c['modality_views'] for c in fw):g}, propagate "
          f"{max(c['propagate'] for c in fw):g}, rebuild_graphs {max(c['rebuild_graphs'] for c in fw):g} "
          f"(max over {len(fw)} timed {unit}; {'OK, one forward per batch' if not bad else 'FAIL ' + str(bad[:3])})")
    assert not bad, f"expected one forward pass per batch, got {bad[:3]}"

    ev = measure_evaluation(run, args, mem)
    w1 = first_layer_pass(run, args.eval_runs) if run.disc is not None else None

    if args.full_epoch:
        how = (f"whole epochs ({n_batches} batches of {B} users), median over {args.epochs} epochs "
               f"after 1 warm-up batch; s/batch = s/epoch / batches")
        col = "s/epoch"
    else:
        how = (f"s/epoch EXTRAPOLATED from {tr['timed']} batches (after 1 warm-up batch): per-phase "
               f"median s/batch x {n_batches} batches per epoch ({B} users each)"
               + (f"; rebuild x {tr['occ']['rebuild']} (every {cfg.refresh_every} batches)"
                  if cfg.refresh_every > 1 and tr["occ"]["rebuild"] else ""))
        col = "s/epoch*"
    print(f"    timing: {how}")
    print(f"    memory: {mem.what()}, max over batches")
    sb, se = tr["s_batch"], tr["s_epoch"]
    rows = [ph for ph in (*PHASES, "other") if ph in se]
    total_e = sum(se[ph] for ph in rows)
    print(f"    {'phase':<12}{'s/batch':>10}{col:>11}{'share':>8}{'peak MiB':>11}{'rise MiB':>11}")
    for ph in rows:
        pk = f"{tr['peak'][ph] / MIB:11.0f}{max(0.0, tr['rise'][ph]) / MIB:11.0f}" if ph in tr["peak"] else ""
        print(f"    {ph:<12}{sb[ph]:10.3f} {fmt_s(se[ph])}{se[ph] / total_e:8.1%}{pk}")
    print(f"    {'train total':<12}{sb['total']:10.3f} {fmt_s(total_e)}{1:8.0%}"
          f"{max(tr['peak'].values(), default=0) / MIB:11.0f}")
    print(f"    {'evaluation':<12}{'':10} {fmt_s(ev['full'])}{'':8}{ev['peak'] / MIB:11.0f}"
          f"{max(0.0, ev['rise']) / MIB:11.0f}   (Run.evaluate('val'), once per epoch)")
    if w1 is not None:
        print(f"    one {B}-row block through the first layer alone (no grad): {w1:.3f} s -> d_step = "
              f"{sb['d_step'] / w1:.1f} such passes, g_step = {sb['g_step'] / w1:.1f} (fwd+bwd of fake, real "
              f"and gradient-penalty rows, double backward)")
    epoch = total_e + ev["full"]
    adv = sum(se.get(ph, 0.0) for ph in ("d_step", "g_step"))
    print(f"    epoch (train + evaluation): {epoch:.1f} s{' (extrapolated)' if not args.full_epoch else ''}; "
          + (f"d_step + g_step (everything touching the discriminator, and the model's backward) = "
             f"{adv / total_e:.0%} of training" if run.disc is not None else
             "no discriminator: g_step is only the model's backward and optimizer step"))
    print(f"    evaluation: Run.evaluate('val') {ev['full']:.3f} s (eval-mode forward + {ev['n_val_users']} "
          f"users with val items, all {I} items ranked); metrics.evaluate alone {ev['metrics']:.3f} s; "
          f"medians of {args.eval_runs}")
    print(f"    bare chunked U @ I.T + topk(50): all {U} users {ev['bare_all']:.3f} s, the same "
          f"{ev['n_val_users']} users {ev['bare_val']:.3f} s")
    print(f"    RATIO evaluation / bare (all users) = {ev['metrics'] / ev['bare_all']:.2f} (target <= 1.5); "
          f"same users {ev['metrics'] / ev['bare_val']:.2f}; incl. the forward "
          f"{ev['full'] / ev['bare_all']:.2f}")
    top = max([*tr["peak"].values(), ev["peak"]])
    print(f"    peak memory of this data set (max over phases and evaluation): {top / MIB:.0f} MiB "
          + ("process RSS (ru_maxrss)" if device.type != "cuda" else "CUDA allocated"))
    result = {"peak": top, "epoch": epoch, "train": total_e, "s_epoch": se,
              "d_share": se.get("d_step", 0.0) / total_e, "g_share": se.get("g_step", 0.0) / total_e}
    del run, counter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/epoch.py", description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("tiktok", "baby", "both"), default="both")
    ap.add_argument("--data-root", default="../shared/data",
                    help="folder holding tiktok/ and baby/ (relative: to the repository root)")
    ap.add_argument("--batches", type=int, default=5, help="timed batches (after 1 warm-up), default 5")
    ap.add_argument("--full-epoch", action="store_true", help="time whole epochs (Run.train_epoch)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs timed with --full-epoch, default 3")
    ap.add_argument("--eval-runs", type=int, default=3, help="evaluation repeats (median), default 3")
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--config", default=str(REPO / "configs" / "mmssl.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--compare-no-adversarial", action="store_true",
                    help="also run each data set with adversarial=false")
    ap.add_argument("--compare-disc-impl", action="store_true",
                    help="dense vs factored discriminator, interleaved batch by batch (instead of the phase table)")
    ap.add_argument("--scaling", default="", metavar="N,N,...",
                    help="dense vs factored on random catalogues of these item counts (same users), then exit")
    ap.add_argument("--scaling-users", type=int, default=4000, help="users of the --scaling catalogues")
    ap.add_argument("--feature-seed", type=int, default=0, help="seed of Baby's random features")
    ap.add_argument("--smoke-test", action="store_true", help="tiny synthetic data (300 x 200), seconds")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", DataWarning)   # cold items etc.: irrelevant to speed
    if args.smoke_test:
        args.batches, args.epochs, args.eval_runs = 2, 1, 1
    if min(args.batches, args.epochs, args.eval_runs) < 1:
        ap.error("--batches, --epochs and --eval-runs must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = Config.from_yaml(args.config, [*args.set, f"device={args.device}"])
    device = resolve_device(cfg.device)
    if args.scaling:
        try:
            sizes = [int(x) for x in args.scaling.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--scaling {args.scaling!r}: expected comma-separated item counts")
        if args.smoke_test:
            sizes, args.scaling_users = [s // 20 for s in sizes], 200
        disc_compare.scaling(sizes, args.scaling_users, cfg, device, PeakMemory(device), args.batches)
        return 0
    all_data = datasets(args)
    print(f"bench/epoch.py  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  device={device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"  threads={torch.get_num_threads()}  cpus={os.cpu_count()}  "
            f"loadavg={tuple(round(x, 2) for x in os.getloadavg())}"
          + (f"  overrides: {' '.join(args.set)}" if args.set else ""))
    if args.compare_disc_impl:
        for name, data in all_data.items():
            disc_compare.compare(name, data, cfg, device, PeakMemory(device), args.batches)
        return 0
    summary = []
    for name, data in all_data.items():
        res = bench_one(name, data, cfg, device, args, "config as given")
        summary.append((name, "as given", res))
        if args.compare_no_adversarial and cfg.adversarial:
            res = bench_one(name, data, cfg.replace(adversarial=False), device, args, "adversarial=false")
            summary.append((name, "adversarial=false", res))
    if len(summary) > 1:
        tag = "" if args.full_epoch else " (extrapolated)"
        print(f"\n=== summary: s/epoch{tag}, training + one evaluation  "
              f"loadavg={tuple(round(x, 2) for x in os.getloadavg())}")
        print(f"    {'data':<8}{'config':<20}{'train s':>10}{'epoch s':>10}{'d_step':>9}{'g_step':>9}"
              f"{'peak MiB':>10}")
        for name, label, r in summary:
            print(f"    {name:<8}{label:<20}{r['train']:10.1f}{r['epoch']:10.1f}{r['d_share']:9.0%}"
                  f"{r['g_share']:9.0%}{r['peak'] / MIB:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, prog="bench/epoch.py"))
