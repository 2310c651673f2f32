"""Progress without a terminal: plain log lines for long steps, never bar characters."""

from __future__ import annotations

import logging

from lmtune import progress as progress_module
from lmtune.progress import progress


def test_without_a_terminal_a_long_step_logs_plain_lines_with_its_share(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)  # every item counts as "long"
    with caplog.at_level(logging.INFO, logger="lmtune"):
        assert list(progress(iter(range(4)), "evaluating", total=4, unit="batches")) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("evaluating: 1 of 4 (25%) batches") and lines[-1].startswith("evaluating: 4 of 4")
    assert all("\r" not in line and "|" not in line for line in lines)


def test_a_quick_step_says_nothing_and_weights_count_units(caplog):
    with caplog.at_level(logging.INFO, logger="lmtune"):
        batches = list(progress([["a", "b"], ["c"]], "tokenizing", total=3, unit="docs", weight=len))
    assert batches == [["a", "b"], ["c"]] and not caplog.records


def test_a_training_run_without_a_terminal_prints_no_bar(tmp_path, capsys):
    from lmtune.cli import main

    from ..helpers import make_documents, write_text_records
    from ..helpers import tiny_recipe

    data = tmp_path / "d.jsonl"
    write_text_records(data, make_documents(60, seed=1))
    recipe = tiny_recipe(tmp_path, data, **{"training.max_steps": 3, "training.save_strategy": "no",
                                            "generation.prompts": []})
    assert main(["train", str(recipe), "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s]" not in err and "lmtune: estimate:" in err
