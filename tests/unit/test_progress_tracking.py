"""The training progress line and the experiment trackers (TensorBoard, MLflow) on real rows, without Ray."""

from __future__ import annotations

import io
import json

import pytest

from rnb_ray.balance.costs import mixing_seconds, step_seconds
from rnb_ray.balance.progress import ProgressPrinter, format_progress
from rnb_ray.balance.tracking import (
    Tracking,
    check_tracking,
    mlflow_client,
    parse_track,
    scalars,
    tokens_per_s,
)
from rnb_ray.cli import main
from rnb_ray.errors import RnbError

DOMAINS = ["0", "1", "2"]


def _row(step: int, eval_loss: float | None = None) -> dict:
    return {"step": step, "round": step // 5, "train_loss": 4.0 - step / 10, "eval_loss": eval_loss,
            "eval_loss_by_domain": None if eval_loss is None else {"0": eval_loss - 0.1, "1": eval_loss, "2": eval_loss + 0.1},
            "mixture": [0.2, 0.5, 0.3], "lr": 1e-3, "tokens": 1000 * step, "seconds_train": step * 0.5,
            "seconds_capture": 0.0, "seconds_mixer": 0.0}


def test_format_progress_shows_step_losses_throughput_eta_and_top_weights():
    line = format_progress(_row(10, 3.25), steps=40, domains=DOMAINS, tok_s=2000.0, eta_s=75, top=2)
    assert line == "step 10/40 | train 3.000 | eval 3.250 | 2,000 tok/s | ETA 1m15s | p 1:0.50 2:0.30"
    assert tokens_per_s(_row(5), _row(10)) == pytest.approx(2000.0)  # 5000 tokens over 2.5 s of steps
    assert tokens_per_s(None, _row(10)) == pytest.approx(2000.0)  # the average since step 0
    assert tokens_per_s(_row(10), _row(10)) is None


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_printer_plain_lines_off_a_terminal_and_one_rewritten_line_on_one():
    rows = iter([_row(5), _row(5), _row(10, 3.1), None, _row(15)])
    out = io.StringIO()
    p = ProgressPrinter(lambda: next(rows), steps=20, domains=DOMAINS, stream=out)
    shown = [p.poll_once() for _ in range(5)]
    assert [s is not None for s in shown] == [True, False, True, False, True]  # a repeated step is not reprinted
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("rnb train: step 5/20")
    assert "eval 3.100" in lines[2]  # the last evaluation stays on the line until the next one
    assert "2,000 tok/s" in lines[1] and "ETA" in lines[2]

    def boom():
        raise TimeoutError("mixer restarting")

    assert ProgressPrinter(boom, steps=1, domains=DOMAINS, stream=out).poll_once() is None  # not fatal

    tty = _Tty()
    rows2 = iter([_row(5), _row(10)])
    q = ProgressPrinter(lambda: next(rows2, None), steps=10, domains=DOMAINS, stream=tty)
    assert q.interval == 1.0
    q.poll_once()
    q.poll_once()
    q.stop()
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_tensorboard_and_mlflow_receive_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names, root = check_tracking("tensorboard,mlflow", None, tmp_path / "run")
    assert names == ("tensorboard", "mlflow") and root == tmp_path / "run" / "tracking"
    t = Tracking(names, root, DOMAINS, "run", {"lam": 3.0})
    for r in (_row(5), _row(10, 3.2), _row(15)):
        t.log(r)
    t.close()
    assert set(scalars(_row(10, 3.2), DOMAINS, 1.0)) == {
        "loss/train", "loss/eval", "eval_loss/0", "eval_loss/1", "eval_loss/2", "throughput/tokens_per_s", "lr",
        "mixture/0", "mixture/1", "mixture/2"}

    acc = EventAccumulator(str(root / "tensorboard")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/eval", "eval_loss/2", "throughput/tokens_per_s", "mixture/0", "mixture/1", "mixture/2"} <= tags
    assert [e.step for e in acc.Scalars("loss/train")] == [5, 10, 15]
    assert [round(e.value, 6) for e in acc.Scalars("mixture/1")] == [0.5] * 3
    assert [e.step for e in acc.Scalars("loss/eval")] == [10]

    client = mlflow_client(root)
    run_id = json.loads((root / "mlflow-run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [5, 10, 15]
    assert client.get_metric_history(run_id, "eval_loss/0")[0].value == pytest.approx(3.1)
    run = client.get_run(run_id)
    assert run.data.params["lam"] == "3.0" and run.info.status == "FINISHED"


def test_bad_tracking_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(RnbError, match="unknown tracker 'wandb'"):
        parse_track("tensorboard,wandb")
    assert parse_track(" TensorBoard , none ") == ("tensorboard",) and parse_track(None) == ()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RnbError, match="tracking directory .* is not writable"):
        check_tracking("tensorboard", str(blocker / "tb"), tmp_path / "run")
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"text": "hello", "domain": 0}) + "\n")
    code = main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--track", "mlflow",
                 "--tracking-dir", str(blocker / "ml")])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_step_and_mixing_seconds_count_the_workers_round_reduction():
    row = _row(10) | {"seconds_capture": 0.4, "seconds_reduce": 0.6, "seconds_mixer": 0.1, "extra_seconds": 2.0}
    assert step_seconds(row) == pytest.approx(5.0 + 0.4 + 0.6 + 0.1)  # extra evaluation passes are not steps
    assert mixing_seconds(row) == pytest.approx(0.4 + 0.6 + 0.1 + 2.0)
    # throughput divides by the same step time: 10,000 tokens over 6.1 s
    assert tokens_per_s(None, row) == pytest.approx(10_000 / 6.1)
