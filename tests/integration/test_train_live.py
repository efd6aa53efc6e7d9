"""`rnb train` on real Ray Train with the console progress line and `--track tensorboard,mlflow` (one small run),
reading the new regroup layout (data/domain-<id>/ with the domain column in the files)."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq

from rnb_ray.balance.tracking import mlflow_client
from rnb_ray.cli import main
from rnb_ray.outputs import domain_dir

MODULES = ["asyncio", "decimal", "email"]


def test_progress_lines_and_trackers_during_a_real_run(ray_session, sample_corpus, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    regrouped = tmp_path / "regrouped"
    table = pq.read_table(sample_corpus)
    for i, name in enumerate(MODULES):
        part = regrouped / "data" / domain_dir(i)
        part.mkdir(parents=True)
        t = table.filter(pc.equal(table["source"], name))
        pq.write_table(t.append_column("domain", pc.cast(pc.multiply(pc.cast(pc.is_valid(t["text"]), "int64"), i),
                                                         "int64")), part / "part-0.parquet")
    (regrouped / "domains.json").write_text(json.dumps({"k": 3, "sizes": {str(i): 1 for i in range(3)}}))
    run = tmp_path / "run"
    code = main(["train", "--data", str(regrouped), "--output", str(run), "--steps", "20", "--log-every", "5",
                 "--eval-every", "10", "--update-every", "5", "--workers", "1", "--batch-size", "8", "--seq-len", "64",
                 "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--tokenizer", "byte",
                 "--track", "tensorboard,mlflow"])
    out, err = capsys.readouterr()
    assert code == 0
    assert json.loads(out)["steps"] == 20  # stdout: only the final JSON
    progress = [line for line in err.splitlines() if line.startswith("rnb train: step ")]
    assert progress and progress[-1].startswith("rnb train: step 20/20 | train ")
    assert " tok/s | ETA " in progress[-1] and " | p " in progress[-1]
    assert "Traceback" not in err

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tracking" / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [r["step"] for r in rows]
    assert {f"mixture/{d}" for d in range(3)} | {f"eval_loss/{d}" for d in range(3)} <= set(acc.Tags()["scalars"])
    client = mlflow_client(run / "tracking")
    run_id = json.loads((run / "tracking" / "mlflow-run.json").read_text())["run_id"]
    evals = client.get_metric_history(run_id, "loss/eval")
    assert [m.step for m in evals] == [r["step"] for r in rows if r["eval_loss"] is not None]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "tracking_error" not in json.loads((run / "result.json").read_text())
