"""Static checks for the security rules of issue 5: no shell strings, checkpoints loaded without pickle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "rnb_ray").rglob("*.py"), *(REPO / "jobs").glob("*.py")])


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node


def _name(call: ast.Call) -> str:
    f = call.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def test_no_shell_strings():
    """Processes are started from argument lists, never through a shell."""
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call)
            if name in ("os.system", "os.popen") or any(
                kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
                for kw in call.keywords
            ):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
    assert not bad, bad


def test_torch_load_is_weights_only():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            if _name(call) == "torch.load" and not any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in call.keywords
            ):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_checkpoints_are_not_unpickled():
    """Checkpoint and run-directory state is read with torch.load(weights_only=True) or JSON, never
    pickle.load(s): a checkpoint directory must not be able to run code in the training workers."""
    bad = []
    for path in sorted((REPO / "rnb_ray" / "balance").rglob("*.py")):
        for call in _calls(path):
            if _name(call) in ("pickle.load", "pickle.loads"):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not bad, bad
