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
