"""rnb-ray: R&B (Regroup & Balance, arXiv 2505.00358) data mixing, orchestrated on Ray."""

__version__ = "0.1.0"
