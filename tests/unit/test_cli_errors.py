"""Bad input at the command line: one sentence, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
import yaml

from lmtune.cli import main

from ..helpers import assert_one_sentence, make_documents, write_text_records


def base_recipe(data_path: str, **training) -> dict:
    return {
        "task": "clm",
        "name": "bad",
        "data": {"train": {"path": data_path}, "block_size": 16},
        "tokenizer": {"train": True, "vocab_size": 300, "min_frequency": 1},
        "model": {"from_scratch": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
        "training": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "save_strategy": "no", **training},
    }


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_text_records(path, make_documents(40, seed=2))
    return path


def run_cli(capsys, argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err




CASES = {
    "missing data file": ({"data.train.path": "/nope/missing.jsonl"}, ["'/nope/missing.jsonl' does not exist"]),
    "empty after keyword filter": ({"data.train.keywords": ["zzqqxx"]}, ["empty after the keyword filter"]),
    "text field absent": ({"data.train.text_field": "body"}, ["no field 'body'", "fields: text"]),
    "negative learning rate": ({"training.learning_rate": -1}, ["training.learning_rate"]),
    "vocab too small": ({"tokenizer.vocab_size": 10}, ["vocab_size 10 is too small"]),
    "unknown key": ({"training.epochs": 3}, ["unknown key 'training.epochs'"]),
    "block larger than positions": ({"model.from_scratch.n_positions": 8}, ["block_size 16 exceeds"]),
    "block larger than corpus": ({"data.block_size": 100000, "model.from_scratch.n_positions": 100000},
                                 ["no full block of 100000 tokens"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_input(case, tmp_path, docs, capsys):
    changes, fragments = CASES[case]
    recipe = base_recipe(str(docs))
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "runs" / "bad"
    assert_one_sentence(*run_cli(capsys, ["train", path, "--output", out]), *fragments)
    assert not out.exists() and not (out.parent / ".bad.partial").exists()


def test_output_path_that_is_a_file(tmp_path, docs, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(str(docs))))
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert_one_sentence(*run_cli(capsys, ["train", path, "--output", blocker]), "is a file")
    assert_one_sentence(*run_cli(capsys, ["train", path, "--output", blocker / "run"]), "is a file")
    assert blocker.read_text() == "keep me"


def test_undecodable_files_are_skipped_counted_and_reported(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(make_documents(30, seed=9)):
        (folder / f"{i}.txt").write_text(doc)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(str(folder))))
    code, err = run_cli(capsys, ["train", path, "--output", tmp_path / "run"])
    assert code == 0, err
    assert "1 skipped as not UTF-8" in err and "latin1.txt" in err


@pytest.mark.parametrize("argv,fragment", [
    (["predict", "/nope/run", "hello"], "'/nope/run'"),
    (["predict", "."], "no prompt given"),
    (["eval", "/nope/run", "--data", "x.txt"], "'/nope/run'"),
    (["train"], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
    (["eval", "x", "--data", "y", "--block-size", "0"], "--block-size must be positive"),
    (["train", "/nope/recipe.yaml"], "does not exist"),
])
def test_bad_command_lines(argv, fragment, capsys):
    assert_one_sentence(*run_cli(capsys, argv), fragment)


# --------------------------------------------------------------------------------------------------
# Every verb that writes: it replaces only what it wrote, and never writes into what it reads


def writing_verbs() -> set[str]:
    """The verbs (and `tokenizer train`) whose parser has an output option."""
    import argparse

    from lmtune.cli import build_parser

    found = set()

    def walk(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix}{name} ")
            elif {"--out", "--output"} & set(action.option_strings):
                found.add(prefix.strip())

    walk(build_parser())
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run dir of a tiny causal LM, and its training data."""
    tmp = tmp_path_factory.mktemp("writers")
    data = tmp / "docs.jsonl"
    write_text_records(data, make_documents(40, seed=2))
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(str(data))))
    assert main(["train", str(recipe), "--output", str(tmp / "run")]) == 0
    return tmp, tmp / "run", data, recipe


def user_files(tmp) -> dict:
    """A folder and a file of the user's, with content lmtune must leave alone."""
    (tmp / "mine").mkdir(exist_ok=True)
    (tmp / "mine" / "notes.txt").write_text("the user's notes")
    (tmp / "page.html").write_text("<html>the user's page</html>")
    return {"folder": tmp / "mine", "file": tmp / "page.html"}


# verb -> (argv that writes over something of the user's, argv that writes into its own input)
SCENARIOS = {
    "train": (lambda t, run, data, recipe, mine: ["train", recipe, "--output", mine["folder"], "--overwrite"],
              lambda t, run, data, recipe, mine: ["train", recipe, "--output", data.parent, "--overwrite"]),
    "export": (lambda t, run, data, recipe, mine: ["export", run, "--out", mine["folder"], "--overwrite"],
               lambda t, run, data, recipe, mine: ["export", run, "--out", run / "model", "--overwrite"]),
    "tokenizer train": (lambda t, run, data, recipe, mine: ["tokenizer", "train", "--data", data, "--out",
                                                            mine["folder"], "--overwrite", "--vocab-size", "300"],
                        lambda t, run, data, recipe, mine: ["tokenizer", "train", "--data", data.parent, "--out",
                                                            data.parent / "tok", "--vocab-size", "300"]),
    "report": (lambda t, run, data, recipe, mine: ["report", run, "--out", mine["file"]],
               lambda t, run, data, recipe, mine: ["report", run, "--out", run / "config.yaml"]),
}


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"dir" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("verb", sorted(SCENARIOS))
@pytest.mark.parametrize("scenario", ["over the user's files", "into its own input"])
def test_every_verb_that_writes_replaces_only_its_own_and_not_its_input(finished, verb, scenario, capsys):
    assert writing_verbs() == set(SCENARIOS), "a verb that writes has no scenarios here"
    tmp, run, data, recipe = finished
    mine = user_files(tmp)
    build = SCENARIOS[verb][0 if scenario == "over the user's files" else 1]
    before = snapshot(tmp)
    capsys.readouterr()
    code = main([str(a) for a in build(tmp, run, data, recipe, mine)])
    assert_one_sentence(code, capsys.readouterr().err)
    assert snapshot(tmp) == before
