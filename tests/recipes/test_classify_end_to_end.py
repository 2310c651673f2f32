"""Classification runs for real through the CLI, one per mode, on a synthetic keyword task: full
fine-tuning of a tiny BERT; transfer learning (the body that run trained, frozen, with a new head);
LoRA. Base weights must stay bitwise unchanged where the mode freezes them, the merged model must give
the adapter model's logits, and plain `pipeline("text-classification")` must load the export."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmtune.cli import main

from ..helpers import assert_report, with_changes, write_jsonl

FILLER = "the model reads data and trains a small network on text so loss goes down while the tokenizer".split()
KEYWORDS = {"pos": ["excellent", "wonderful"], "neg": ["awful", "terrible"]}


def keyword_rows(n: int, seed: int) -> list[dict]:
    """Filler words with one keyword that decides the label, anywhere in the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 30))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data and a tiny 'pretrained' BERT (random weights, WordPiece trained on the texts)."""
    from transformers import BertConfig, BertModel

    from lmtune.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("classify-e2e")
    train = write_jsonl(tmp / "train.jsonl", keyword_rows(600, seed=0))
    val = write_jsonl(tmp / "val.jsonl", keyword_rows(200, seed=1))
    texts = [r["text"] for r in keyword_rows(600, seed=0)]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1, style="bert", model_max_length=64)
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))
    base.save_pretrained(str(tmp / "base"))
    tokenizer.save_pretrained(str(tmp / "base"))
    return tmp, train, val


def recipe(world, model, mode, name, **changes):
    tmp, train, val = world
    r = {
        "task": "classify", "name": name,
        "data": {"train": {"path": str(train)}, "validation": {"path": str(val)}},
        "model": {"name_or_path": str(model)},
        "classify": {"samples": ["the model is excellent", "awful network"]},
        "lora": {"r": 4, "alpha": 32, "dropout": 0.01},
        "training": {"mode": mode, "learning_rate": 3e-3, "batch_size": 16, "max_steps": 150, "logging_steps": 50,
                     "save_strategy": "no", "precision": "fp32", "seed": 1},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


def train(world, model, mode, name, **changes):
    run = world[0] / "runs" / name
    assert main(["train", str(recipe(world, model, mode, name, **changes)), "--output", str(run)]) == 0
    return run, json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def full_run(world):
    # Periodic evaluation and best-checkpoint selection on accuracy, as the LoRA article's recipe does.
    return train(world, world[0] / "base", "full", "full",
                 **{"training.eval_strategy": "steps", "training.eval_steps": 50, "training.save_strategy": "steps",
                    "training.save_steps": 50, "training.load_best_model_at_end": True,
                    "training.metric_for_best_model": "accuracy"})


@pytest.fixture(scope="module")
def body(world, full_run):
    """The body the full run trained, without its head: the 'pretrained model' of transfer learning."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, _ = full_run
    model = AutoModelForSequenceClassification.from_pretrained(str(run / "model"))
    folder = world[0] / "body"
    model.bert.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(run / "model")).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def head_run(world, body):
    return train(world, body, "head", "head", **{"training.learning_rate": 1e-2})


@pytest.fixture(scope="module")
def lora_run(world):
    return train(world, world[0] / "base", "lora", "lora")


def assert_learned(metrics, new_head_on_trained_body=False):
    before, after = metrics["before"], metrics["after"]
    assert after["accuracy"] >= 0.95 and after["f1"] >= 0.95, after
    if new_head_on_trained_body:
        # The trained body separates the classes so well that even the random new head may sort them;
        # what it lacks before training is confidence.
        assert all(s["score"] < 0.8 for s in before["samples"]), before["samples"]
        assert all(s["score"] > 0.95 for s in after["samples"]), after["samples"]
    else:
        assert before["accuracy"] < 0.8
    assert sum(map(sum, after["confusion_matrix"])) == after["examples"] == 200
    assert [s["label"] for s in after["samples"]] == ["pos", "neg"]
    assert {"text", "label", "score", "scores"} <= set(before["samples"][0])


