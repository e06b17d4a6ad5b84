"""A tiny search-space file for the fault and cluster tests: two searched weights, no ASHA
stop before the last epoch (grace = epochs), checkpoints every 2 epochs."""
from __future__ import annotations


def tiny_space(*, data: str = "synthetic:150x100", epochs: int = 4, num_samples: int = 4, embed_dim: int = 8,
               final_seeds: str = "0", max_failures: int | None = None) -> str:
    """The YAML text of a search over ``cl_weight`` and ``l2_weight``, 2 trials at a time, 1 CPU each."""
    failures = f", max_failures: {max_failures}" if max_failures is not None else ""
    return f"""
data: "{data}"
fixed: {{epochs: {epochs}, patience: 0, embed_dim: {embed_dim}, batch_size: 128, eval_chunk: 512}}
search:
  cl_weight: {{dist: loguniform, low: 1.0e-3, high: 1.0}}
  l2_weight: {{dist: loguniform, low: 1.0e-7, high: 1.0e-3}}
budget: {{num_samples: {num_samples}, max_concurrent: 2, cpus_per_trial: 1, gpus_per_trial: 0, checkpoint_every: 2{failures}}}
asha: {{grace_period: {epochs}, reduction_factor: 2}}
final: {{seeds: {final_seeds}}}
tpe: {{n_startup_trials: 2}}
"""
