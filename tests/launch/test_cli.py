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


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys) -> None:
    import yaml

    from data_pipeline.typedconfig import to_dict
    from launch.cli import REPO_ROOT
    from timemae_dist.train.config import load_pretrain_config

    over = [f"data.store={tmp_path / 'none'}", f"run.storage_path={tmp_path}", "run.name=x", "trainer.num_workers=2"]
    rc = main(["pretrain", str(REPO_ROOT / "configs/pretrain/har.yaml"), *over, "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0
    want = to_dict(load_pretrain_config(REPO_ROOT / "configs/pretrain/har.yaml", over))
    assert yaml.safe_load(out) == want and want["trainer"]["num_workers"] == 2
    assert not (tmp_path / "x").exists()  # nothing ran (the store does not even exist)
    rc = main(["data", "prepare", str(REPO_ROOT / "configs/data/hapt_har.yaml"),
               f"output.path={tmp_path / 'store'}", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0 and yaml.safe_load(out)["output"]["path"] == str(tmp_path / "store")
    assert not (tmp_path / "store").exists()
