"""The local multi-node cluster: scripts, token auth, job submission, cross-node scheduling, bad addresses.

All against a real cluster started by cluster/local/start.sh (see conftest.py), driven by subprocesses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket in LISTEN state on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(hex_ip[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a killed process stays a zombie until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- the scripts -------------------------------------------------------------------------------------


def test_nodes_have_their_own_cpus_resources_and_temp_dirs(local_cluster):
    nodes = local_cluster.alive_nodes()
    assert len(nodes) == 2
    head = next(n for n in nodes if n["is_head_node"])
    worker = next(n for n in nodes if not n["is_head_node"])
    assert head["resources_total"]["CPU"] == 1
    assert worker["resources_total"]["CPU"] == 2
    assert worker["resources_total"]["worker_node"] == 1
    assert "worker_node" not in head["resources_total"]
    for node in ("head", "w1"):
        logs = local_cluster.dir / node / "session_latest" / "logs"
        assert (logs / "raylet.out").is_file(), f"{node} has no temp dir of its own"
    assert local_cluster.raylet_pid("head") != local_cluster.raylet_pid("w1")


def test_dashboard_listens_on_loopback_only(local_cluster):
    assert _listen_addresses(local_cluster.dashboard_port) == {"127.0.0.1"}


def test_start_twice_is_a_no_op(local_cluster):
    before = {n["node_id"] for n in local_cluster.alive_nodes()}
    out = local_cluster.script("start.sh")
    assert out.returncode == 0, out.stderr
    assert "already running" in out.stdout
    assert {n["node_id"] for n in local_cluster.alive_nodes()} == before


def test_status_script_reports_the_cluster(local_cluster):
    # `ray status` reads the autoscaler's resource view, which trails node registration by a few
    # seconds on a loaded machine: poll it (the nodes themselves are checked in the test above).
    deadline = time.monotonic() + 60
    while True:
        out = local_cluster.script("status.sh")
        assert out.returncode == 0, out.stderr
        assert f"RAY_ADDRESS={local_cluster.address}" in out.stdout
        if "/3.0 CPU" in out.stdout or time.monotonic() > deadline:  # head 1 + worker node 2
            break
        time.sleep(2)
    assert "/3.0 CPU" in out.stdout, out.stdout


def test_stop_touches_only_its_own_cluster(local_cluster, make_cluster):
    """A second cluster on the same machine is stopped; the session's cluster keeps running."""
    other = make_cluster(workers=0, head_cpus=1)
    try:
        other.start()
        assert other.alive_nodes()
        pid = other.raylet_pid("head")
        out = other.stop()
        assert out.returncode == 0, out.stderr
        assert "stopped" in out.stdout
        assert not _running(pid)
        with pytest.raises(LookupError):
            other.raylet_pid("head")
        assert other.script("status.sh").returncode == 1
        # stop twice: says so, still exit 0
        again = other.stop()
        assert again.returncode == 0 and "not running" in again.stdout
    finally:
        other.stop()
    assert len(local_cluster.alive_nodes()) == 2


# --- token authentication ----------------------------------------------------------------------------


def test_job_api_refuses_requests_without_the_token(local_cluster):
    url = f"{local_cluster.dashboard_url}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10)
    assert wrong.status_code == 403
    right = requests.get(url, headers={"Authorization": f"Bearer {local_cluster.token}"}, timeout=10)
    assert right.status_code == 200


