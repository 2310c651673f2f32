"""Shared fixtures: tiny tokenizers and corpora built in the test session itself; never the Hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test session gets its own lmtune cache (set before any fixture runs), so tests never read or
# write a developer's cache.
os.environ["LMTUNE_CACHE"] = __import__("tempfile").mkdtemp(prefix="lmtune-test-cache-")

import pytest  # noqa: E402

from .helpers import make_documents  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one thread; on a busy two-core machine two OpenMP threads can be many
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from lmtune.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(make_documents(400, seed=1), vocab_size=400, min_frequency=1)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return tok


