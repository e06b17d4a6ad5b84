"""Shared fixtures: tiny seeded synthetic data and a small, fast config."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmssl.config import Config
from mmssl.synthetic import make_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """120 users, 80 items, three modalities of different widths."""
    return make_dataset(n_users=120, n_items=80, seed=1)


@pytest.fixture
def small_cfg():
    return Config(embed_dim=16, n_heads=4, batch_size=32, epochs=2, patience=0, topk_rate=0.05,
                  device="cpu", seed=7)


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray for one test module: ``tune.runner.ray_session`` (2 CPUs, a short
    temp dir of its own, no dashboard; shut down and removed after the module)."""
    from tune.runner import ray_session

    with ray_session(num_cpus=2):
        yield
