"""Metrics (sklearn) against a hand computation; eval config validation."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.typedconfig import ConfigError
from timemae_dist.eval.config import load_eval_config
from timemae_dist.eval.metrics import classification_metrics, mean_std
from launch.evaluate import DEFAULT_CONFIGS


def test_metrics_match_hand_computation():
    # true 0 0 0 1 1 2 / pred 0 0 1 1 2 2  ->  confusion rows (true) x cols (pred):
    #   [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    precision = {"0": 2 / 2, "1": 1 / 2, "2": 1 / 2}  # column sums 2, 2, 2
    recall = {"0": 2 / 3, "1": 1 / 2, "2": 1 / 1}  # row sums 3, 2, 1
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in precision}
    for c in ("0", "1", "2"):
        assert m["per_class"][c]["precision"] == pytest.approx(precision[c])
        assert m["per_class"][c]["recall"] == pytest.approx(recall[c])
        assert m["per_class"][c]["f1"] == pytest.approx(f1[c])
    assert [m["per_class"][c]["support"] for c in "012"] == [3, 2, 1]
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_metrics_fixed_label_order_with_unseen_class():
    m = classification_metrics([0, 1, 1], [0, 1, 0], labels=[0, 1, 2])
    assert m["labels"] == [0, 1, 2]
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert m["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_mean_std_is_sample_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (pytest.approx(2.0), pytest.approx(1.0))


def test_yaml_configs_load_and_bad_values_name_the_field():
    for path in set(DEFAULT_CONFIGS.values()):
        load_eval_config(path)
    with pytest.raises(ConfigError, match="label_fractions"):
        load_eval_config(None, ["label_fractions=[0.0]"])
    with pytest.raises(ConfigError, match="finetune.lr"):
        load_eval_config(None, ["finetune.lr=-1"])
    with pytest.raises(ConfigError, match="test_split"):
        load_eval_config(None, ["test_split=val"])
    with pytest.raises(ConfigError, match="did you mean 'C_grid'"):
        load_eval_config(None, ["linear.c_grid=[1.0]"])


def _probe_data(seed: int, n: int, noise: float):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    Z = rng.normal(size=(n, 6)) * noise
    Z[np.arange(n), y] += 1.0
    return Z, y


def test_select_probe_extends_a_grid_whose_edge_wins():
    from timemae_dist.eval.linear import select_probe

    Z_tr, y_tr = _probe_data(0, 300, 0.7)
    Z_va, y_va = _probe_data(1, 300, 0.7)
    # a grid of too-small Cs: val accuracy rises with C up to ~0.1, so the top edge wins
    tiny = [3e-4, 1e-3]
    plain = select_probe(Z_tr, y_tr, Z_va, y_va, tiny, extend_edges=0)
    assert plain.C == 1e-3 and set(plain.val_accuracy_by_C) == {repr(3e-4), repr(1e-3)}
    ext = select_probe(Z_tr, y_tr, Z_va, y_va, tiny, extend_edges=4)
    tried = [float(c) for c in ext.val_accuracy_by_C]
    assert tried[:2] == tiny and len(tried) > 2
    # each extension is 10x the last, and it stops at the first that does not improve val
    for a, b in zip(tried[1:], tried[2:]):
        assert b == pytest.approx(10 * a)
    accs = [ext.val_accuracy_by_C[repr(c)] for c in tried]
    assert ext.val_accuracy > plain.val_accuracy and ext.val_accuracy == max(accs)
    if len(tried) < 2 + 4:
        assert accs[-1] <= max(accs[:-1])
    # an interior winner is not extended
    mid = select_probe(Z_tr, y_tr, Z_va, y_va, [1e-7, 1.0, 1e7], extend_edges=4)
    if mid.C == 1.0:
        assert len(mid.val_accuracy_by_C) == 3


def test_extend_edges_is_validated():
    with pytest.raises(ConfigError, match="extend_edges"):
        load_eval_config(None, ["linear.extend_edges=-1"])


def test_select_probe_chooses_the_multi_class_scheme_on_val():
    from timemae_dist.eval.linear import fit_probe, probe_iterations, select_probe

    Z_tr, y_tr = _probe_data(0, 300, 0.9)
    Z_va, y_va = _probe_data(1, 300, 0.9)
    both = select_probe(Z_tr, y_tr, Z_va, y_va, [0.01, 1.0], multi_class=("ovr", "multinomial"))
    assert set(both.val_accuracy_by_multi_class) == {"ovr", "multinomial"}
    best_of = {m: max(v.values()) for m, v in both.val_accuracy_by_multi_class.items()}
    assert both.val_accuracy == max(best_of.values())
    # ties go to the scheme listed first
    first = "ovr" if best_of["ovr"] >= best_of["multinomial"] else "multinomial"
    assert both.multi_class == first
    assert both.val_accuracy_by_C == both.val_accuracy_by_multi_class[first]
    for m in ("ovr", "multinomial"):
        only = select_probe(Z_tr, y_tr, Z_va, y_va, [0.01, 1.0], multi_class=(m,))
        assert only.multi_class == m and only.val_accuracy == best_of[m]
    # the two schemes are different models: one-vs-rest fits one binary problem per class
    ovr, multi = fit_probe(Z_tr, y_tr, 1.0, multi_class="ovr"), fit_probe(Z_tr, y_tr, 1.0, multi_class="multinomial")
    assert len(ovr[-1].estimators_) == 3 and probe_iterations(ovr) >= 1
    assert not np.allclose(ovr.predict_proba(Z_va), multi.predict_proba(Z_va))
    assert both.to_dict()["multi_class"] == both.multi_class


def test_multi_class_is_validated():
    for bad in ("[softmax]", "[]", "[ovr, ovr]"):
        with pytest.raises(ConfigError, match="multi_class"):
            load_eval_config(None, [f"linear.multi_class={bad}"])
