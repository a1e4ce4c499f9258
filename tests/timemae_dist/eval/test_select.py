"""Choosing a pretraining checkpoint on val (`timemae evaluate select`, `--select-checkpoint`).

A real single-process pretraining run on the synthetic store keeps three checkpoints; the
selection probes each on train -> val only:
* its val accuracies are the ones the linear protocol reports for the same checkpoint;
* poisoning the test split changes nothing, and a store without a test split works at all;
* `linear --select-checkpoint` evaluates the chosen checkpoint and records the selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import evaluate
from timemae_dist.eval.config import load_eval_config
from timemae_dist.eval.errors import EvalError
from timemae_dist.eval.protocol import run_evaluation
from timemae_dist.eval.select import best_candidate, candidate_checkpoints, select_checkpoint
from timemae_dist.train.config import load_pretrain_config
from timemae_dist.train.single import run_single

from tests.timemae_dist.eval.synthetic import make_splits, shared_fixture, waveforms, write_store

REPO = Path(__file__).resolve().parents[3]
FAST = ["linear.C_grid=[0.01, 0.1, 1.0]"]
STEPS = [30, 60, 90]


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def store():
    return shared_fixture()[0]


@pytest.fixture(scope="module")
def run_dir(store, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_pretrain_config(REPO / "configs/pretrain/tiny.yaml", [
        f"data.store={store}", f"run.storage_path={storage}", "run.name=sel", "trainer.max_steps=90",
        "trainer.micro_batch_size=32", "run.checkpoint_every=30", "run.keep_checkpoints=5", "run.log_every=30",
        "model.wave_length=8",
    ])
    summary = run_single(cfg)
    assert summary["steps"] == 90
    return storage / "sel"


@pytest.fixture(scope="module")
def selection(run_dir, store):
    return select_checkpoint([run_dir], store, load_eval_config(None, FAST), log=_quiet)


def test_every_checkpoint_of_the_run_is_a_candidate(selection, run_dir):
    assert [c["step"] for c in selection["candidates"]] == STEPS
    assert [Path(c["checkpoint"]).name for c in selection["candidates"]] == [f"checkpoint_{s:07d}" for s in STEPS]
    rows = selection["candidates"]
    assert selection["checkpoint"] == rows[best_candidate(rows)]["checkpoint"]
    assert selection["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert selection["selected_on"] == "val" and selection["split"] == "val"
    assert len({r["val_accuracy"] for r in rows}) > 1  # the checkpoints do differ


def test_val_accuracy_is_the_linear_protocols(selection, store):
    chosen = selection["checkpoint"]
    res = run_evaluation("linear", chosen, store, load_eval_config(None, FAST), log=_quiet)
    assert res["val_accuracy"] == selection["val_accuracy"]
    assert res["results"][0]["selection"]["C"] == selection["C"]


def test_test_split_never_read(selection, run_dir, tmp_path):
    splits = make_splits()
    x_test, y_test = splits["test"]
    poisoned = dict(splits, test=(waveforms(len(y_test), seed=999)[0], y_test[::-1].copy()))
    no_test = {k: v for k, v in splits.items() if k != "test"}
    for name, sp in (("poisoned", poisoned), ("no_test", no_test)):
        other = select_checkpoint([run_dir], write_store(tmp_path / name, sp), load_eval_config(None, FAST), log=_quiet)
        assert other["candidates"] == [dict(r, seconds=o["seconds"]) for r, o in zip(selection["candidates"], other["candidates"])]
        assert other["checkpoint"] == selection["checkpoint"]


def test_ties_prefer_the_later_step():
    rows = [{"val_accuracy": 0.9, "step": 10}, {"val_accuracy": 0.95, "step": 20},
            {"val_accuracy": 0.95, "step": 30}, {"val_accuracy": 0.95, "step": None}]
    assert best_candidate(rows) == 2
    assert best_candidate([{"val_accuracy": 0.5, "step": None}, {"val_accuracy": 0.5, "step": None}]) == 1


def test_candidates_from_folders_and_bad_input(run_dir, tmp_path):
    export = shared_fixture()[1]
    ck = run_dir / "checkpoint_0000060"
    got = candidate_checkpoints([ck, export, run_dir])  # duplicates (ck twice) kept once, in order
    assert [c.path.name for c in got] == ["checkpoint_0000060", export.name, "checkpoint_0000030", "checkpoint_0000090"]
    assert [c.step for c in got] == [60, None, 30, 90]
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="holds no checkpoint_<step> folder"):
        candidate_checkpoints([tmp_path / "empty"])
    with pytest.raises(EvalError, match="is not a folder"):
        candidate_checkpoints([tmp_path / "missing"])


def test_cli_select_and_linear_select_checkpoint(selection, run_dir, store, tmp_path, capsys):
    rc = evaluate.main(["select", str(run_dir), "--store", str(store), *FAST, "--out", str(tmp_path / "sel"), "--json"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    sel = json.loads(out[-1])
    assert sel["checkpoint"] == selection["checkpoint"] and sel["val_accuracy"] == selection["val_accuracy"]
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["checkpoint"] == sel["checkpoint"]
    assert any(line.startswith("selected ") and "test not read" in line for line in out)

    rc = evaluate.main(["linear", str(run_dir), "--select-checkpoint", "--store", str(store), *FAST, "--json"])
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rc == 0
    assert res["checkpoint"]["path"] == selection["checkpoint"]
    assert res["checkpoint_selection"]["checkpoint"] == selection["checkpoint"]
    assert res["val_accuracy"] == selection["val_accuracy"]

    rc = evaluate.main(["select", str(tmp_path / "sel"), "--store", str(store)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no checkpoint_<step> folder" in err and len(err.strip().splitlines()) == 1
