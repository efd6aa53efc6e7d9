"""rnb-ray: R&B (Regroup & Balance, arXiv 2505.00358) data mixing, orchestrated on Ray.

The public API for R&B in your own training loop is ``rnb_ray.api`` (also importable from here:
``from rnb_ray import GradientCapture, DomainMixer, domain_sampler``); the Hugging Face ``Trainer``
integration is ``rnb_ray.integrations.hf``.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("DomainMixer", "DomainSampler", "GradientCapture", "causal_lm_mask", "domain_names", "domain_sampler",
        "load_state", "save_state")


def __getattr__(name: str) -> Any:
    if name in _API:  # imported on first use: `import rnb_ray` (the CLI) stays free of torch
        from rnb_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'rnb_ray' has no attribute {name!r}")


__all__ = ["__version__", *_API]