def test_job_submit_without_the_token_is_refused(local_cluster, tmp_path):
    marker = tmp_path / "ran"
    entry = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"]
    # A client with no token at all (no env, no file, auth off on its side) sends no Authorization header.
    no_token = local_cluster.env(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=None, RAY_ADDRESS=None,
                                 HOME=str(tmp_path))
    out = local_cluster.submit(*entry, env=no_token, timeout=120)
    assert out.returncode != 0
    assert "Unauthorized" in out.stdout + out.stderr
    wrong = local_cluster.env(RAY_AUTH_TOKEN="0" * 64)
    out = local_cluster.submit(*entry, env=wrong, timeout=120)
    assert out.returncode != 0
    assert "Invalid authentication token" in out.stdout + out.stderr
    assert not marker.exists()
    # ... and with the token the very same job runs.
    out = local_cluster.submit(*entry, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert marker.read_text() == "x"


def test_driver_with_a_wrong_token_cannot_join(local_cluster):
    code = (f"from rnb_ray.ray_env import connect; connect({local_cluster.address!r}); print('JOINED')")
    out = local_cluster.run([sys.executable, "-c", code], env=local_cluster.env(RAY_AUTH_TOKEN="0" * 64),
                            timeout=120)
    assert out.returncode != 0
    assert "JOINED" not in out.stdout
    assert f"could not join the Ray cluster at {local_cluster.address}" in out.stderr
    assert "RAY_AUTH_TOKEN" in out.stderr  # says how to fix it


# --- jobs across nodes -------------------------------------------------------------------------------

_WHERE = textwrap.dedent(
    """
    import json, ray
    ray.init()
    @ray.remote(num_cpus=1, resources={"worker_node": 1})
    def where():
        return ray.get_runtime_context().get_node_id()
    print("RESULT", json.dumps({"driver": ray.get_runtime_context().get_node_id(),
                                 "task": ray.get(where.remote())}))
    """
)


def test_submitted_job_schedules_work_on_the_worker_node(local_cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "where.py").write_text(_WHERE)
    out = local_cluster.submit("python", "where.py", working_dir=job_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    ids = json.loads(line.removeprefix("RESULT "))
    nodes = {n["node_id"]: n for n in local_cluster.alive_nodes()}
    assert nodes[ids["driver"]]["is_head_node"]  # job drivers run on the head
    assert not nodes[ids["task"]]["is_head_node"]  # the task went to the other node
    assert "worker_node" in nodes[ids["task"]]["resources_total"]


# --- bad addresses -----------------------------------------------------------------------------------


def test_connect_to_an_address_where_nothing_listens_fails_fast():
    port = _free_port()
    code = f"from rnb_ray.ray_env import connect; connect('127.0.0.1:{port}')"
    # A hang would hit the timeout and fail the test; Ray alone retries for far longer than this.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode != 0
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in out.stderr


def test_rnb_cli_with_a_dead_address_exits_cleanly(tmp_path):
    port = _free_port()
    out = subprocess.run([str(Path(sys.executable).parent / "rnb"), "regroup", "--address", f"127.0.0.1:{port}",
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    assert f"rnb regroup: error: no Ray cluster answers at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_connect_to_the_dashboard_port_says_it_is_the_job_api(local_cluster):
    """The job API address (what `ray job submit` takes) given as a cluster address: told at once."""
    for address in (f"127.0.0.1:{local_cluster.dashboard_port}", local_cluster.dashboard_url):
        code = f"from rnb_ray.ray_env import connect; connect({address!r})"
        out = local_cluster.run([sys.executable, "-c", code], env=local_cluster.env(RAY_ADDRESS=None), timeout=60)
        assert out.returncode != 0
        assert "Ray dashboard / job API" in out.stderr


def test_connect_joins_the_cluster_by_address(local_cluster):
    code = (
        "import ray; from rnb_ray.ray_env import connect, require_resources; "
        f"connect({local_cluster.address!r}); require_resources(cpus=3, what='test'); "
        "print('CPUS', ray.cluster_resources()['CPU'])"
    )
    out = local_cluster.run([sys.executable, "-c", code], env=local_cluster.env(RAY_ADDRESS=None))
    assert out.returncode == 0, out.stderr
    assert "CPUS 3.0" in out.stdout


# --- rnb jobs on the cluster -------------------------------------------------------------------------


# Regroup and train jobs across nodes, with faults: test_faults.py.


def test_job_with_a_path_the_cluster_cannot_see_names_path_and_node(local_cluster, tmp_path):
    missing = tmp_path / "not-on-the-cluster" / "corpus.parquet"
    out = local_cluster.submit("python", "jobs/regroup.py", "--input", str(missing), "--k", "3",
                               "--output", str(tmp_path / "out"), working_dir=REPO, timeout=180)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    line = next(ln for ln in text.splitlines() if ln.startswith("rnb regroup: error:"))
    assert str(missing) in line
    assert "Ray job driver on node" in line
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()  # nothing written
