"""The `timemae` dispatcher hands subcommands with their own parser their arguments untouched."""

from __future__ import annotations

import pytest

from launch.cli import main


@pytest.mark.parametrize("command, usage", [
    ("pretrain", "timemae pretrain"), ("export", "timemae export"), ("evaluate", "timemae evaluate"),
])
def test_leading_options_reach_the_subcommand(command: str, usage: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert usage in capsys.readouterr().out


def test_pretrain_single_process_flag_first_is_accepted(tmp_path, capsys) -> None:
    # `--single-process` before the config used to be rejected by the top-level parser;
    # now the pretrain parser sees it and reports the missing config file instead.
    rc = main(["pretrain", "--single-process", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.yaml" in err and "unrecognized" not in err
