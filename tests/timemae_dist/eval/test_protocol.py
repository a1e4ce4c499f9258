"""The evaluation protocol on a tiny synthetic task (sine / square / sawtooth in a real store).

* a briefly pretrained tiny encoder beats the random-init encoder in the linear probe;
* label-fraction subsets are stratified and seeded;
* poisoning the test split (labels permuted, windows replaced) changes nothing that was
  selected: probe C, fine-tuning epoch, every validation number;
* results.json / Markdown / plots; the periodic-probe hook; the t-SNE map.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.typedconfig import ConfigError

from data_pipeline.splits import label_fraction_subset
from data_pipeline.store import open_store
from timemae_dist.eval import linear_probe_val_accuracy
from timemae_dist.eval.config import load_eval_config
from timemae_dist.eval.embed import run_embed
from timemae_dist.eval.features import load_encoder
from timemae_dist.eval.protocol import EvalData, run_evaluation
from timemae_dist.eval.report import checkpoint_sha256, manifest_sha256, write_results

from tests.timemae_dist.eval.synthetic import make_splits, shared_fixture, waveforms, write_store

FAST = ["finetune.epochs=4", "finetune.patience=2", "finetune.batch_size=64", "linear.C_grid=[0.01, 0.1, 1.0]"]


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def fixture():
    return shared_fixture()


@pytest.fixture(scope="module")
def linear_results(fixture):
    store, export = fixture
    cfg = load_eval_config(None, FAST + ["baselines=true", "label_fractions=[0.1, 1.0]", "num_seeds=2"])
    return run_evaluation("linear", export, store, cfg, log=_quiet)


def test_pretrained_beats_random_init_in_linear_probe(linear_results):
    by = {(s["model"], s["label_fraction"]): s for s in linear_results["summary"]}
    assert set(by) == {(m, f) for m in ("pretrained", "random_init", "scratch") for f in (0.1, 1.0)}
    pre, rnd = by[("pretrained", 1.0)], by[("random_init", 1.0)]
    assert pre["val_accuracy_mean"] > rnd["val_accuracy_mean"] + 0.05, (pre, rnd)
    assert pre["accuracy_mean"] > rnd["accuracy_mean"] + 0.05, (pre, rnd)
    assert pre["accuracy_mean"] > 0.7  # chance is 1/3


def test_headline_and_summary(linear_results):
    r = linear_results
    assert (r["split"], r["selected_on"], r["protocol"], r["label_fraction"]) == ("test", "val", "linear", 1.0)
    rows = [x for x in r["results"] if x["model"] == "pretrained" and x["label_fraction"] == 1.0]
    assert len(rows) == 2 and [x["seed"] for x in rows] == [0, 1]
    assert r["accuracy"] == pytest.approx(np.mean([x["accuracy"] for x in rows]))
    assert r["macro_f1"] == pytest.approx(np.mean([x["macro_f1"] for x in rows]))
    for x in r["results"]:
        assert x["selected_on"] == "val" and x["split"] == "test"
        if x["protocol"] == "linear":
            by_c = x["selection"]["val_accuracy_by_C"]
            assert x["selection"]["C"] == float(max(by_c, key=lambda c: (by_c[c], -list(by_c).index(c))))
            assert x["val_accuracy"] == max(by_c.values())
        else:
            hist = [h["val_accuracy"] for h in x["selection"]["history"]]
            assert x["val_accuracy"] == max(hist)
        assert sum(map(sum, x["test"]["confusion_matrix"])) == r["data"]["num_labelled"]["test"]


def test_label_fraction_subsets_are_stratified_and_seeded(fixture, linear_results):
    store, _ = fixture
    st = open_store(store)
    data = EvalData(st, load_eval_config(None, []))
    labels = st.read_column("train", "label")
    a, b, c = (data.subset_positions(0.1, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)  # seeded: same seed, same subset
    assert not np.array_equal(a, c)  # another seed, another subset
    chosen = data.train_idx[a]
    np.testing.assert_array_equal(chosen, label_fraction_subset(labels, 0.1, 0))
    assert (labels[chosen] >= 0).all()  # labelled windows only
    for k in np.unique(data.y_train):  # stratified: round(0.1 * n_k) per class
        n_k = int((data.y_train == k).sum())
        assert int((labels[chosen] == k).sum()) == max(1, int(np.floor(0.1 * n_k + 0.5)))
    rows = [x for x in linear_results["results"] if x["label_fraction"] == 0.1]
    assert {x["num_train"] for x in rows} == {a.size}


@pytest.fixture(scope="module")
def poisoned_store(fixture, tmp_path_factory):
    """Same train and val; test labels permuted and test windows replaced by other waves."""
    splits = make_splits()
    x_test, y_test = splits["test"]
    rng = np.random.default_rng(123)
    x_other, _ = waveforms(len(y_test), seed=999)
    splits["test"] = (x_other, rng.permutation(y_test))
    return write_store(tmp_path_factory.mktemp("poison") / "store", splits)


def _selection(results: dict) -> list:
    """What each run chose and every val number (tried runs' test accuracies, reported after the choice, left out)."""
    out = []
    for x in results["results"]:
        sel = dict(x["selection"])
        if "tried" in sel:
            sel["tried"] = [{k: v for k, v in t.items() if k != "test_accuracy_after_selection"} for t in sel["tried"]]
        out.append((x["model"], x["protocol"], x["label_fraction"], x["seed"], sel, x["val_accuracy"]))
    return out


def test_poisoned_test_split_does_not_change_selection(fixture, poisoned_store, linear_results):
    store, export = fixture
    # linear (pretrained + random-init probes + scratch fine-tuning): same C, same val numbers
    cfg = load_eval_config(None, FAST + ["baselines=true", "label_fractions=[0.1, 1.0]", "num_seeds=2"])
    poisoned = run_evaluation("linear", export, poisoned_store, cfg, log=_quiet)
    assert _selection(poisoned) == _selection(linear_results)
    assert [x["accuracy"] for x in poisoned["results"]] != [x["accuracy"] for x in linear_results["results"]]
    assert poisoned["data"]["manifest_sha256"] != linear_results["data"]["manifest_sha256"]

    # fine-tuning: the epoch kept by early stopping and the whole val curve are unchanged
    cfg = load_eval_config(None, FAST + ["finetune.epochs=5"])
    clean = run_evaluation("finetune", export, store, cfg, log=_quiet)
    dirty = run_evaluation("finetune", export, poisoned_store, cfg, log=_quiet)
    assert _selection(dirty) == _selection(clean)
    sel = clean["results"][0]["selection"]
    assert sel["best_epoch"] == int(np.argmax([h["val_accuracy"] for h in sel["history"]]))
    assert dirty["accuracy"] != clean["accuracy"]


def test_finetune_lr_grid_is_chosen_on_val(fixture, poisoned_store):
    store, export = fixture
    base = FAST + ["finetune.epochs=3"]
    plain = run_evaluation("finetune", export, store, load_eval_config(None, base), log=_quiet)
    grid = load_eval_config(None, base + ["finetune.lr_grid=[0.01, 0.001]"])
    both = run_evaluation("finetune", export, store, grid, log=_quiet)
    sel = both["results"][0]["selection"]
    assert set(sel["val_accuracy_by_lr"]) == {repr(0.01), repr(0.001)}
    assert sel["val_accuracy_by_lr"][repr(sel["lr"])] == both["val_accuracy"] == max(sel["val_accuracy_by_lr"].values())
    # the lr = 0.001 run of the grid is the plain run (same init, same seed): same val accuracy
    assert sel["val_accuracy_by_lr"][repr(0.001)] == plain["val_accuracy"]
    assert plain["results"][0]["selection"]["lr"] == 0.001
    # the choice never looks at test
    dirty = run_evaluation("finetune", export, poisoned_store, grid, log=_quiet)
    assert _selection(dirty) == _selection(both)
    with pytest.raises(ConfigError, match="lr_grid"):
        load_eval_config(None, ["finetune.lr_grid=[0.001, -1]"])


def test_results_files_and_hashes(fixture, linear_results, tmp_path):
    store, export = fixture
    paths = write_results(linear_results, tmp_path, plot=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"]["sha256"] == checkpoint_sha256(export)
    assert saved["data"]["manifest_sha256"] == manifest_sha256(store)
    assert saved["config"]["label_fractions"] == [0.1, 1.0]
    md = (tmp_path / "results.md").read_text()
    assert "| pretrained | linear | 0.1 |" in md and "| random_init | linear | 1 |" in md and "±" in md
    for key in ("confusion_matrix", "label_fraction_curve"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_periodic_probe_hook_is_cheap_and_side_effect_free(fixture):
    store, export = fixture
    model = load_encoder(export).train()
    rng_before = torch.get_rng_state()
    acc = linear_probe_val_accuracy(model, str(store), max_windows=90)
    assert 0.5 < acc <= 1.0
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng_before)

    class Wrapper(torch.nn.Module):  # DeepSpeed/DDP-style wrapper with .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert linear_probe_val_accuracy(Wrapper(model), open_store(store), max_windows=90) == acc


def test_embed_map_is_reproducible(fixture, tmp_path):
    store, export = fixture
    cfg = load_eval_config(None, ["embed.max_points=60", "embed.perplexity=10"])
    a = run_embed(export, store, tmp_path / "a.png", cfg)
    b = run_embed(export, store, tmp_path / "b.png", cfg)
    assert a["num_points"] == 60 and a["classes"] == [0, 1, 2]
    assert a["coordinates_sha256"] == b["coordinates_sha256"]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
