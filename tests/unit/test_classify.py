"""Classification components: label spaces and their errors, balanced seeded subsets, metrics against
hand-computed values, training-mode plumbing (frozen base, LoRA targets) on a tiny BERT."""

from __future__ import annotations

import numpy as np
import pytest

from lmtune.config import LoRAConfig, validate_recipe
from lmtune.errors import InputError
from lmtune.modeling import add_lora, apply_training_mode, head_module_names, linear_module_names
from lmtune.tasks.classify import (
    LabelSpace,
    check_label_variety,
    classification_metrics,
    encode_label,
    label_space,
    subset_indices,
)


def cfg(**classify):
    return validate_recipe({"task": "classify", "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, "classify": classify})


def test_label_space_from_names_integers_and_the_recipe():
    assert label_space(["pos", "neg", "pos"], cfg()).names == ["neg", "pos"]
    assert label_space([2, 0, 1, 0], cfg()).names == ["0", "1", "2"]
    space = label_space([1, 0], cfg(labels=["negative", "positive"]))
    assert space.names == ["negative", "positive"]
    assert space.head_config()["id2label"] == {0: "negative", 1: "positive"}
    assert space.head_config()["problem_type"] == "single_label_classification"
    multi = label_space([["a", "c"], ["b"]], cfg(problem_type="multi_label"))
    assert multi.names == ["a", "b", "c"] and multi.num_labels == 3
    assert label_space([0.5, 2.0], cfg(problem_type="regression")).num_labels == 1


def test_encode_label_and_its_errors():
    space = LabelSpace(["neg", "pos"], "single_label")
    assert [encode_label(v, space, "line 1", "data.train") for v in ("neg", "pos", 0, 1)] == [0, 1, 0, 1]
    with pytest.raises(InputError, match=r"label 2 in line 3 is out of range: there are 2 labels \(neg, pos\)"):
        encode_label(2, space, "line 3", "data.train")
    with pytest.raises(InputError, match="label 'meh' in line 4 is not one of neg, pos"):
        encode_label("meh", space, "line 4", "data.train")
    multi = LabelSpace(["a", "b", "c"], "multi_label")
    assert encode_label(["c", "a"], multi, "l", "w") == [1.0, 0.0, 1.0]
    reg = LabelSpace(["score"], "regression")
    assert encode_label("2.5", reg, "l", "w") == 2.5
    with pytest.raises(InputError, match="not a number"):
        encode_label("high", reg, "line 9", "data.train")


def test_a_single_class_is_refused():
    space = LabelSpace(["neg", "pos"], "single_label")
    with pytest.raises(InputError, match="every example has the label 'pos'"):
        check_label_variety([1, 1, 1], space, "data.train")
    check_label_variety([1, 0, 1], space, "data.train")


def test_balanced_seeded_subsets():
    labels = [0] * 900 + [1] * 100
    idx = subset_indices(labels, 100, seed=3, balanced=True)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert np.bincount(np.asarray(labels)[idx]).tolist() == [50, 50]
    assert np.array_equal(idx, subset_indices(labels, 100, seed=3, balanced=True))
    assert not np.array_equal(idx, subset_indices(labels, 100, seed=4, balanced=True))
    plain = subset_indices(labels, 100, seed=3, balanced=False)
    assert len(plain) == 100 and np.bincount(np.asarray(labels)[plain])[0] > 70
    assert subset_indices(labels, None, 0, True).tolist() == list(range(1000))
    # a class too small for its share gives what it has
    assert np.bincount(np.asarray([0] * 10 + [1] * 3)[subset_indices([0] * 10 + [1] * 3, 8, 0, True)]).tolist() == [
        4, 3]


def test_single_label_metrics_by_hand():
    space = LabelSpace(["a", "b", "c"], "single_label")
    true = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    logits = np.eye(3)[pred]
    m = classification_metrics(logits, true, space)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # per class F1: a: p=1/2 r=1/2 -> 1/2; b: p=2/3 r=1 -> 4/5; c: p=1 r=1/2 -> 2/3
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never predicted nor present scores 0 and still counts in the macro mean
    m2 = classification_metrics(np.eye(3)[[0, 1]], [0, 1], space)
    assert m2["f1"] == pytest.approx(2 / 3) and m2["accuracy"] == 1.0


def test_multi_label_and_regression_metrics_by_hand():
    space = LabelSpace(["a", "b"], "multi_label")
    true = [[1, 0], [1, 1], [0, 0]]
    logits = np.array([[2.0, -1.0], [1.0, -3.0], [-1.0, 4.0]])  # predicted: {a}, {a}, {b}
    m = classification_metrics(logits, true, space)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    # a: tp 2 -> F1 1; b: tp 0, fp 1, fn 1 -> 0; micro: tp 2, fp 1, fn 1 -> 4/6
    assert m["f1_macro"] == pytest.approx(0.5) and m["f1_micro"] == pytest.approx(4 / 6)
    reg = classification_metrics(np.array([[1.0], [2.0], [4.0]]), [1.0, 3.0, 4.0], LabelSpace(["s"], "regression"))
    assert reg["mse"] == pytest.approx(1 / 3) and reg["mae"] == pytest.approx(1 / 3)
    assert reg["pearson"] == pytest.approx(np.corrcoef([1, 2, 4], [1, 3, 4])[0, 1])


# --------------------------------------------------------------------------------------------------
# Training modes on a tiny model


@pytest.fixture(scope="module")
def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, \
        DistilBertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                  hidden_dim=64, num_labels=2))
    return bert, distil


def test_head_modules_and_linear_names(tiny_classifier):
    bert, distil = tiny_classifier
    assert head_module_names(bert) == ["classifier", "bert.pooler"]
    assert head_module_names(distil) == ["pre_classifier", "classifier"]
    assert {"query", "key", "value", "dense", "classifier"} <= set(linear_module_names(bert))
    assert "q_lin" in linear_module_names(distil)


def test_head_mode_freezes_exactly_the_base(tiny_classifier):
    import copy

    bert = copy.deepcopy(tiny_classifier[0])
    apply_training_mode(bert, "head", LoRAConfig(), "classify")
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_lora_defaults_and_unknown_targets(tiny_classifier):
    import copy

    distil = copy.deepcopy(tiny_classifier[1])
    peft_model = add_lora(distil, LoRAConfig(r=4, alpha=32, dropout=0.01), "classify")
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("q_lin.lora_A" in n for n in names) and not any("v_lin.lora" in n for n in names)
    assert any("pre_classifier.modules_to_save" in n for n in names)
    assert any("classifier.modules_to_save" in n for n in names)
    with pytest.raises(InputError, match=r"lora.target_modules q_proj not found in bert; its linear modules are: .*query"):
        add_lora(copy.deepcopy(tiny_classifier[0]), LoRAConfig(target_modules=["q_proj"]), "classify")


def test_modes_that_make_no_sense_are_refused_at_load():
    base = {"name": "t", "data": {"train": {"path": "x.jsonl"}}}
    with pytest.raises(InputError, match="training.mode head trains a new task head; task clm"):
        validate_recipe({**base, "task": "clm", "model": {"name_or_path": "gpt2"}, "training": {"mode": "head"}})
    with pytest.raises(InputError, match="a model from scratch trains in full"):
        validate_recipe({**base, "task": "classify", "model": {"from_scratch": {"architecture": "bert"}},
                         "tokenizer": {"train": True}, "training": {"mode": "lora"}})
    with pytest.raises(InputError, match="load_best_model_at_end needs eval_strategy"):
        validate_recipe({**base, "task": "classify", "model": {"name_or_path": "x"},
                         "training": {"load_best_model_at_end": True}})
