"""Fine-tuning that starts its head from the linear probe (``finetune.head_init``, LP-FT).

* the folded head gives the probe's predictions and class probabilities on raw features,
  for 6 classes, for a class missing from the probe's train set, and for the binary case;
* ``head_init=[random, probe]`` runs both from the same encoder, keeps the better on val, and
  its ``random`` run is exactly the plain fine-tuning run; poisoning test changes no choice;
* before any training step the probe-initialised classifier predicts what the probe predicts.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.typedconfig import ConfigError
from timemae_dist.eval.config import load_eval_config
from timemae_dist.eval.features import encode, load_encoder
from timemae_dist.eval.finetune import build_classifier, head_from_probe, init_head_from_probe, predict
from timemae_dist.eval.linear import fit_probe
from timemae_dist.eval.protocol import EvalData, _probe_for_head, run_evaluation
from data_pipeline.store import open_store

from tests.timemae_dist.eval.synthetic import shared_fixture
from tests.timemae_dist.eval.test_protocol import FAST, _quiet, _selection, poisoned_store  # noqa: F401


@pytest.fixture(scope="module")
def fixture():
    return shared_fixture()


def _softmax(a):
    a = a - a.max(1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("classes,present", [(6, 6), (6, 5), (2, 2)])
def test_folded_head_equals_the_probe(classes, present):
    rng = np.random.default_rng(classes * 10 + present)
    n, d = 300, 16
    centres = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, present, n)
    Z = (centres[y] + rng.normal(0, 1, (n, d))) * rng.uniform(0.1, 10, d) + rng.normal(0, 5, d)
    probe = fit_probe(Z, y, C=1.0, multi_class="multinomial")
    W, b = head_from_probe(probe, classes)
    assert W.shape == (classes, d) and b.shape == (classes,)
    logits = Z @ W.T.astype(np.float64) + b
    np.testing.assert_array_equal(logits.argmax(1), probe.predict(Z))
    p = _softmax(logits)
    np.testing.assert_allclose(p[:, :present], probe.predict_proba(Z), atol=2e-4)
    if present < classes:  # an unseen class is never predicted and gets ~no probability
        assert (W[present:] == 0).all() and p[:, present:].max() < 1e-3


def test_head_init_rejects_unknown_values():
    with pytest.raises(ConfigError, match="head_init"):
        load_eval_config(None, ["finetune.head_init=[probe, lpft]"])
    with pytest.raises(ConfigError, match="head_init"):
        load_eval_config(None, ["finetune.head_init=[]"])


def test_probe_initialised_classifier_starts_as_the_probe(fixture):
    store, export = fixture
    st = open_store(store)
    cfg = load_eval_config(None, FAST)
    data = EvalData(st, cfg)
    model = load_encoder(export)
    x_tr, x_va = data.windows("train"), data.windows("val")
    y_tr, y_va = np.searchsorted(data.classes, data.y_train), np.searchsorted(data.classes, data.y_val)
    sel = _probe_for_head(cfg, encode(model, x_tr), y_tr, encode(model, x_va), y_va)
    assert sel.multi_class == "multinomial"
    clf = build_classifier(model.config, len(data.classes), pretrained=model, seed=0)
    init_head_from_probe(clf, sel.probe)
    np.testing.assert_array_equal(predict(clf, x_va), sel.probe.predict(encode(model, x_va).astype(np.float64)))


def test_head_init_grid_is_chosen_on_val(fixture, poisoned_store):  # noqa: F811
    store, export = fixture
    base = FAST + ["finetune.epochs=3", "label_fractions=[0.1]"]
    plain = run_evaluation("finetune", export, store, load_eval_config(None, base), log=_quiet)
    grid = load_eval_config(None, base + ["finetune.head_init=[random, probe]", "baselines=true"])
    both = run_evaluation("finetune", export, store, grid, log=_quiet)
    pre = [r for r in both["results"] if r["model"] == "pretrained"][0]
    sel = pre["selection"]
    tried = {t["head_init"]: t for t in sel["tried"]}
    assert set(tried) == {"random", "probe"}
    best = max(sel["tried"], key=lambda t: (t["val_accuracy"], -t["val_loss"]))
    assert sel["head_init"] == best["head_init"] and pre["val_accuracy"] == best["val_accuracy"]
    # the random-head run of the grid is the plain run (same init, same seed)
    assert tried["random"]["val_accuracy"] == plain["results"][0]["val_accuracy"]
    assert plain["results"][0]["selection"]["head_init"] == "random"
    assert 0 < sel["head_probe"]["val_accuracy"] <= 1
    # supervised from scratch never gets a probe head
    scratch = [r for r in both["results"] if r["model"] == "scratch"][0]
    assert [t["head_init"] for t in scratch["selection"]["tried"]] == ["random"]
    # the choice never looks at test; each tried run's test accuracy is reported after it
    dirty = run_evaluation("finetune", export, poisoned_store, grid, log=_quiet)
    assert _selection(dirty) == _selection(both)
    chosen = [t for t in sel["tried"] if t["head_init"] == sel["head_init"]][0]
    assert chosen["test_accuracy_after_selection"] == pre["accuracy"]
    assert [t["test_accuracy_after_selection"] for t in sel["tried"]] != [
        t["test_accuracy_after_selection"] for t in dirty["results"][0]["selection"]["tried"]]

