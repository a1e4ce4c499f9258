"""`timemae evaluate linear|finetune|embed`: the --json contract, output files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.evaluate import main
from timemae_dist.eval.report import checkpoint_sha256, manifest_sha256

from tests.timemae_dist.eval.synthetic import shared_fixture

FAST = ["finetune.epochs=3", "finetune.patience=2", "finetune.batch_size=64", "linear.C_grid=[0.1,1.0]"]


@pytest.fixture(scope="module")
def fixture():
    return shared_fixture()


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_linear_json_contract_and_outputs(fixture, tmp_path, capsys):
    store, export = fixture
    out = tmp_path / "eval"
    rc = main(["linear", str(export), "--store", str(store), "--label-fraction", "0.1", "1.0", *FAST,
               "--seeds", "2", "--out", str(out), "--plot", "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["split"] == "test" and res["selected_on"] == "val"
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["macro_f1"] <= 1.0
    assert res["label_fraction"] == 1.0 and res["num_seeds"] == 2
    assert len(res["results"]) == 4
    assert {(r["label_fraction"], r["seed"]) for r in res["results"]} == {(f, s) for f in (0.1, 1.0) for s in (0, 1)}
    assert res["checkpoint"]["sha256"] == checkpoint_sha256(export)
    assert res["data"]["manifest_sha256"] == manifest_sha256(store)
    for name in ("results.json", "results.md", "confusion_matrix.png", "label_fraction_curve.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["accuracy"] == res["accuracy"]


def test_finetune_json(fixture, capsys):
    store, export = fixture
    rc = main(["finetune", str(export), "--store", str(store), "--json", *FAST])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert (res["split"], res["selected_on"], res["protocol"]) == ("test", "val", "finetune")
    sel = res["results"][0]["selection"]
    assert 1 <= sel["epochs_run"] <= 3 and 0 <= sel["best_epoch"] < sel["epochs_run"]


def test_embed_cli(fixture, tmp_path, capsys):
    store, export = fixture
    png = tmp_path / "map.png"
    rc = main(["embed", str(export), "--store", str(store), "--plot", str(png), "embed.max_points=45", "--json"])
    assert rc == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert _last_json(capsys.readouterr().out)["num_points"] == 45


@pytest.mark.parametrize(
    "args, message",
    [
        (["linear", "{export}", "--store", "{tmp}/nope"], "is not a store"),
        (["linear", "{tmp}/nope", "--store", "{store}"], "does not exist"),
        (["linear", "{tmp}", "--store", "{store}"], "neither an export folder"),
        (["linear", "{export}", "--store", "{store}", "linear.C=1"], "unknown key"),
        (["linear", "{export}", "--store", "{store}", "--plot"], "--out"),
        (["finetune", "{export}", "--store", "{store}", "finetune.epochs=0"], "finetune.epochs"),
    ],
)
def test_user_errors_are_one_line(fixture, tmp_path, capsys, args, message):
    store, export = fixture
    argv = [a.format(export=export, store=store, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_training_checkpoint_is_exported_on_the_fly(fixture, tmp_path, capsys):
    """A checkpoint written by the single-process pretraining loop evaluates directly."""
    from timemae_dist.train.config import load_pretrain_config
    from timemae_dist.train.single import run_single

    store, _ = fixture
    tiny = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny.yaml"
    cfg = load_pretrain_config(tiny, [f"data.store={store}", f"run.storage_path={tmp_path}", "run.name=r",
                                      "trainer.max_steps=2", "run.checkpoint_every=2"])
    ckpt = run_single(cfg)["checkpoint"]
    capsys.readouterr()
    rc = main(["linear", ckpt, "--store", str(store), "--json", "linear.C_grid=[1.0]"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["split"] == "test" and res["checkpoint"]["path"] == ckpt
    assert res["model_config"]["d_model"] == 16  # the tiny pretraining config's encoder


def test_print_config_and_required_options(tmp_path, capsys):
    """--print-config prints the eval config the options resolve to (no store needed, nothing
    read); without it --store (and embed's --plot) are required, as usage errors."""
    import yaml

    rc = main(["linear", str(tmp_path / "none"), "--label-fraction", "0.01", "1.0", "--seeds", "2",
               "linear.C_grid=[1.0]", "--print-config"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert rc == 0 and out["label_fractions"] == [0.01, 1.0] and out["num_seeds"] == 2
    assert out["linear"]["C_grid"] == [1.0]
    for argv, flag in ((["linear", str(tmp_path)], "--store"), (["embed", str(tmp_path), "--store", "s"], "--plot")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and f"required: {flag}" in capsys.readouterr().err
