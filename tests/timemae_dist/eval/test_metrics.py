"""Metrics (sklearn) against a hand computation; eval config validation."""

from __future__ import annotations

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