def test_full_fine_tuning_learns_and_keeps_the_best_checkpoint(full_run):
    run, metrics = full_run
    assert_learned(metrics)
    assert metrics["parameters"]["mode"] == "full" and metrics["parameters"]["trainable_percent"] == 100
    assert metrics["memory"]["train_peak_rss_mb"] > 50 and metrics["memory"]["prepare_peak_rss_mb"] > 50
    state = json.loads(next((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["best_model_checkpoint"] and state["best_metric"] >= 0.95
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert metrics["data"]["train_label_counts"]["neg"] + metrics["data"]["train_label_counts"]["pos"] == 600
    # loss, learning rate, throughput, gradient norm, two confusion matrices, the periodic eval accuracy / F1
    page = assert_report(run, ["accuracy", "f1"], "the model is excellent", "awful network", plots=8)
    (neg_neg, neg_pos), _ = metrics["after"]["confusion_matrix"]
    assert f"<td><b>neg</b></td><td class=n>{neg_neg}</td><td class=n>{neg_pos}</td>" in page
    assert 'alt="confusion matrix after training"' in page and 'alt="eval_accuracy by step"' in page


def test_head_mode_trains_the_new_head_and_leaves_the_body_bitwise_unchanged(head_run, body):
    run, metrics = head_run
    assert_learned(metrics, new_head_on_trained_body=True)
    p = metrics["parameters"]
    assert p["mode"] == "head" and p["trainable"] == (64 * 64 + 64) + (64 * 2 + 2)  # pooler and classifier
    trained = load_file(str(run / "model" / "model.safetensors"))
    original = load_file(str(body / "model.safetensors"))
    body_weights = {k: v for k, v in original.items() if not k.startswith("pooler.")}
    assert len(body_weights) > 20 and all(torch.equal(trained[f"bert.{k}"], v) for k, v in body_weights.items())


def test_lora_learns_with_a_small_trainable_share_as_peft_reports(lora_run, world):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    run, metrics = lora_run
    assert_learned(metrics)
    base = AutoModelForSequenceClassification.from_pretrained(str(world[0] / "base"), num_labels=2)
    reference = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, lora_dropout=0.01,
                                                target_modules=["query", "value"],
                                                modules_to_save=["classifier", "bert.pooler"]))
    trainable, total = reference.get_nb_trainable_parameters()
    p = metrics["parameters"]
    assert (p["trainable"], p["total"]) == (trainable, total) and p["trainable_percent"] < 10
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["query", "value"] and adapter["r"] == 4


def test_lora_base_weights_are_bitwise_unchanged_outside_the_adapted_layers(lora_run, world):
    run, _ = lora_run
    merged = load_file(str(run / "model" / "model.safetensors"))
    original = load_file(str(world[0] / "base" / "model.safetensors"))
    adapted = [k for k in original if ".query." in k or ".value." in k or k.startswith("pooler.")]
    untouched = [k for k in original if k not in adapted]
    assert len(untouched) > 20 and all(torch.equal(merged[f"bert.{k}"], original[k]) for k in untouched)
    # the adapted weights carry the merged low-rank update; LoRA leaves their biases alone
    lora_layers = [k for k in adapted if not k.startswith("pooler.")]
    assert any(not torch.equal(merged[f"bert.{k}"], original[k]) for k in lora_layers if k.endswith("weight"))
    assert all(torch.equal(merged[f"bert.{k}"], original[k]) for k in lora_layers if k.endswith("bias"))


def test_activation_checkpointing_trains_the_same_adapter(world, tmp_path):
    """Recomputing activations in the backward pass (dropout masks replayed) must not change the update: the
    adapters inside checkpointed layers get their gradients although the frozen embeddings' output needs none."""
    from transformers import AutoModelForSequenceClassification

    runs = {}
    for checkpointing in (True, False):
        name = f"lora-checkpointing-{checkpointing}".lower()
        run = tmp_path / name
        cfg = recipe(world, world[0] / "base", "lora", name,
                     **{"training.max_steps": 8, "training.activation_checkpointing": checkpointing})
        assert main(["train", str(cfg), "--output", str(run)]) == 0
        runs[checkpointing] = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForSequenceClassification.from_pretrained(str(world[0] / "base"), num_labels=2)
    assert base.supports_gradient_checkpointing
    lora_b = [k for k in runs[True] if "lora_B" in k]
    assert lora_b and all(runs[True][k].abs().max() > 0 for k in lora_b)  # B starts at zero: it was trained
    assert runs[True].keys() == runs[False].keys()
    for k in runs[True]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-5)


def test_export_merge_gives_the_adapter_models_logits_and_loads_in_a_plain_pipeline(lora_run, world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run, _ = lora_run
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out), "--merge"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(["the model is excellent", "awful network loss goes down", "data"], padding=True,
                      return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(str(world[0] / "base"), num_labels=2)
    adapter_model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    in_run = AutoModelForSequenceClassification.from_pretrained(str(run / "model")).eval()
    with torch.no_grad():
        expected = adapter_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)
        assert torch.allclose(in_run(**batch).logits, expected, atol=1e-5)
    classify = pipeline("text-classification", model=str(out))
    assert [r["label"] for r in classify(["wonderful data", "terrible tokenizer"])] == ["pos", "neg"]


