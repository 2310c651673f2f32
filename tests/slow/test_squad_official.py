"""lmtune's SQuAD v1.1 EM/F1 on the real dev set against the figures the official evaluation script prints,
for two published prediction files. The data comes from ../shared/data (or LMTUNE_SHARED_DATA): `make test-slow`."""

import gzip
import json
from pathlib import Path

import pytest

from lmtune.metrics import squad_gold_answers, squad_scores

from ..helpers import SHARED_DATA

pytestmark = pytest.mark.slow

SQUAD_DIR = SHARED_DATA / "squad_v1.1"


def _load_gz_json(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def dev_gold() -> dict[str, list[str]]:
    path = SQUAD_DIR / "dev-v1.1.json.gz"
    if not path.is_file():
        pytest.skip(f"SQuAD v1.1 dev set not found at {path}: the official-figure checks need the shared data "
                    "folder (../shared/data beside the repository, or LMTUNE_SHARED_DATA)")
    return squad_gold_answers(_load_gz_json(path))


def _load_predictions(name: str) -> dict[str, str]:
    path = SQUAD_DIR / name
    if not path.is_file():
        pytest.skip(f"SQuAD prediction file not found at {path}: the official-figure checks need the shared data "
                    "folder (../shared/data beside the repository, or LMTUNE_SHARED_DATA)")
    return _load_gz_json(path)


def test_official_numbers_bert_ensemble(dev_gold):
    result = squad_scores(dev_gold, _load_predictions("pred_bert_ensemble_google.json.gz"))
    assert result["exact_match"] == pytest.approx(86.20624408703878, abs=1e-9)
    assert result["f1"] == pytest.approx(92.19557978351145, abs=1e-9)


def test_official_numbers_logreg_baseline(dev_gold):
    result = squad_scores(dev_gold, _load_predictions("pred_logreg_baseline_stanford.json.gz"))
    assert result["exact_match"] == pytest.approx(40.14191106906339, abs=1e-9)
    assert result["f1"] == pytest.approx(50.98153647324461, abs=1e-9)
    assert result["missing"] == 13
    assert result["unknown_ids"] == 28
