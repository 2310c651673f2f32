"""A tiny QA recipe run for real through the CLI: a BERT from scratch (WordPiece trained in the run) on
generated reading-comprehension data, split by article; F1 must rise far above the untrained model's,
the saved model must answer through plain transformers, `lmtune predict` must answer, and bad data
must stop with one sentence."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from lmtune.cli import main

from ..helpers import assert_report, with_changes

FILLER = "the model reads data and trains a small network on text so loss goes down while the tokenizer".split()
FACTS = {  # kind: (values, question template, sentence template)
    "colour": ("red green blue yellow purple orange", "What is the colour of the {}?", "The colour of the {} is {}."),
    "city": ("paris london rome madrid berlin vienna", "Where does the {} live?", "The {} lives in {}."),
    "fruit": ("apple banana cherry grape lemon mango", "Which fruit does the {} like?", "The {} likes the fruit {}."),
}
ANIMALS = "cat dog owl fox bear wolf horse mouse".split()


def reading_rows(n: int, seed: int, articles: int = 40, filler_words: int = 25) -> list[dict]:
    """Each context states two facts of different kinds among filler words; the question asks for
    one of them, so the answer depends on the question, not only on the context's shape."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        facts = []
        for kind in rng.sample(sorted(FACTS), 2):
            animal, value = rng.choice(ANIMALS), rng.choice(FACTS[kind][0].split())
            facts.append((kind, animal, value, FACTS[kind][2].format(animal, value)))

        def filler():
            return " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, filler_words))) + "."

        context = " ".join([filler(), facts[0][3], filler(), facts[1][3], filler()])
        kind, animal, value, sentence = rng.choice(facts)
        start = context.index(sentence) + sentence.rindex(value)
        rows.append({"id": f"q{i}", "title": f"article {rng.randrange(articles)}", "context": context,
                     "question": FACTS[kind][1].format(animal),
                     "answers": {"text": [value], "answer_start": [start]}})
    return rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qa_recipe(data, name="qa-tiny", **changes):
    recipe = {
        "task": "qa",
        "name": name,
        "data": {"train": {"path": str(data)}, "validation_fraction": 0.15},
        "tokenizer": {"train": True, "vocab_size": 400, "min_frequency": 1},
        "model": {"from_scratch": {"architecture": "bert", "n_layer": 2, "n_head": 2, "n_embd": 64}},
        "qa": {"max_length": 64, "stride": 16, "samples": [
            {"question": "Which fruit does the owl like?",
             "context": "The owl likes the fruit mango. The dog lives in rome."}]},
        "training": {"learning_rate": 3e-3, "batch_size": 16, "max_steps": 300, "logging_steps": 50,
                     "warmup_steps": 20, "save_strategy": "no", "precision": "fp32", "seed": 1},
    }
    return with_changes(recipe, changes)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qa-e2e")
    path = tmp / "reading.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reading_rows(1200, seed=0)) + "\n")
    return tmp, path


@pytest.fixture(scope="module")
def qa_run(data):
    tmp, path = data
    recipe = tmp / "qa.yaml"
    recipe.write_text(yaml.safe_dump(qa_recipe(path)))
    run = tmp / "runs" / "qa"
    assert main(["train", str(recipe), "--output", str(run)]) == 0
    return run


def test_f1_rises_far_above_the_untrained_model(qa_run):
    metrics = json.loads((qa_run / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert metrics["task"] == "qa" and before["questions"] == after["questions"] > 100
    assert before["f1"] < 20, before
    assert after["f1"] > before["f1"] + 30 and after["exact_match"] > 35, (before, after)
    info = metrics["data"]
    assert info["train_windows"] > info["train_examples"] and info["train_windows_without_answer"] > 0
    assert info["validation_windows"] == before["windows"] > info["validation_examples"]
    [sample] = metrics["samples"]
    assert set(sample) == {"question", "answer", "score", "start", "end"}
    config = json.loads((qa_run / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForQuestionAnswering"]
    page = assert_report(qa_run, ["exact_match", "f1"], "Which fruit does the owl like?")
    assert f"{before['questions']} questions" in page and "answer · score" in page


def test_validation_articles_are_not_trained_on(qa_run, data):
    _, path = data
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    metrics = json.loads((qa_run / "metrics.json").read_text())
    titles = {r["title"] for r in rows}
    assert 1 <= metrics["data"]["validation_articles"] < len(titles)
    assert metrics["data"]["train_examples"] + metrics["data"]["validation_examples"] == len(rows)


def test_saved_model_answers_with_plain_transformers(qa_run):
    # transformers 5 dropped pipeline("question-answering"); the folder must still load and answer
    # through the plain Auto classes, without lmtune.
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(str(qa_run / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(qa_run / "model"))
    right = 0
    rows = reading_rows(40, seed=99, filler_words=6)  # short enough for one window of the model's 64 positions
    for row in rows:
        enc = tokenizer(row["question"], row["context"], return_tensors="pt", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            out = model(**enc)
        s, e = int(out.start_logits.argmax()), int(out.end_logits.argmax())
        right += row["context"][int(offsets[s][0]) : int(offsets[e][1])] == row["answers"]["text"][0]
    assert right >= 12, right  # an untrained model finds almost none of 40


def test_predict_answers_questions(qa_run, tmp_path, capsys):
    capsys.readouterr()
    context = "The fox likes the fruit cherry. It reads data. The bear lives in vienna."
    assert main(["predict", str(qa_run), "--question", "Which fruit does the fox like?", "--context", context]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(line) == {"question", "answer", "score", "start", "end"}
    assert context[line["start"] : line["end"]] == line["answer"] != ""

    many = tmp_path / "qs.jsonl"
    many.write_text("\n".join(json.dumps({"question": r["question"], "context": r["context"]})
                              for r in reading_rows(5, seed=7)) + "\n")
    assert main(["predict", str(qa_run), "--file", str(many)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(x["answer"] for x in lines)


@pytest.mark.parametrize(("args", "words"), [
    (["hello"], "not prompts"),
    (["--question", "Where?"], "both --question and --context"),
    (["--file", "missing.jsonl"], "does not exist"),
])
def test_predict_bad_input(qa_run, args, words, capsys):
    capsys.readouterr()
    assert main(["predict", str(qa_run), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def bad_rows(kind: str) -> list[dict]:
    rows = reading_rows(60, seed=3)
    if kind == "answer_start":
        for r in rows[:10]:
            r["answers"]["answer_start"] = [r["answers"]["answer_start"][0] + 1]
    elif kind == "missing field":
        del rows[5]["question"]
    elif kind == "empty context":
        rows[7]["context"] = ""
    elif kind == "long question":
        rows[2]["question"] = "what " * 80
    return rows


@pytest.mark.parametrize(("kind", "words"), [
    ("answer_start", ["answer_start does not point at the answer", "in 10 of 60", "qa.max_bad_answer_fraction"]),
    ("missing field", ["line 6", "no field 'question'"]),
    ("empty context", ["line 8", "empty context"]),
    ("long question", ["question 'q2'", "tokens long", "qa.max_length 64"]),
])
def test_bad_data_stops_with_one_sentence_and_writes_nothing(tmp_path, kind, words, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in bad_rows(kind)) + "\n")
    recipe = tmp_path / "qa.yaml"
    recipe.write_text(yaml.safe_dump(qa_recipe(path, **{"training.max_steps": 1})))
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    # progress lines may come first; the error is one line, the last
    errors = [line for line in err.splitlines() if line.startswith("lmtune: error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()
