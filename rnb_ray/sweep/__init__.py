"""Sweep the domain granularity k (and λ, strategy) with Ray Tune."""
