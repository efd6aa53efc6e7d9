"""Connecting to Ray and failing fast instead of waiting forever for resources.

Ray queues work that asks for more than the cluster has and waits indefinitely; users of data-mixing
tools list "hangs" among their top complaints. Everything that starts Ray work checks first.
"""

from __future__ import annotations

import os
import socket

from rnb_ray.errors import RnbError

# Workers load models from local paths only; never let a stray hub lookup hang a run.
_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """An explicit host:port must answer within seconds; ray.init would otherwise retry for a long time."""
    target = address
    for prefix in ("ray://", "http://", "https://"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RnbError(
            f"Ray address {address!r} is not of the form host:port",
            fix="pass e.g. --address 127.0.0.1:6379 (GCS), ray://host:10001, or 'auto'",
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RnbError(
            f"no Ray cluster answers at {address} ({e.strerror or e})",
            fix="start one with `ray start --head` (or cluster/local/start.sh) or fix --address",
        ) from e


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    for k, v in _WORKER_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    kwargs: dict = {"log_to_driver": not quiet} if quiet else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def require_resources(*, cpus: float = 0, gpus: float = 0, what: str) -> None:
    """Raise at once if the cluster can never satisfy ``cpus``/``gpus`` for ``what``."""
    import ray

    total = ray.cluster_resources()
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if cpus > have_cpu:
        raise RnbError(
            f"{what} needs {cpus:g} CPUs but the Ray cluster has {have_cpu:g}",
            fix="lower --workers / actor counts, or add nodes to the cluster",
        )
    if gpus > have_gpu:
        raise RnbError(
            f"{what} needs {gpus:g} GPUs but the Ray cluster has {have_gpu:g}",
            fix="drop --use-gpu, or add GPU nodes to the cluster",
        )
