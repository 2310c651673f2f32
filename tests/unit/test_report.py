"""report.html from hand-built run dirs: metrics.json / log.jsonl / config.yaml with the key structure each
task family's evaluate / samples / the pipeline write (copied from real tiny runs of the end-to-end
tests), plus the partial, resumed and broken cases."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
import yaml

from lmtune import report
from lmtune.cli import main

from ..helpers import PNG_SIGNATURE, assert_metric_rows, assert_one_sentence, assert_valid_pngs, pngs

# --------------------------------------------------------------------------------------------------
# Run dirs as the pipeline leaves them


def log_lines(steps=60, every=10, eval_every=None, tokens_per_step=None, lr=3e-3, start_loss=10.0, seconds=0.02):
    """log.jsonl records as JsonlLogCallback writes them: training lines, evaluation lines, the final summary."""
    out = []
    for step in range(every, steps + 1, every):
        r = {"step": step, "epoch": step / 34, "time_s": round(0.3 + step * seconds, 3),
             "loss": start_loss * 0.9 ** (step / every), "grad_norm": 2.0 / (1 + step / every),
             "learning_rate": lr * (1 - step / steps)}
        if tokens_per_step:
            r.update(num_input_tokens_seen=step * tokens_per_step, train_runtime=round(step * seconds, 4),
                     train_tokens_per_second=round(tokens_per_step / seconds, 3))
        out.append(r)
        if eval_every and step % eval_every == 0:
            out.append({"step": step, "epoch": step / 34, "time_s": round(0.35 + step * seconds, 3),
                        "eval_loss": start_loss * 0.8 ** (step / every), "eval_runtime": 0.05,
                        "eval_samples_per_second": 2000.0, "eval_steps_per_second": 100.0})
    out.append({"step": steps, "epoch": steps / 34, "time_s": round(0.4 + steps * seconds, 3),
                "train_runtime": steps * seconds, "train_samples_per_second": 8 / seconds,
                "train_steps_per_second": 1 / seconds, "total_flos": 9205628928.0, "train_loss": 7.5})
    return out


def config_for(task, **extra):
    cfg = {"task": task, "name": "tiny", "model": {"name_or_path": None, "from_scratch": {
        "architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0}},
        "data": {"train": {"type": "auto", "path": "/data/docs.jsonl"}, "block_size": 32},
        "training": {"mode": "full", "learning_rate": 0.003, "batch_size": 8, "gradient_accumulation_steps": 1,
                     "max_steps": 60, "precision": "fp32", "seed": 1}}
    cfg.update(extra)
    return cfg


def base_metrics(task, before, after, samples, data):
    return {
        "task": task, "before": before, "after": after,
        "parameters": {"mode": "full", "total": 127296, "trainable": 127296, "trainable_percent": 100.0},
        "precision": "fp32", "data": data,
        "train": {"train_runtime": 1.1222, "train_samples_per_second": 427.75, "train_steps_per_second": 53.469,
                  "total_flos": 9205628928.0, "train_loss": 7.511135609944661, "epoch": 1.7647058823529411},
        "steps": 60, "processes": 1, "samples": samples,
        "memory": {"prepare_peak_rss_mb": 489.375, "train_peak_rss_mb": 517.0078125},
        "timings": {"prepare_s": 0.0329, "eval_before_s": 0.0358, "train_s": 1.3401, "eval_after_s": 0.5232,
                    "total_s": 2.0229},
    }


CLASSIFY_SAMPLE = lambda neg, pos: [  # noqa: E731
    {"text": "the model is excellent", "label": "pos" if pos > 0.5 else "neg", "score": max(pos, 1 - pos),
     "scores": {"neg": 1 - pos, "pos": pos}},
    {"text": "awful network", "label": "neg" if neg > 0.5 else "pos", "score": max(neg, 1 - neg),
     "scores": {"neg": neg, "pos": 1 - neg}}]
SFT_SAMPLES = lambda reply, eos: [  # noqa: E731
    {"prompt": "Please answer the following question.\nQ: What is the colour of the owl?\nA: ", "response": reply,
     "stopped_at_eos": eos}]
REWARD_SAMPLES = lambda c, r: [  # noqa: E731
    {"prompt": "\n\nHuman: hi?\n\nAssistant:", "chosen": " Sure, thank you.", "rejected": " No, stupid.",
     "reward_chosen": c, "reward_rejected": r}]
POLICY_SAMPLES = lambda reply: [  # noqa: E731
    {"prompt": "\n\nHuman: can you help me?\n\nAssistant:", "response": reply, "stopped_at_eos": False}]

# family -> (metrics.json, config.yaml extras, strings the page must hold)
FAMILIES = {
    "clm": (base_metrics(
        "clm", {"loss": 5.965816112231183, "perplexity": 389.87107682583, "tokens": 930},
        {"loss": 3.642575893607191, "perplexity": 38.19008372669314, "tokens": 930},
        [{"prompt": "the model", "completions": [" reads data and trains"]},
         {"prompt": "import numpy", "completions": [" as np"]}],
        {"train_documents": 270, "validation_documents": 30, "train_blocks": 271, "validation_blocks": 30,
         "block_size": 32, "source": "data.train: 300 documents, from 1 of 1 files (0.0 MB of 0.1 MB)"}),
        {"generation": {"prompts": ["the model", "import numpy"], "max_new_tokens": 8}},
        ["perplexity", "389.9", "38.19", "5.966", "3.643", "930 tokens", "reads data and trains", "import numpy",
         "−90.2%"]),
    "mlm": (base_metrics(
        "mlm", {"loss": 4.816144238721143, "perplexity": 123.4880312876565, "masked_tokens": 111},
        {"loss": 2.352271690024986, "perplexity": 10.509416765164106, "masked_tokens": 111},
        [{"prompt": "alpha beta [MASK] delta epsilon", "fills": [[
            {"token": "gamma", "score": 0.171968, "sequence": "alpha beta gamma delta epsilon"},
            {"token": "zeta", "score": 0.164336, "sequence": "alpha beta zeta delta epsilon"}]]}],
        {"train_documents": 360, "validation_documents": 40, "train_chunks": 285, "validation_chunks": 29,
         "validation_masked_tokens": 111, "chunk_size": 32, "whole_word_mask": False}),
        {}, ["perplexity", "123.5", "10.51", "111 masked tokens", "alpha beta [MASK] delta epsilon", "gamma",
             "0.172", "alpha beta zeta delta epsilon"]),
    "qa": (base_metrics(
        "qa", {"exact_match": 0.0, "f1": 4.342336779065116, "questions": 166, "windows": 279},
        {"exact_match": 48.795180722891565, "f1": 48.86211512717537, "questions": 166, "windows": 279},
        [{"question": "Which fruit does the owl like?", "answer": "mango", "score": 10.455357551574707, "start": 24,
          "end": 29}],
        {"train_examples": 1034, "train_windows": 1690, "validation_examples": 166, "validation_articles": 6}),
        {"qa": {"samples": [{"question": "Which fruit does the owl like?",
                             "context": "The owl likes the fruit mango. The dog lives in rome."}]}},
        ["exact match", "48.8", "F1", "4.342", "48.86", "166 questions", "Which fruit does the owl like?",
         '<span class="ans">mango</span>']),
    "classify": (base_metrics(
        "classify",
        {"accuracy": 0.485, "f1": 0.3265993265993266, "confusion_matrix": [[0, 103], [0, 97]], "examples": 200,
         "samples": CLASSIFY_SAMPLE(0.494671, 0.505346)},
        {"accuracy": 1.0, "f1": 1.0, "confusion_matrix": [[103, 0], [0, 97]], "examples": 200,
         "samples": CLASSIFY_SAMPLE(0.998669, 0.998722)},
        CLASSIFY_SAMPLE(0.998669, 0.998722),
        {"labels": ["neg", "pos"], "problem_type": "single_label", "max_length": 64, "train_examples": 600,
         "validation_examples": 200, "train_label_counts": {"neg": 294, "pos": 306}}),
        {"classify": {"labels": None, "samples": ["the model is excellent", "awful network"]}},
        ["accuracy", "0.485", "0.3266", "200 examples", "Confusion matrix", "the model is excellent",
         "<b>neg</b>", "103", "true \\ predicted", "neg: 294, pos: 306"]),
    "sft": (base_metrics(
        "sft", {"loss": 5.694608102048881, "perplexity": 297.2602750631678, "response_tokens": 514,
                "samples": SFT_SAMPLES("                    ", False)},
        {"loss": 0.024637294186692294, "perplexity": 1.0249433002045143, "response_tokens": 514,
         "samples": SFT_SAMPLES("The owl is green.", True)},
        SFT_SAMPLES("The owl is green.", True),
        {"train_examples": 360, "validation_examples": 40, "format": "template",
         "example": {"prompt": "Please answer...\nA: ", "response": "The owl is green."}}),
        {}, ["perplexity", "297.3", "1.025", "514 response tokens", "The owl is green.", "stopped at EOS",
             "hit the token limit", "What is the colour of the owl?"]),
    "reward": (base_metrics(
        "reward", {"accuracy": 0.55, "margin": 0.010299404989928007, "reward_chosen": 0.2002, "reward_rejected": 0.1899,
                   "pairs": 100, "samples": REWARD_SAMPLES(0.0385, 0.1299)},
        {"accuracy": 1.0, "margin": 6.0945914840698245, "reward_chosen": 3.0462, "reward_rejected": -3.0484,
         "pairs": 100, "samples": REWARD_SAMPLES(2.91, -3.04)},
        REWARD_SAMPLES(2.91, -3.04),
        {"train_pairs": 400, "validation_pairs": 100,
         "example": {"prompt": "\n\nHuman: how old is the tree?\n\nAssistant:", "chosen": " Certainly.",
                     "rejected": " No. Go away."}}),
        {}, ["accuracy", "0.55", "margin", "6.095", "100 pairs", "Sure, thank you.", "prefers chosen",
             "prefers rejected", "2.91", "Certainly."]),
    "dpo": (base_metrics(
        "dpo", {"logp_accuracy": 0.04, "logp_margin": -48.58907119750977, "logp_chosen": -175.7,
                "logp_rejected": -127.1, "pairs": 100, "reward_accuracy": 0.0, "reward_margin": 0.0,
                "samples": POLICY_SAMPLES("::::")},
        {"logp_accuracy": 0.46, "logp_margin": 11.800109176635742, "logp_chosen": -142.3, "logp_rejected": -154.1,
         "pairs": 100, "reward_accuracy": 1.0, "reward_margin": 6.03891803741455,
         "samples": POLICY_SAMPLES("Sure, I can help.")},
        POLICY_SAMPLES("Sure, I can help."),
        {"train_pairs": 400, "validation_pairs": 100}),
        {}, ["reward accuracy", "reward margin", "6.039", "logp margin", "-48.59", "11.8", "Sure, I can help.",
             "::::"]),
    "rl": (base_metrics(
        "rl", {"mean_reward": -1.25, "reward_std": 0.5, "prompts": 20, "completions": 40,
               "example": {"prompt": "\n\nHuman: hi?\n\nAssistant:", "completion": " go away", "reward": -2.5},
               "samples": POLICY_SAMPLES(" go away")},
        {"mean_reward": 1.75, "reward_std": 0.25, "prompts": 20, "completions": 40,
         "example": {"prompt": "\n\nHuman: hi?\n\nAssistant:", "completion": " glad to help", "reward": 2.5},
         "samples": POLICY_SAMPLES(" glad to help")},
        POLICY_SAMPLES(" glad to help"),
        {"train_prompts": 80, "validation_prompts": 20, "algorithm": "grpo", "reward_model": "/runs/reward/model"}),
        {}, ["mean reward", "-1.25", "1.75", "+3", "40 completions", "glad to help", "go away",
             "A completion sampled during evaluation"]),
}


def make_run(folder, task="clm", metrics=True, log=None, config_extra=None, **files):
    folder.mkdir(parents=True, exist_ok=True)
    m, extra, _ = FAMILIES[task]
    (folder / "config.yaml").write_text(yaml.safe_dump(config_for(task, **(config_extra or extra))))
    records = log if log is not None else log_lines(eval_every=20)
    if task in ("reward", "dpo"):  # TRL logs its own figures on each training line
        for r in records:
            if "loss" in r:
                r.update({"rewards/chosen": r["step"] / 20, "rewards/rejected": -r["step"] / 20,
                          "rewards/accuracies": 0.9, "num_tokens": r["step"] * 1500.0})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "train.log").write_text("2026-01-01 00:00:00,000 INFO before training: ...\n")
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(m if metrics is True else metrics, indent=2))
        (folder / "model").mkdir(exist_ok=True)
        (folder / "model" / "config.json").write_text("{}")
    for name, content in files.items():
        (folder / name.replace("_json", ".json")).write_text(json.dumps(content))
    return folder


# --------------------------------------------------------------------------------------------------
# Every task family


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_each_family_gets_its_metrics_samples_and_valid_plots(task, tmp_path):
    run = make_run(tmp_path / "runs" / "tiny", task)
    path = report.write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    for text in FAMILIES[task][2]:
        assert text in page, text
    before, after = FAMILIES[task][0]["before"], FAMILIES[task][0]["after"]
    assert_metric_rows(page, before, after, [k for k in report.HEADLINE[task] if k in before])
    assert 'name="viewport"' in page and "<title>tiny · lmtune report</title>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    # loss, learning rate, throughput, gradient norm; classification adds two confusion matrices
    assert_valid_pngs(page, 4 + (2 if task == "classify" else 0))
    assert 'class="badge finished"' in page


def test_classification_confusion_matrix_has_label_names_in_plot_and_table(tmp_path):
    run = make_run(tmp_path / "run", "classify")
    page = report.render_html(report.read_run(run))
    table = page[page.index("After training (rows: true label"):]
    assert re.search(r"<td><b>neg</b></td><td class=n>103</td><td class=n>0</td><td class=n>100.0%</td>", table)
    matrix = report.confusion_figure([[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["cat", "dog", "bird"], "after")
    from PIL import Image

    with Image.open(io.BytesIO(matrix)) as im:
        assert im.format == "PNG" and im.width > 300
    assert report.class_names({"metrics": {"data": {}}, "config": None}, 3) == ["0", "1", "2"]


def test_multi_label_and_regression_metrics_are_tabulated(tmp_path):
    m = json.loads(json.dumps(FAMILIES["classify"][0]))
    m["before"] = {"subset_accuracy": 0.1, "f1_micro": 0.2, "f1_macro": 0.15, "examples": 50}
    m["after"] = {"subset_accuracy": 0.7, "f1_micro": 0.8, "f1_macro": 0.75, "examples": 50}
    m["samples"] = [{"text": "t1", "labels": ["a", "c"], "scores": {"a": 0.9, "b": 0.1, "c": 0.7}}]
    page = report.render_html(report.read_run(make_run(tmp_path / "ml", "classify", metrics=m)))
    assert "subset accuracy" in page and "micro-F1" in page and "a, c" in page and "Confusion matrix" not in page
    m["before"], m["after"] = {"mse": 2.5, "mae": 1.2, "pearson": 0.1, "examples": 9}, {
        "mse": 0.5, "mae": 0.4, "pearson": 0.9, "examples": 9}
    m["samples"] = [{"text": "t1", "value": 3.25}]
    page = report.render_html(report.read_run(make_run(tmp_path / "reg", "classify", metrics=m)))
    assert "MSE" in page and "Pearson r" in page and "3.25" in page and "−80.0%" in page


# --------------------------------------------------------------------------------------------------
# Safety: escaping, partial runs, broken files


def test_text_from_the_run_is_escaped(tmp_path):
    m = json.loads(json.dumps(FAMILIES["clm"][0]))
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    m["samples"] = [{"prompt": evil, "completions": [evil + " & more"]}]
    m["data"]["source"] = evil
    run = make_run(tmp_path / "run", "clm", metrics=m, config_extra={"description": evil})
    (run / "train.log").write_text(f"INFO {evil}\n")
    (run / "status.json").write_text(json.dumps({"state": "done", "error": evil}))
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&amp; more" in page


def test_a_run_that_did_not_finish_shows_its_curves_and_says_so(tmp_path):
    partial = tmp_path / "runs" / ".tiny.partial"
    records = log_lines(steps=30, eval_every=20)[:-1]  # no final summary: it stopped
    make_run(partial, "clm", metrics=False, log=records,
             status_json={"state": "failed", "error": "NonFiniteError: loss is nan at step 31", "processes": 1})
    (partial / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    page = report.write_report(partial).read_text(encoding="utf-8")
    assert (partial / "report.html").is_file()
    assert "<h1>tiny " in page and 'class="badge failed"' in page
    assert "This run failed: there is no metrics.json" in page
    assert "up to step 30" in page and "checkpoint-20" in page and "loss is nan at step 31" in page
    assert_valid_pngs(page, 3)  # loss, learning rate, gradient norm (+ throughput)
    assert "alt=\"loss by step\"" in page
    assert "None: the run wrote no metrics.json." in page
    # without status.json either (killed before it was written): 'did not finish'
    (partial / "status.json").unlink()
    page = report.render_html(report.read_run(partial))
    assert 'class="badge unfinished"' in page and "This run did not finish" in page


def test_nothing_but_a_config_still_renders(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_for("qa")))
    page = report.render_html(report.read_run(run))
    assert "None: log.jsonl is missing." in page and "Not in the run dir: log.jsonl" in page
    assert pngs(page) == []


def test_unreadable_files_are_reported_not_fatal(tmp_path):
    run = make_run(tmp_path / "run", "clm")
    (run / "metrics.json").write_text("{not json")
    with (run / "log.jsonl").open("a") as fh:
        fh.write('{"step": 70, "loss": 1.0, "grad_n')  # cut by a crash
        fh.write('\n{"step": 80, "epoch": 2.0, "time_s": 9.0, "loss": "nan", "grad_norm": "inf"}\n')
    page = report.render_html(report.read_run(run))
    assert "metrics.json could not be read" in page
    assert "1 line(s) could not be read" in page
    assert "Non-finite values in the log: loss at step 80, grad_norm at step 80." in page


# --------------------------------------------------------------------------------------------------
# Reading the log


def test_a_resumed_run_keeps_the_later_lines():
    first = [{"step": s, "time_s": s / 10, "loss": 10.0 - s / 10, "learning_rate": 1e-3} for s in (10, 20, 30, 40)]
    first.append({"step": 40, "time_s": 4.1, "eval_loss": 9.0, "eval_runtime": 0.1})
    # resumed from checkpoint-20: the clock starts again and steps 30, 40 are logged anew
    second = [{"step": s, "time_s": (s - 20) / 10, "loss": 5.0 - s / 100, "learning_rate": 1e-3} for s in (30, 40, 50)]
    records = report.read_log_lines(first + second)
    assert [(r["step"], r["_segment"]) for r in records] == [(10, 0), (20, 0), (30, 1), (40, 1), (50, 1)]
    assert report.series(records, "loss") == ([10, 20, 30, 40, 50], [9.0, 8.0, 4.7, 4.6, 4.5])
    assert report.series(records, "eval_loss") == ([], [])  # the replaced attempt's evaluation is gone too
    # a resume from the newest logged step: only the clock tells
    again = [{"step": 10, "time_s": 1.0, "loss": 3.0}, {"step": 20, "time_s": 0.5, "loss": 2.0}]
    assert [r["_segment"] for r in report.read_log_lines(again)] == [0, 1]


def test_throughput_in_tokens_per_second_leaves_evaluation_time_out():
    records = report.read_log_lines([
        {"step": 10, "time_s": 1.5, "train_runtime": 1.0, "num_input_tokens_seen": 1000, "loss": 2.0},
        {"step": 10, "time_s": 2.0, "eval_loss": 1.0, "eval_runtime": 0.5},
        {"step": 20, "time_s": 3.5, "train_runtime": 3.0, "num_input_tokens_seen": 3000, "loss": 1.5},
        {"step": 20, "time_s": 3.6, "train_runtime": 3.1, "train_loss": 1.7, "total_flos": 1.0},
    ])
    steps, values, unit = report.throughput(records, per_step=8)
    assert unit == "tokens/s" and steps == [10, 20]
    assert values == pytest.approx([1000 / 1.0, 2000 / (2.0 - 0.5)])


def test_throughput_without_token_counts_is_in_samples_or_steps():
    records = report.read_log_lines([{"step": s, "time_s": s * 0.5, "loss": 1.0} for s in (10, 20, 30)])
    assert report.throughput(records, per_step=16) == ([10, 20, 30], [32.0, 32.0, 32.0], "samples/s")
    assert report.throughput(records)[2] == "steps/s" and report.throughput(records)[1] == [2.0, 2.0, 2.0]
    assert report.samples_per_step({"training": {"batch_size": 8, "gradient_accumulation_steps": 4}}, 2) == 64


def test_throughput_plot_is_labelled_with_its_unit(tmp_path):
    tokens = make_run(tmp_path / "tokens", "clm", log=log_lines(tokens_per_step=256))
    page = report.render_html(report.read_run(tokens))
    assert 'alt="throughput in tokens/s by step"' in page
    samples = make_run(tmp_path / "samples", "clm", log=log_lines())
    page = report.render_html(report.read_run(samples))
    assert 'alt="throughput in samples/s by step"' in page and "8 samples per optimizer step" in page


def test_trl_figures_are_grouped_into_extra_plots(tmp_path):
    records = report.read_log_lines(log_lines())
    for r in records:
        r.update({"rewards/chosen": 1.0, "rewards/rejected": -1.0, "min_reward": -2.0, "mean_reward": 0.0,
                  "max_reward": 2.0, "entropy": 5.0, "mean_token_accuracy": 0.3})
    groups = dict(report.extra_groups(records))
    assert groups["rewards"] == ["rewards/chosen", "rewards/rejected"]
    assert groups["reward"] == ["min_reward", "mean_reward", "max_reward"]
    assert groups["mean_token_accuracy"] == ["mean_token_accuracy"] and "entropy" in groups
    assert "train_loss" not in groups and "learning_rate" not in groups


# --------------------------------------------------------------------------------------------------
# Estimate, status, formatting


def test_estimate_and_status_are_shown_beside_the_measured_figures(tmp_path):
    estimate = {"parameters": {"mode": "full", "total": 127296, "trainable": 127296}, "total_steps": 60,
                "timed_passes": 3, "step_time_s": 0.128, "estimated_peak_memory_mb": 618.7,
                "estimated_train_s": 7.677, "memory_basis": "peak of the timed passes (process RSS)",
                "measured_step_time_s": 0.0177, "measured_after_steps": 6}
    run = make_run(tmp_path / "run", "clm", estimate_json=estimate,
                   status_json={"state": "running", "started": "2026-01-01T00:00:00+0000"})
    page = report.render_html(report.read_run(run))
    assert "Estimate before training, and what was measured" in page
    assert re.search(r"<td>peak memory</td><td class=n>619 MiB</td><td class=n>517 MiB</td>", page)
    assert re.search(r"<td>time per step</td><td class=n>0.128 s</td><td class=n>0.0177 s</td>", page)
    assert re.search(r"<td>training time</td><td class=n>7.7 s</td><td class=n>1.3 s</td>", page)
    # metrics.json is written last: the run finished even though status.json still said running
    assert 'class="badge finished"' in page and "2026-01-01T00:00:00+0000" in page


@pytest.mark.parametrize("value, text", [(389.87107682583, "389.9"), (38.19008372669314, "38.19"), (0.485, "0.485"),
                                         (1.0, "1"), (127296, "127,296"), (48795.1, "48,795"), (3e-05, "3e-05"),
                                         (float("nan"), "nan"), (0.0, "0")])
def test_numbers_are_formatted_for_reading(value, text):
    assert report.format_number(value) == text


def test_change_column_says_better_or_worse():
    assert report.change("perplexity", 389.9, 38.19) == ("−351.7 (−90.2%)", "better")
    assert report.change("accuracy", 0.9, 0.8) == ("−0.1", "worse")
    assert report.change("logp_chosen", -175.7, -142.3) == ("+33.4", "")
    assert report.change("loss", None, 1.0) == ("", "")


# --------------------------------------------------------------------------------------------------
# Writing, the command, the cost


def test_writing_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", "clm")
    (run / "report.html").write_text("old page")

    def broken(_run):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        report.write_report(run)
    assert (run / "report.html").read_text() == "old page"
    monkeypatch.undo()
    out = report.write_report(run, tmp_path / "elsewhere" / "page.html")
    assert out.is_file() and (run / "report.html").read_text() == "old page"
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["page.html"]
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]


def test_no_pyplot_state_or_style_leaks():
    import matplotlib
    import matplotlib.pyplot as plt

    figures, size = plt.get_fignums(), matplotlib.rcParams["font.size"]
    records = report.read_log_lines(log_lines())
    assert report.loss_figure(records).startswith(PNG_SIGNATURE)
    assert report.line_figure([1, 2, 3], [3.0, 2.0, 1.0], "x").startswith(PNG_SIGNATURE)
    assert plt.get_fignums() == figures and matplotlib.rcParams["font.size"] == size


def test_lmtune_report_writes_report_html_and_exits_0(tmp_path, capsys):
    run = make_run(tmp_path / "runs" / "tiny", "qa")
    assert main(["report", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(run / "report.html")}
    assert "exact match" in (run / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run), "--out", str(tmp_path / "qa.html")]) == 0
    assert (tmp_path / "qa.html").is_file()


@pytest.mark.parametrize("what", ["empty", "missing", "file"])
def test_lmtune_report_on_a_folder_that_is_not_a_run_is_one_sentence(what, tmp_path, capsys):
    target = tmp_path / what
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("x")
    assert main(["report", str(target)]) == 2
    assert_one_sentence(2, capsys.readouterr().err, "is not a run dir")
    assert not (tmp_path / what / "report.html").exists() or what == "file"


def test_a_long_run_renders_quickly(tmp_path):
    """A few thousand log lines (logging every step of a 3,000-step run, evaluating every 100)."""
    run = make_run(tmp_path / "long", "dpo", log=log_lines(steps=3000, every=1, eval_every=100, tokens_per_step=512))
    report.read_run(run)  # imports and first-use costs out of the timing
    t = time.perf_counter()
    page = report.write_report(run).read_text(encoding="utf-8")
    took = time.perf_counter() - t
    assert len(pngs(page)) >= 6
    assert took < 6.0, took  # ~1.5 s on a quiet 2-core machine; the bound leaves room for a busy one


def test_a_page_drawn_in_the_work_folder_at_the_end_names_the_finished_run(tmp_path):
    """The pipeline draws the page in `.<name>.partial` just before renaming it to `<name>`, while
    status.json may still say running."""
    work = make_run(tmp_path / "runs" / ".tiny.partial", "clm", status_json={"state": "running", "pid": 1})
    page = report.render_html(report.read_run(work))
    assert f"task clm · {tmp_path.resolve() / 'runs' / 'tiny'} · report written" in page
    assert "<td>state</td><td>done <span" in page and 'class="badge finished"' in page
