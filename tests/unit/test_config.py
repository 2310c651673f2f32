"""Recipe schema: defaults, overrides, and errors that name the key and the fix."""

from __future__ import annotations


import pytest
import yaml

from lmtune.config import RecipeConfig, apply_overrides, load_recipe, parse_override, validate_recipe
from lmtune.errors import InputError

MINIMAL = {
    "task": "clm",
    "name": "t",
    "model": {"from_scratch": {"n_layer": 2, "n_head": 2, "n_embd": 32}},
    "tokenizer": {"train": True, "vocab_size": 500},
    "data": {"train": {"path": "docs.txt"}, "block_size": 32},
}


def write(tmp_path, obj) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return str(path)


def error_of(tmp_path, obj, overrides=None) -> str:
    with pytest.raises(InputError) as exc:
        load_recipe(write(tmp_path, obj), overrides)
    return str(exc.value)


def test_minimal_recipe_gets_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, MINIMAL))
    assert cfg.training.learning_rate == 5e-4
    assert cfg.data.packing == "concat"
    assert cfg.loss.type == "cross_entropy"
    assert cfg.training.precision == "auto"


def test_unknown_key_names_closest_valid_one(tmp_path):
    raw = {**MINIMAL, "training": {"learnig_rate": 1e-3}}
    msg = error_of(tmp_path, raw)
    assert "training.learnig_rate" in msg and "did you mean 'training.learning_rate'" in msg


def test_unknown_top_level_section(tmp_path):
    raw = {**MINIMAL, "trainng": {}}
    assert "did you mean 'training'" in error_of(tmp_path, raw)


def test_all_problems_reported_together(tmp_path):
    raw = {**MINIMAL, "training": {"learning_rate": -1, "batch_size": 0, "warmpu_steps": 3}}
    msg = error_of(tmp_path, raw)
    assert "training.learning_rate" in msg
    assert "training.batch_size" in msg
    assert "warmup_steps" in msg
    assert msg.count(";") >= 2


def test_vocab_too_small_and_block_beyond_positions(tmp_path):
    raw = {**MINIMAL, "tokenizer": {"train": True, "vocab_size": 100}}
    assert "vocab_size 100 is too small" in error_of(tmp_path, raw)
    raw = {**MINIMAL, "model": {"from_scratch": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 16}}}
    assert "block_size 32 exceeds" in error_of(tmp_path, raw)


def test_model_origin_must_be_exactly_one(tmp_path):
    raw = {**MINIMAL, "model": {"name_or_path": "x", "from_scratch": {}}}
    assert "exactly one" in error_of(tmp_path, raw)


def test_wrong_types_are_reported_with_the_value(tmp_path):
    raw = {**MINIMAL, "training": {"max_steps": "many"}}
    msg = error_of(tmp_path, raw)
    assert "training.max_steps" in msg and "'many'" in msg


def test_overrides_are_parsed_as_yaml_and_win(tmp_path):
    cfg = load_recipe(write(tmp_path, MINIMAL), ["training.max_steps=7", "data.train.keywords=[a, b]",
                                                  "training.learning_rate=1e-3"])
    assert cfg.training.max_steps == 7
    assert cfg.data.train.keywords == ["a", "b"]
    assert cfg.training.learning_rate == pytest.approx(1e-3)
    assert "did you mean 'training.max_steps'" in error_of(tmp_path, MINIMAL, ["training.max_stpes=3"])


