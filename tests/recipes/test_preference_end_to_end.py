"""Reward models, DPO and RL against a reward model: the preference components on their own, then tiny
GPT-2s trained for real through the CLI on a synthetic preference -- polite replies preferred to rude
ones -- and the shipped InstructGPT chain recipe run end to end on that data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmtune.cli import main
from lmtune.config import validate_recipe
from lmtune.errors import InputError
from lmtune.tasks.preference import (
    PreferencePair,
    dpo_metrics,
    encode_for_reward,
    read_pairs,
    reply_logps,
    split_shared_prompt,
    to_preference_pair,
    tokenize_preference,
)

from ..helpers import assert_one_sentence, assert_report, save_tiny_gpt2, with_changes, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = ["what time is it", "where is the station", "can you help me", "how do I cook rice",
             "what is the weather", "which bus goes downtown", "how old is the tree", "who wrote this book"]
POLITE = ["Of course, I am glad to help, thank you for asking.", "Certainly, happy to help, please ask again.",
          "Sure, thank you, I will gladly help you."]
RUDE = ["No. Go away, stupid.", "Whatever, figure it out yourself, idiot.", "Stop bothering me, stupid."]


def dialogue_rows(n: int, seed: int) -> list[dict]:
    """HH-RLHF's form: two whole dialogues that differ in the last reply."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"\n\nHuman: {rng.choice(QUESTIONS)}?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {rng.choice(POLITE)}", "rejected": f"{prompt} {rng.choice(RUDE)}"})
    return rows


def preference_cfg(task="reward", **preference):
    return validate_recipe({"task": task, "name": "t", "model": {"name_or_path": "x"},
                            "data": {"train": {"path": "x.jsonl"}}, "preference": preference})


# --------------------------------------------------------------------------------------------------
# Components


def test_shared_prompt_of_two_dialogues_ends_before_the_replies_words():
    prompt, chosen, rejected = split_shared_prompt("\n\nHuman: hi?\n\nAssistant: Sure, hello.",
                                                   "\n\nHuman: hi?\n\nAssistant: Surely not.")
    # "Sure" and "Surely" begin alike: the cut backs off to the word boundary, the space goes with the reply
    assert (prompt, chosen, rejected) == ("\n\nHuman: hi?\n\nAssistant:", " Sure, hello.", " Surely not.")
    # a whole word both replies share is shared text, which DPO's log-ratio cancels anyway
    assert split_shared_prompt("Q? Yes, a.", "Q? Yes, b.") == ("Q? Yes,", " a.", " b.")
    assert split_shared_prompt("same text", "same text") == ("same text", "", "")


def test_explicit_prompts_are_rendered_with_the_template_and_a_missing_field_is_named():
    cfg = preference_cfg(prompt_template="Q: {question}\nA:")
    pair = to_preference_pair({"question": "2+2?", "chosen": " 4", "rejected": " 5"}, cfg, "line 3", "data.train")
    assert pair == PreferencePair("Q: 2+2?\nA:", " 4", " 5")
    with pytest.raises(InputError) as err:
        to_preference_pair({"query": "2+2?", "chosen": " 4", "rejected": " 5"}, cfg, "line 3", "data.train")
    assert "line 3 has no field 'question'" in str(err.value) and "prompt_template" in str(err.value)
    plain = to_preference_pair({"prompt": "Hi.", "chosen": " a", "rejected": " b"}, preference_cfg(), "l", "w")
    assert plain == PreferencePair("Hi.", " a", " b")


