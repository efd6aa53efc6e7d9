"""Integrations of the public API (``rnb_ray.api``) with training libraries."""