def test_parse_override_rejects_missing_equals():
    with pytest.raises(InputError, match="key=value"):
        parse_override("training.max_steps")
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_bad_yaml_and_missing_and_empty_files(tmp_path):
    assert "not valid YAML at line" in error_of(tmp_path, "task: clm\n  name: [oops\n")
    assert "is empty" in error_of(tmp_path, "")
    with pytest.raises(InputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="mapping"):
        validate_recipe([1, 2])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_recipe(write(tmp_path, MINIMAL))
    again = validate_recipe(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_python_code_source_defaults_to_course_keywords():
    cfg = validate_recipe({**MINIMAL, "data": {"train": {"type": "python-code"}}})
    assert cfg.data.train.keywords == ["pandas", "sklearn", "matplotlib", "seaborn"]


def test_schema_rejects_pretrained_model_with_tokenizer_training():
    with pytest.raises(InputError, match="tokenizer.train needs model.from_scratch"):
        validate_recipe({**MINIMAL, "model": {"name_or_path": "gpt2"}})
    assert isinstance(RecipeConfig.model_json_schema(), dict)


def test_yaml_reads_only_true_and_false_as_booleans(tmp_path):
    # YAML 1.1 would read `no` as False and break `save_strategy: no`.
    path = tmp_path / "r.yaml"
    path.write_text("task: clm\nname: r\nmodel: {name_or_path: gpt2}\ndata: {train: {path: x.txt}}\n"
                    "training: {save_strategy: no, eval_strategy: no}\ntokenizer: {train: false}\n")
    cfg = load_recipe(path, ["training.save_strategy=no"])
    assert (cfg.training.save_strategy, cfg.training.eval_strategy, cfg.tokenizer.train) == ("no", "no", False)


# --------------------------------------------------------------------------------------------------
# Loading that refuses early and cheaply


def recipe_file(tmp_path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(path: str) -> str:
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    return str(exc.value)


def test_a_section_or_key_written_twice_is_refused_with_both_lines(tmp_path):
    text = "task: clm\nname: x\ntraining:\n  max_steps: 3\ndata:\n  train: {path: a.txt}\ntraining:\n  seed: 3\n"
    assert "key 'training' is written twice (lines 3 and 7)" in load_error(recipe_file(tmp_path, text))
    text = "task: clm\nname: x\ntraining:\n  max_steps: 3\n  max_steps: 4\n"
    assert "key 'max_steps' is written twice (lines 4 and 5)" in load_error(recipe_file(tmp_path, text))
    merged = "base: &b {max_steps: 3}\ntask: clm\nname: x\ntraining:\n  <<: *b\n  max_steps: 4\n"
    assert "written twice" not in load_error(recipe_file(tmp_path, merged))  # a merge key may be overridden


def test_alias_bombs_and_huge_files_are_refused_before_they_cost_anything(tmp_path):
    import time

    levels = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    start = time.perf_counter()
    message = load_error(recipe_file(tmp_path, "task: clm\n" + "\n".join(levels) + "\n"))
    assert "expands to more than 100,000 values" in message and time.perf_counter() - start < 2
    big = recipe_file(tmp_path, "task: clm\n" + "# padding\n" * 200_000, "big.yaml")
    assert "is 2.0 MB, not a YAML recipe" in load_error(big)


def test_infinite_and_absurd_numbers_are_refused_in_plain_words(tmp_path):
    text = yaml.safe_dump(MINIMAL) + "training:\n  learning_rate: .inf\n  batch_size: 100000000000\n  seed: -1\n"
    message = load_error(recipe_file(tmp_path, text))
    assert "'training.learning_rate': must be a finite number (not inf or nan) (got inf)" in message
    assert "'training.batch_size': must be at most 1048576" in message and "'training.seed': must be at least 0" in message
    for value in (".nan", "1e400", "-.inf"):
        assert "finite" in error_of(tmp_path, {**MINIMAL, "lora": {"alpha": yaml.safe_load(value)}})


def test_messages_name_no_internal_classes_and_shorten_values(tmp_path):
    long_value = "x" * 5000
    message = error_of(tmp_path, {**MINIMAL, "data": "a section written as text " + long_value,
                                  "name": "-bad name " + long_value})
    assert "SourceConfig" not in message and "DataConfig" not in message and "^[A-Za-z0-9]" not in message
    assert "'data': must be a mapping of settings" in message and "must start with a letter or digit" in message
    assert len(message) < 400 and "…" in message


def test_yaml_errors_point_at_the_line_that_is_wrong(tmp_path):
    text = "task: clm\nname: x\ndata\n  train: {path: a}\nmodel: {}\n"  # line 3 lacks its colon
    assert "is not valid YAML at line 3" in load_error(recipe_file(tmp_path, text))


def test_a_file_that_is_not_a_recipe_is_named_as_such(tmp_path):
    assert "is a .jsonl file, not a YAML recipe" in load_error(recipe_file(tmp_path, '{"text": "a"}\n', "d.jsonl"))
    assert "is not a recipe: it has none of the sections" in load_error(
        recipe_file(tmp_path, '{"text": "a", "label": 1}', "d.json"))
    assert "is a folder" in load_error(str(tmp_path))


def test_a_model_too_big_for_this_machine_is_refused_before_it_is_built():
    from transformers import GPT2Config

    from lmtune.modeling import check_fits_in_memory

    config = GPT2Config(n_embd=65536, n_layer=1024, n_head=64, vocab_size=50000, n_positions=2048)
    with pytest.raises(InputError, match=r"about .*M parameters needs about .* GiB to train .* GiB free"):
        check_fits_in_memory(config)
    check_fits_in_memory(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=500, n_positions=64))
