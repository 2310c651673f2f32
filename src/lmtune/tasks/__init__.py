"""One module per task family, each telling its whole story top to bottom. Each provides:
`prepare(cfg) -> Prepared`, `build_model(cfg, tokenizer, prepared)`, `evaluate_run(model, prepared, cfg)`,
`headline(metrics)`, `samples(model, tokenizer, cfg)`."""

from __future__ import annotations

import importlib
from types import ModuleType

TASK_MODULES = {"clm": "lmtune.tasks.clm", "mlm": "lmtune.tasks.mlm", "qa": "lmtune.tasks.qa",
                "classify": "lmtune.tasks.classify", "sft": "lmtune.tasks.sft",
                "reward": "lmtune.tasks.preference", "dpo": "lmtune.tasks.preference", "rl": "lmtune.tasks.preference"}


def task_module(name: str) -> ModuleType:
    return importlib.import_module(TASK_MODULES[name])