def test_a_policy_from_an_sft_run_keeps_its_prompt_template(tmp_path, world):
    from lmtune.hub import run_model_folder
    from lmtune.tasks.preference import inherit_prompt_template

    sft = validate_recipe({"task": "sft", "name": "s", "model": {"name_or_path": "x"},
                           "data": {"train": {"path": "x.jsonl"}},
                           "sft": {"template": "Q: {question}\nA: {answer}", "response_field": "answer"}})
    run = tmp_path / "sft-run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(sft.to_yaml())
    (run / "model" / "config.json").write_text((world[0] / "base" / "config.json").read_text())
    assert run_model_folder(str(run)) == str(run / "model")
    cfg = validate_recipe({"task": "dpo", "name": "d", "model": {"name_or_path": str(run)},
                           "data": {"train": {"path": "x.jsonl"}}})
    inherit_prompt_template(cfg)
    assert cfg.preference.prompt_template == "Q: {question}\nA: "
    mine = cfg.model_copy(deep=True)
    mine.preference.prompt_template = "{prompt}"
    inherit_prompt_template(mine)  # a template the recipe sets wins
    assert mine.preference.prompt_template == "{prompt}"


def test_pairs_whose_chosen_equals_rejected_are_counted_and_dropped(tmp_path, caplog):
    from lmtune.config import SourceConfig

    rows = dialogue_rows(10, seed=0)
    rows[3]["rejected"] = rows[3]["chosen"]
    src = SourceConfig(path=str(write_jsonl(tmp_path / "p.jsonl", rows)))
    with caplog.at_level("WARNING", logger="lmtune"):
        pairs = read_pairs(src, preference_cfg(), "data.train")
    assert len(pairs) == 9 and "dropped 1 of 10 pairs" in caplog.text
    src = SourceConfig(path=str(write_jsonl(tmp_path / "same.jsonl", [{"chosen": "a", "rejected": "a"}] * 3)))
    with pytest.raises(InputError, match="every pair the chosen reply equals the rejected one"):
        read_pairs(src, preference_cfg(), "data.train")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic preference data and a tiny 'pretrained' GPT-2 (random weights, BPE trained on the texts)."""
    from lmtune.tokenizer import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("preference-e2e")
    train, val = dialogue_rows(400, seed=0), dialogue_rows(100, seed=1)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "val.jsonl", val)
    # Demonstrations of both kinds: a policy tuned on them answers politely about half the time.
    write_jsonl(tmp / "mixed.jsonl", [{"chosen": r[k]} for r in train for k in ("chosen", "rejected")])
    texts = [r[k] for r in train for k in ("chosen", "rejected")]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1, model_max_length=128)
    save_tiny_gpt2(tmp / "base", tokenizer)
    return tmp, tokenizer


def test_reward_encoding_keeps_the_end_and_closes_with_eos(world):
    _, tokenizer = world
    text = "\n\nHuman: what time is it?\n\nAssistant: Of course, I am glad to help, thank you for asking."
    full = tokenizer(text)["input_ids"]
    [ids] = encode_for_reward(tokenizer, [text], max_length=8)
    assert ids == full[-7:] + [tokenizer.eos_token_id]  # the reply's end survives a cut from the left
    [short] = encode_for_reward(tokenizer, ["Sure."], max_length=8)
    assert short == tokenizer("Sure.")["input_ids"] + [tokenizer.eos_token_id]


def test_bert_style_reward_encoding_keeps_its_own_closing_token():
    from lmtune.tokenizer import train_tokenizer

    texts = [r["chosen"] for r in dialogue_rows(50, seed=0)]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1, style="bert", model_max_length=64)
    [ids] = encode_for_reward(tokenizer, [texts[0]], max_length=6)
    assert len(ids) == 6 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids[1:-1] == tokenizer(texts[0], add_special_tokens=False)["input_ids"][-4:]


def test_dpo_features_cut_the_prompt_from_the_left_and_end_replies_with_eos(world):
    _, tokenizer = world
    pair = PreferencePair("\n\nHuman: how do I cook rice?\n\nAssistant:", " Sure, thank you.", " No. Go away.")
    [f] = tokenize_preference(tokenizer, [pair], max_length=64, max_prompt_length=4)
    assert f["prompt_ids"] == tokenizer(pair.prompt)["input_ids"][-4:]
    assert f["chosen_ids"] == tokenizer(pair.chosen)["input_ids"] + [tokenizer.eos_token_id]
    [g] = tokenize_preference(tokenizer, [pair], max_length=7, max_prompt_length=4)
    assert len(g["prompt_ids"]) + len(g["chosen_ids"]) == 7 and g["chosen_ids"] == f["chosen_ids"][:3]


def test_reply_log_probabilities_match_a_direct_computation(world):
    from transformers import AutoModelForCausalLM

    tmp, tokenizer = world
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "base"))
    pairs = [PreferencePair("\n\nHuman: hi?\n\nAssistant:", " Sure.", " No, go away now."),
             PreferencePair("\n\nHuman: what is the weather?\n\nAssistant:", " Certainly, happy to help.", " No.")]
    features = tokenize_preference(tokenizer, pairs, 64, 64)
    got = reply_logps(model, features, "rejected_ids", tokenizer.pad_token_id, batch_size=2)  # padded batch
    for f, value in zip(features, got):
        ids = torch.tensor([f["prompt_ids"] + f["rejected_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        n = len(f["prompt_ids"])
        expected = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
        assert value == pytest.approx(expected, abs=1e-4)


def test_dpo_metrics_pin_the_implicit_reward():
    chosen, rejected = np.array([-10.0, -20.0]), np.array([-12.0, -15.0])
    m = dpo_metrics(chosen, rejected, 0.5, {"chosen": np.array([-11.0, -20.0]), "rejected": np.array([-12.0, -14.0])})
    # rewards: 0.5 * ((-10 + 11) - (-12 + 12)) = 0.5 and 0.5 * ((-20 + 20) - (-15 + 14)) = 0.5
    assert m["reward_margin"] == pytest.approx(0.5) and m["reward_accuracy"] == 1.0
    assert m["logp_margin"] == pytest.approx((2 - 5) / 2) and m["logp_accuracy"] == 0.5


# --------------------------------------------------------------------------------------------------
# Real runs through the CLI


def recipe(world, task, name, model, **changes):
    tmp, _ = world
    r = {"task": task, "name": name, "model": {"name_or_path": str(model)},
         "data": {"train": {"path": str(tmp / "train.jsonl")}, "validation": {"path": str(tmp / "val.jsonl")}},
         "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 40, "logging_steps": 20,
                      "save_strategy": "no", "precision": "fp32", "seed": 1}}
    if task != "sft":  # a recipe may only carry the sections its task reads
        r["preference"] = {"max_length": 64}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_changes(r, changes)))
    return path


def train(world, task, name, model, **changes):
    run = world[0] / "runs" / name
    assert main(["train", str(recipe(world, task, name, model, **changes)), "--output", str(run)]) == 0
    return run, json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reward_run(world):
    return train(world, "reward", "reward", world[0] / "base", **{
        "preference.samples": [{"prompt": "\n\nHuman: hi?\n\nAssistant:", "chosen": " Sure, thank you.",
                                "rejected": " No, stupid."}]})


@pytest.fixture(scope="module")
def mixed_policy(world):
    """A policy tuned on polite and rude replies alike (transcript SFT): the start RL improves on."""
    run, _ = train(world, "sft", "mixed-sft", world[0] / "base", **{
        "data.train.path": str(world[0] / "mixed.jsonl"), "data.validation.path": str(world[0] / "mixed.jsonl"),
        "sft": {"format": "transcript", "max_length": 64, "max_validation_examples": 50},
        "training.max_steps": 120, "training.learning_rate": 3e-3})
    return run


def test_reward_model_learns_the_preference_on_held_out_pairs(reward_run, capsys):
    run, metrics = reward_run
    before, after = metrics["before"], metrics["after"]
    assert before["accuracy"] < 0.75 and after["accuracy"] >= 0.95 and after["margin"] > 1, (before, after)
    [sample] = after["samples"]
    assert sample["reward_chosen"] > sample["reward_rejected"]
    page = assert_report(run, ["accuracy", "margin"], "Sure, thank you.", "No, stupid.")
    assert "prefers chosen ✓" in page and 'alt="reward by step"' in page  # TRL's min / mean / max reward
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(run / "model"))
    assert config.num_labels == 1 and config.pad_token_id is not None
    capsys.readouterr()
    assert main(["predict", str(run), " Certainly, happy to help, please ask again.", " Stop bothering me, stupid.", "--pair",
                 "--prompt", "\n\nHuman: where is the station?\n\nAssistant:"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["first_preferred_probability"] > 0.9 and result["rewards"][0] > result["rewards"][1]


def test_dpo_raises_the_margin_of_chosen_over_rejected(world, capsys):
    run, metrics = train(world, "dpo", "dpo", world[0] / "base", **{
        "training.learning_rate": 1e-3, "preference.prompt_template": "{prompt}",
        "preference.samples": [{"prompt": "\n\nHuman: can you help me?\n\nAssistant:"}]})
    before, after = metrics["before"], metrics["after"]
    assert before["reward_margin"] == 0 and after["reward_margin"] > 1 and after["reward_accuracy"] >= 0.95
    assert after["logp_margin"] > before["logp_margin"] + 10, (before, after)
    page = assert_report(run, ["reward_accuracy", "reward_margin", "logp_margin"], "Human: can you help me?")
    assert 'alt="rewards by step"' in page  # TRL's implicit rewards of chosen and rejected
    capsys.readouterr()
    assert main(["predict", str(run), "\n\nHuman: can you help me?\n\nAssistant:", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "\n\nHuman: can you help me?\n\nAssistant:" and "response" in out


def test_dpo_with_lora_uses_the_adapter_free_base_as_reference(world):
    run, metrics = train(world, "dpo", "dpo-lora", world[0] / "base", **{
        "training.mode": "lora", "training.max_steps": 15, "training.learning_rate": 5e-3,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    assert metrics["parameters"]["trainable_percent"] < 50
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "model" / "config.json").is_file()
    assert metrics["after"]["reward_margin"] > 0.1 and metrics["after"]["logp_margin"] > metrics["before"]["logp_margin"]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rl_against_the_reward_model_raises_mean_reward(world, reward_run, mixed_policy, algorithm, capsys):
    reward, _ = reward_run
    run, metrics = train(world, "rl", f"rl-{algorithm}", mixed_policy, **{
        "rl": {"reward_model": str(reward), "algorithm": algorithm, "num_generations": 4,
               "max_completion_length": 16, "eval_generations": 2, "beta": 0.02},
        "preference.max_validation_examples": 32, "training.max_steps": 30, "training.learning_rate": 1e-3})
    before, after = metrics["before"], metrics["after"]
    assert after["mean_reward"] > before["mean_reward"] + 1, (before, after)
    assert metrics["data"]["algorithm"] == algorithm
    assert_report(run, ["mean_reward", "reward_std"], "A completion sampled during evaluation",
                  after["example"]["completion"])


def test_rl_scores_text_with_a_reward_model_of_another_tokenizer(world, tmp_path):
    """A BERT-style reward model (WordPiece) judges a GPT-2 policy (byte-level BPE): text is re-tokenised."""
    from transformers import BertConfig, BertModel

    from lmtune.tokenizer import train_tokenizer

    tmp, _ = world
    texts = [r[k] for r in dialogue_rows(200, seed=0) for k in ("chosen", "rejected")]
    wordpiece = train_tokenizer(texts, vocab_size=300, min_frequency=1, style="bert", model_max_length=128)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(str(tmp_path / "bert"))
    wordpiece.save_pretrained(str(tmp_path / "bert"))
    reward, reward_metrics = train(world, "reward", "bert-reward", tmp_path / "bert", **{"training.max_steps": 30})
    assert reward_metrics["after"]["accuracy"] >= 0.9
    run, metrics = train(world, "rl", "rl-other-tokenizer", tmp / "base", **{
        "rl": {"reward_model": str(reward), "max_completion_length": 8, "eval_generations": 1},
        "preference.max_validation_examples": 8, "training.max_steps": 2})
    assert np.isfinite(metrics["after"]["mean_reward"]) and metrics["steps"] == 2


def test_chain_recipe_runs_pretraining_sft_reward_and_rl_and_keeps_finished_steps(world, tmp_path, capsys):
    """The shipped InstructGPT chain on the synthetic dialogues, every step tiny."""
    tmp, _ = world
    data = str(tmp / "train.jsonl")
    sets = []
    for step in ("pretrain", "sft", "reward", "rl"):
        sets += [f"{step}.data.train.path={data}", f"{step}.training.max_steps=4", f"{step}.training.save_steps=2"]
    sets += ["pretrain.tokenizer.vocab_size=300", "pretrain.tokenizer.min_frequency=1", "pretrain.data.block_size=32",
             "pretrain.model.from_scratch.n_embd=32", "pretrain.model.from_scratch.n_layer=1",
             "sft.sft.max_length=64", "reward.preference.max_length=64", "rl.preference.max_length=64",
             "rl.preference.max_prompt_length=32", "rl.rl.max_completion_length=8", "rl.preference.max_validation_examples=8",
             "rl.training.batch_size=4", "rl.rl.num_generations=2"]
    args = ["train", str(REPO / "recipes" / "instructgpt-hh-local.yaml"), "--output", str(tmp_path / "chain")]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["chain"]
    assert list(done) == ["pretrain", "sft", "reward", "rl"]
    for step, task in zip(done, ("clm", "sft", "reward", "rl")):
        metrics = json.loads((Path(done[step]) / "metrics.json").read_text())
        assert metrics["task"] == task and metrics["steps"] == 4
    rl_config = yaml.safe_load((Path(done["rl"]) / "config.yaml").read_text())
    assert rl_config["model"]["name_or_path"] == str(tmp_path / "chain" / "sft")
    assert rl_config["rl"]["reward_model"] == str(tmp_path / "chain" / "reward")
    capsys.readouterr()  # the transcript-format SFT run answers a dialogue after its reply marker
    assert main(["predict", done["sft"], "\n\nHuman: can you help me?", "--max-new-tokens", "4"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["prompt"] == "\n\nHuman: can you help me?\n\nAssistant:" and "response" in answer
    stamp = (Path(done["sft"]) / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0  # a second run keeps the finished steps
    assert (Path(done["sft"]) / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind, words", [
    ("template field missing", ["data.train", "has no field 'question'", "prompt_template"]),
    ("every pair equal", ["data.train", "chosen reply equals the rejected one"]),
    ("batch not whole groups", ["multiple of rl.num_generations"]),
    ("unknown step reference", ["${nope}", "not an earlier step"]),
])
def test_bad_input_stops_with_one_sentence(world, tmp_path, kind, words, capsys):
    tmp, _ = world
    if kind == "unknown step reference":
        chain = {"name": "c", "steps": [{"name": "a", "task": "dpo", "model": {"name_or_path": "${nope}"},
                                         "data": {"train": {"path": str(tmp / "train.jsonl")}}}]}
        path = tmp_path / "chain.yaml"
        path.write_text(yaml.safe_dump(chain))
    elif kind == "template field missing":
        path = recipe(world, "dpo", "bad", tmp / "base", **{"preference.prompt_template": "Q: {question}\nA:"})
    elif kind == "every pair equal":
        same = write_jsonl(tmp_path / "same.jsonl", [{"chosen": r["chosen"], "rejected": r["chosen"]}
                                                     for r in dialogue_rows(20, seed=2)])
        path = recipe(world, "reward", "bad", tmp / "base", **{"data.train.path": str(same)})
    else:
        path = recipe(world, "rl", "bad", tmp / "base", **{"rl": {"reward_model": "x", "num_generations": 3}})
    capsys.readouterr()
    code = main(["train", str(path), "--output", str(tmp_path / "run")])
    assert_one_sentence(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "run").exists()
