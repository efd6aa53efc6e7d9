"""A real multi-node Ray cluster on this machine, started with cluster/local/start.sh.

The other integration tests share an in-process ``ray.init`` (``ray_session``); a pytest process can
only be connected to one Ray at a time, so everything here drives the cluster from subprocesses:
``ray job submit``, ``ray list``, ``python -c`` with ``RAY_ADDRESS``. The cluster gets its own state dir,
its own ports and its own token file, so it never clashes with another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "cluster" / "local"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_port_base(nodes: int) -> int:
    """A base below the ephemeral range whose per-node ports (see common.sh) are all free."""
    candidates = list(range(20000, 30000, 500))
    random.Random(os.getpid()).shuffle(candidates)
    for base in candidates:
        fixed = [base + 10 * i + k for i in range(nodes) for k in range(6)]
        workers = range(base + 100, base + 100 * (nodes + 1))
        if all(_port_free(p) for p in fixed) and all(_port_free(p) for p in workers):
            return base
    raise RuntimeError("no free port range for the local test cluster")


@dataclass
class LocalCluster:
    """Handle on a cluster started by cluster/local/start.sh; every call is a subprocess."""

    dir: Path
    workers: int = 1
    head_cpus: int = 1
    worker_cpus: int = 2
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    client_port: int = field(default_factory=_free_port)
    port_base: int = 0
    token_path: Path = field(init=False)

    def __post_init__(self) -> None:
        if not self.port_base:
            self.port_base = _free_port_base(self.workers + 1)
        self.token_path = self.dir / "auth_token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_path.read_text()

    def env(self, **overrides: str | None) -> dict[str, str]:
        """Environment for a client of this cluster (token on, RAY_ADDRESS set); None removes a key."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RNB_RAY=str(BIN / "ray"),
            RNB_CLUSTER_DIR=str(self.dir),
            RNB_GCS_PORT=str(self.gcs_port),
            RNB_DASHBOARD_PORT=str(self.dashboard_port),
            RNB_CLIENT_PORT=str(self.client_port),
            RNB_PORT_BASE=str(self.port_base),
            RNB_STOP_GRACE_S="3",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_ADDRESS=self.address,
            RAY_DEDUP_LOGS="0",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        for k, v in overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def run(self, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=env or self.env(), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout
        )

    def script(self, name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return self.run([str(SCRIPTS / name), *args], timeout=timeout)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        out = self.script(
            "start.sh", "--workers", str(self.workers), "--head-cpus", str(self.head_cpus),
            "--worker-cpus", str(self.worker_cpus),
        )
        if out.returncode != 0:
            raise RuntimeError(f"cluster/local/start.sh failed:\n{out.stdout}\n{out.stderr}")

    def stop(self) -> subprocess.CompletedProcess:
        return self.script("stop.sh")

    def submit(self, *entrypoint: str, runtime_env: dict | None = None, working_dir: Path | None = None,
               env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the job) against the dashboard's job API."""
        args = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url]
        # Like a user on a laptop: only the job API address, no RAY_ADDRESS pointing at the GCS.
        env = env or self.env()
        env.pop("RAY_ADDRESS", None)
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        if runtime_env is not None:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        return self.run([*args, "--", *entrypoint], env=env, timeout=timeout)

    def submit_nowait(self, submission_id: str, *entrypoint: str, working_dir: Path | None = None) -> None:
        args = [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", submission_id,
                "--address", self.dashboard_url]
        if working_dir is not None:
            args += ["--working-dir", str(working_dir)]
        env = self.env()
        env.pop("RAY_ADDRESS", None)
        out = self.run([*args, "--", *entrypoint], env=env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr

    def api(self, path: str) -> dict:
        """GET on the dashboard's HTTP API with the token."""
        r = requests.get(f"{self.dashboard_url}{path}", timeout=30,
                         headers={"Authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()

    def wait_job(self, submission_id: str, timeout: float = 400) -> dict:
        """Poll the job API until the job ends; returns its info (status, job_id, ...) plus its logs."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.api(f"/api/jobs/{submission_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                info["logs"] = self.api(f"/api/jobs/{submission_id}/logs")["logs"]
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {submission_id} still {info['status']} after {timeout} s")
            time.sleep(1)

    def tasks(self, job_id: str) -> list[dict]:
        """Every task (and actor task) of a Ray job, with the node it ran on."""
        out = self.run([str(BIN / "ray"), "list", "tasks", "--address", self.address, "--filter",
                        f"job_id={job_id}", "--detail", "--format", "json", "--limit", "10000"])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if out.stdout.lstrip().startswith("[") else []  # else "No resource ..."

    def kill_raylet(self, node: str) -> int:
        """SIGKILL the raylet of ``node`` (its workers and agents die with it), like a lost machine."""
        pid = self.raylet_pid(node)
        os.kill(pid, 9)
        return pid

    def restart_dead_workers(self) -> subprocess.CompletedProcess:
        """start.sh on a running cluster restarts the worker nodes whose raylet died."""
        out = self.script("start.sh")
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    def nodes(self) -> list[dict]:
        out = self.run([str(BIN / "ray"), "list", "nodes", "--address", self.address, "--format", "json",
                        "--detail"])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def raylet_pid(self, node: str) -> int:
        """PID of the raylet of ``node`` ("head" or "w1", "w2", ...), found by its temp dir."""
        marker = f"{self.dir}/{node}/"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet") and any(marker.encode() in a for a in argv):
                return int(proc.name)
        raise LookupError(f"no raylet running for node {node} of {self.dir}")


def _new_cluster(**kwargs) -> LocalCluster:
    # Short path: Ray puts unix sockets under the temp dir and their paths are limited to ~107 bytes.
    return LocalCluster(dir=Path(tempfile.mkdtemp(prefix="rnbc-", dir="/tmp")), **kwargs)


@pytest.fixture(scope="package")
def local_cluster():
    """Head (1 CPU) + one worker node (2 CPUs, resource ``worker_node``), token auth on. Package scope:
    stopped after this package's last test, so it does not idle beside the other integration tests."""
    cluster = _new_cluster(workers=1, head_cpus=1, worker_cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture
def make_cluster():
    """Factory for extra clusters (not started); each is stopped and removed after the test."""
    made: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        made.append(_new_cluster(**kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
