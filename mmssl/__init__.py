"""MMSSL: Multi-Modal Self-Supervised Learning for Recommendation (WWW 2023).

Pure PyTorch: this package never imports ray. Entry points:
``mmssl.train.fit`` (API), ``python -m mmssl.train`` (CLI),
``python -m mmssl.synthetic`` (planted-signal data generator).
"""
from mmssl.errors import ConfigError, DataError, DivergedError, MMSSLError

__all__ = ["ConfigError", "DataError", "DivergedError", "MMSSLError"]
