"""Fault tolerance on the real multi-node cluster: a lost node during training and during embedding, a
killed mixer actor. Faults are injected by PID (SIGKILL), like a machine or process dying; the lost worker
node is brought back with cluster/local/start.sh, as an autoscaler would replace it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[3]
MODULES = ["asyncio", "decimal", "email", "logging"]


def _wait_for(what: str, cond, cluster, sid: str, timeout: float = 300, every: float = 0.25):
    """Poll ``cond()`` until truthy; fail at once if the job ended first (the fault came too late)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        status = cluster.api(f"/api/jobs/{sid}")["status"]
        if status != "RUNNING" and status != "PENDING":
            logs = cluster.api(f"/api/jobs/{sid}/logs")["logs"]
            pytest.fail(f"job {sid} is {status} before {what}:\n{logs[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def _actors(cluster, job_id: str) -> list[dict]:
    out = cluster.run([str(Path(os.sys.executable).parent / "ray"), "list", "actors", "--address",
                       cluster.address, "--filter", f"job_id={job_id}", "--detail", "--format", "json",
                       "--limit", "10000"])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.lstrip().startswith("[") else []  # else "No resource ..."


def _worker_node_id(cluster) -> str:
    (worker,) = [n for n in cluster.alive_nodes() if not n["is_head_node"]]
    return worker["node_id"]


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def regrouped(sample_corpus, tmp_path):
    """A regroup-style output with four domains (stdlib modules), domain only in the path."""
    out = tmp_path / "regrouped"
    table = pq.read_table(sample_corpus)
    for i, name in enumerate(MODULES):
        part = out / "data" / f"domain={i}"
        part.mkdir(parents=True)
        pq.write_table(table.filter(pc.equal(table["source"], name)), part / "part-0.parquet", row_group_size=50)
    (out / "domains.json").write_text(json.dumps({"k": 4, "sizes": {str(i): 1 for i in range(4)}}))
    return out


def test_training_survives_a_killed_mixer_and_a_lost_node(local_cluster, regrouped, tmp_path):
    """`rnb train` (2 Ray Train workers, checkpoints, max_failures) loses the mixer actor, then the node
    running its training workers; it finishes with a continuous mixture trajectory."""
    run = tmp_path / "run"
    steps, k, every = 600, 5, 50
    sid = f"rnb-train-ft-{tmp_path.name}"
    local_cluster.submit_nowait(
        sid, "python", "jobs/train.py", "--data", str(regrouped), "--output", str(run), "--strategy", "rnb",
        "--steps", str(steps), "--update-every", str(k), "--checkpoint-every", str(every), "--max-failures", "3",
        "--eval-every", "200", "--batch-size", "16", "--seq-len", "64", "--n-layer", "1", "--n-embd", "32",
        "--n-head", "2", "--tokenizer", "byte", "--workers", "2", working_dir=REPO)
    job_id = _wait_for("the job gets an id", lambda: local_cluster.api(f"/api/jobs/{sid}").get("job_id"),
                       local_cluster, sid)

    # 1) Kill the mixer actor's process after a few rounds: Ray restarts it, it reloads its persisted state.
    _wait_for("3 mixing rounds", lambda: len(_rows(run)) >= 3, local_cluster, sid)
    (mixer,) = [a for a in _actors(local_cluster, job_id) if a["class_name"] == "Mixer"]
    os.kill(mixer["pid"], 9)
    restarted = _wait_for(
        "the mixer to restart",
        lambda: [a for a in _actors(local_cluster, job_id)
                 if a["class_name"] == "Mixer" and a["state"] == "ALIVE" and a["num_restarts"] >= 1],
        local_cluster, sid)
    assert restarted[0]["pid"] != mixer["pid"]

    # 2) After a checkpoint, lose the worker node that runs the training workers (its raylet, by PID).
    lost = _worker_node_id(local_cluster)
    _wait_for("a checkpoint", lambda: list((run / "checkpoints").glob("checkpoint_2*")), local_cluster, sid)
    on_lost = [a for a in _actors(local_cluster, job_id)
               if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE" and a["node_id"] == lost]
    assert on_lost, "no training worker ran on the worker node"
    local_cluster.kill_raylet("w1")
    time.sleep(1)
    local_cluster.restart_dead_workers()

    info = local_cluster.wait_job(sid, timeout=600)
    assert info["status"] == "SUCCEEDED", info["logs"][-3000:]

    # Ray Train replaced the lost workers (a second worker group) ...
    actors = _actors(local_cluster, job_id)
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(workers) >= 4
    assert all(a["state"] == "DEAD" for a in workers if a["node_id"] == lost)
    # ... and the mixture trajectory is continuous: every round once, in order, up to the last step.
    traj = json.loads((run / "mixture.json").read_text())["trajectory"]
    assert [t["round"] for t in traj] == list(range(-1, steps // k))
    assert [t["step"] for t in traj] == [k * (r + 1) for r in range(-1, steps // k)]
    rows = _rows(run)
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # no step lost or logged twice
    rounds = [r["round"] for r in rows if r["step"] % k == 0]
    assert rounds == sorted(set(rounds))
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == steps


def test_regroup_keeps_every_document_once_when_a_node_dies_during_embedding(local_cluster, sample_corpus,
                                                                             tmp_path):
    """`ray job submit -- python jobs/regroup.py` on both nodes; the worker node dies while its embedding
    actor runs; Ray Data redoes the lost work and the output holds every document exactly once."""
    corpus = tmp_path / "corpus.parquet"
    table = pq.read_table(sample_corpus).slice(0, 400)
    pq.write_table(table, corpus, row_group_size=100)
    out = tmp_path / "regrouped"
    sid = f"rnb-regroup-ft-{tmp_path.name}"
    worker = _worker_node_id(local_cluster)
    local_cluster.submit_nowait(sid, "python", "jobs/regroup.py", "--input", str(corpus), "--k", "3",
                                "--output", str(out), "--embed-actors", "2", "--embed-batch-size", "8",
                                "--max-iter", "20", working_dir=REPO)
    job_id = _wait_for("the job gets an id", lambda: local_cluster.api(f"/api/jobs/{sid}").get("job_id"),
                       local_cluster, sid)
    embedders = _wait_for(
        "an embedding actor on the worker node",
        lambda: [a for a in _actors(local_cluster, job_id)
                 if "Embedder" in a["class_name"] and a["state"] == "ALIVE" and a["node_id"] == worker],
        local_cluster, sid, every=0.5)
    local_cluster.kill_raylet("w1")
    time.sleep(1)
    local_cluster.restart_dead_workers()

    info = local_cluster.wait_job(sid, timeout=600)
    assert info["status"] == "SUCCEEDED", info["logs"][-3000:]
    assert not out.with_name(out.name + ".tmp").exists()
    ids = ds.dataset(out / "data", format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == table.num_rows and set(ids) == set(table["id"].to_pylist())  # each exactly once
    assert json.loads((out / "domains.json").read_text())["n_documents"] == table.num_rows
    after = {a["actor_id"]: a for a in _actors(local_cluster, job_id)}
    assert all(after[a["actor_id"]]["state"] != "ALIVE" or after[a["actor_id"]]["num_restarts"] >= 1
               for a in embedders)  # the embedding actor on the lost node did die