def test_predict_prints_label_and_probability(lora_run, capsys):
    run, _ = lora_run
    capsys.readouterr()
    assert main(["predict", str(run), "a wonderful model", "terrible text"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["label"] for x in lines] == ["pos", "neg"]
    assert all(0.5 < x["score"] <= 1 and abs(sum(x["scores"].values()) - 1) < 1e-4 for x in lines)


def test_a_tokenizer_without_pad_token_gets_one_and_the_embeddings_grow(world, tmp_path):
    """The article's GPT-2 path: no pad token -> [PAD] added, embeddings resized, pad id in the config."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from lmtune.tokenizer import train_bpe_tokenizer

    texts = [r["text"] for r in keyword_rows(300, seed=0)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1, model_max_length=64)
    tokenizer.pad_token = None
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        str(tmp_path / "gpt2"))
    tokenizer.save_pretrained(str(tmp_path / "gpt2"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "gpt2")).pad_token is None
    run, metrics = train(world, tmp_path / "gpt2", "lora", "gpt2-lora", **{"training.max_steps": 5})
    saved = AutoTokenizer.from_pretrained(str(run / "model"))
    config = json.loads((run / "model" / "config.json").read_text())
    assert saved.pad_token == "[PAD]" and config["vocab_size"] == len(tokenizer) + 1 == len(saved)
    assert config["pad_token_id"] == saved.pad_token_id
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def bad_data(world, kind, tmp_path):
    rows = keyword_rows(60, seed=3)
    changes = {"training.max_steps": 1}
    if kind == "label missing":
        del rows[4]["label"]
    elif kind == "label out of range":
        rows = [{**r, "label": {"neg": 0, "pos": 1}[r["label"]]} for r in rows]
        rows[6]["label"] = 2
        changes["classify.labels"] = ["neg", "pos"]
    elif kind == "one class":
        rows = [{**r, "label": "pos"} for r in rows]
    elif kind == "text field absent":
        changes["data.train.text_field"] = "review"
    elif kind == "unknown target module":
        changes["training.mode"] = "lora"
        changes["lora.target_modules"] = ["q_lin"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    changes["data.train.path"] = str(path)
    changes["data.validation"] = None
    return recipe(world, world[0] / "base", "full", "bad", **changes)


@pytest.mark.parametrize(("kind", "words"), [
    ("label missing", ["line 5", "no label (field 'label')"]),
    ("label out of range", ["line 7", "label 2", "out of range", "2 labels"]),
    ("one class", ["every example has the label 'pos'", "at least two classes"]),
    ("text field absent", ["no field 'review'", "fields: text, label"]),
    ("unknown target module", ["lora.target_modules q_lin not found in bert", "query", "value"]),
])
def test_bad_input_stops_with_one_sentence(world, tmp_path, kind, words, capsys):
    path = bad_data(world, kind, tmp_path)
    capsys.readouterr()
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("problem", ["multi_label", "regression"])
def test_multi_label_and_regression_train_and_report_their_metrics(world, tmp_path, problem):
    rows = keyword_rows(300, seed=5)
    if problem == "multi_label":  # a label per keyword family present: pos or neg, and sometimes 'fast'
        rng = random.Random(6)
        fast = [rng.random() < 0.5 for _ in rows]
        rows = [{"text": r["text"] + (" quick" if f else ""), "label": [r["label"]] + (["fast"] if f else [])}
                for r, f in zip(rows, fast)]
    else:  # a score: +1 for a positive keyword, -1 for a negative one
        rows = [{"text": r["text"], "label": 1.0 if r["label"] == "pos" else -1.0} for r in rows]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    run, metrics = train(world, world[0] / "base", "full", f"{problem}-run",
                         **{"data.train.path": str(path), "data.validation": None, "classify.problem_type": problem,
                            "training.max_steps": 150})
    before, after = metrics["before"], metrics["after"]
    config = json.loads((run / "model" / "config.json").read_text())
    if problem == "multi_label":
        assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 3
        assert after["f1_micro"] > before["f1_micro"] and after["f1_micro"] > 0.8, (before, after)
        assert set(after["samples"][0]["scores"]) == {"fast", "neg", "pos"}
    else:
        assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
        assert after["mse"] < before["mse"] / 4 and after["pearson"] > 0.9, (before, after)
        assert after["samples"][0]["value"] > 0 > after["samples"][1]["value"]
