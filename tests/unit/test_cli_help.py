"""Every `rnb` command prints its help (argparse %-formats help strings: one stray "%" crashed it)."""

from __future__ import annotations

import pytest

from rnb_ray.cli import COMMAND_MODULES, build_parser, main


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_every_command_group_registers_at_least_one_command():
    assert len(_commands()) >= len(COMMAND_MODULES)


@pytest.mark.parametrize("command", _commands())
def test_help_prints_and_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rnb {command}")
    if command in ("regroup", "assign", "train", "sweep", "run"):
        assert "--address" in out and "--config" in out
