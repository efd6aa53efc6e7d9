"""Everything about living with Ray: connecting, failing fast, errors and logs.

* :func:`connect` joins a cluster (failing within seconds when nothing answers) or starts a local Ray.
* :func:`require_resources` fails at once where Ray would queue work that asks for more than the cluster
  has and wait indefinitely (users of data-mixing tools list "hangs" among their top complaints).
* :func:`rnb_errors_from_ray` re-raises our own ``RnbError`` from inside Ray tasks as itself.
* :func:`ordered_execution` and :func:`quiet_ray_logs` set Ray Data's ordering and keep Ray's progress
  noise off the console (everything stays in Ray's log files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from rnb_ray.errors import RnbError

# Workers load models from local paths only; never let a stray hub lookup hang a run.
_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """An explicit host:port must answer within seconds, and not be the dashboard's HTTP port.

    ray.init would otherwise retry for a long time, and pointed at the dashboard/job API port (8265, the
    address `ray job submit` takes) it waits for a GCS reply that never comes.
    """
    if address.startswith(("http://", "https://")):
        raise RnbError(
            f"{address} is an HTTP address (the Ray dashboard / job API), not a cluster address",
            fix="pass the GCS address host:6379 (or ray://host:10001) to --address, or run the job through "
                f"the job API: `ray job submit --address {address} -- python jobs/<stage>.py ...`",
        )
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RnbError(
            f"Ray address {address!r} is not of the form host:port",
            fix="pass e.g. --address 127.0.0.1:6379 (GCS), ray://host:10001, or 'auto'",
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            # A GCS (gRPC) answers this with a binary HTTP/2 frame; the dashboard answers "HTTP/1.x ...".
            sock.settimeout(timeout_s)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                reply = sock.recv(8)
            except OSError:
                reply = b""
    except OSError as e:
        raise RnbError(
            f"no Ray cluster answers at {address} ({e.strerror or e})",
            fix="start one with `ray start --head` (or cluster/local/start.sh) or fix --address",
        ) from e
    if reply.startswith(b"HTTP/"):
        raise RnbError(
            f"{address} answers HTTP: it is the Ray dashboard / job API (or another web server), "
            "not the cluster's GCS",
            fix=f"pass the GCS address (port 6379 by default) to --address, or submit through the job API: "
                f"`ray job submit --address http://{host}:{port} -- python jobs/<stage>.py ...`",
        )


def job_driver_node() -> str | None:
    """Inside a Ray job's driver: the node it runs on (its local paths are that node's), else None."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray's job supervisor for the driver
        return None
    from ray.util import get_node_ip_address

    return f"{socket.gethostname()} ({get_node_ip_address()})"


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
    # quiet: workers' output stays in Ray's log files, and the driver's "ray" logger shows warnings and errors
    # only (not "Started a local Ray instance"); errors raised by tasks still reach the caller as exceptions.
    kwargs: dict = {"log_to_driver": False, "logging_level": logging.WARNING} if quiet else {}
    if address:
        from ray.exceptions import AuthenticationError

        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, AuthenticationError) as e:
            # A wrong or missing token shows up here after Ray's retries, as a bare "Failed to connect".
            raise RnbError(
                f"could not join the Ray cluster at {address} ({str(e).strip().splitlines()[-1]})",
                fix="if the cluster uses token authentication, give this process its token (RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token), and check --address",
            ) from e
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def require_resources(*, cpus: float = 0, gpus: float = 0, what: str, gpu_fix: str | None = None) -> None:
    """Raise at once if the cluster can never satisfy ``cpus``/``gpus`` for ``what`` (``gpu_fix``: the
    advice when GPUs are missing; default: drop --use-gpu)."""
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
            fix=gpu_fix or "drop --use-gpu, or add GPU nodes to the cluster",
        )


def find_rnb_error(exc: BaseException) -> RnbError | None:
    """The RnbError raised inside a Ray task, unwrapped from Ray's exception wrappers (or None)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is RnbError:
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


@contextlib.contextmanager
def rnb_errors_from_ray() -> Iterator[None]:
    """Re-raise an RnbError that happened inside Ray tasks as itself (the CLI prints it cleanly)."""
    try:
        yield
    except Exception as e:
        if type(e) is RnbError:
            raise
        # Ray re-raises a task's error as RayTaskError(RnbError), a subclass carrying Ray's traceback text
        inner = find_rnb_error(e)
        if inner is not None:
            raise RnbError(inner.what, where=inner.where, fix=inner.fix) from e
        raise


@contextlib.contextmanager
def ordered_execution(quiet: bool = False) -> Iterator[None]:
    """Ray Data keeps block order while inside (deterministic sums, contiguous row-id ranges).

    ``quiet`` hides Ray Data's progress bars and per-execution log lines: a k-means iteration is a
    sub-second pass, and the one line per iteration we log says more.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    ctx.execution_options.preserve_order = True
    if quiet:
        ctx.enable_progress_bars = False
        data_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before
        data_log.setLevel(level)


def quiet_ray_logs() -> None:
    """Keep the console to our own progress lines: Ray Data's per-operator progress log and Tune's
    per-trial status tables are noise next to the results table (everything stays in Ray's log files)."""
    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
