"""Offline-first access to the Hugging Face Hub.

A Hub request on a machine without network spends ~50 s in retries before failing, so before any
call that may download we check the local cache, then whether the Hub answers a TCP connect at
all (a few seconds at most), and fail with one sentence when it does not.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmtune.errors import InputError

_TRUE = {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def go_offline() -> None:
    """Put huggingface_hub, datasets and transformers in offline mode for the rest of the process,
    so that no later call starts its minute of retries. The libraries read the environment at
    import, hence the module constants as well."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is asked for or a TCP connect to the Hub fails; then the whole process
    goes offline."""
    reachable = not offline_requested() and _connects(timeout)
    if not reachable:
        go_offline()
    return reachable


def _connects(timeout: float) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(kind: str, name: str, field: str) -> str:
    return (
        f"{kind} '{name}' is not a local path and is not in the local Hugging Face cache, and the Hub cannot be "
        f"reached from here; set {field} to a local folder or file (or run once online to cache it)."
    )


def local_model_path(name: str, field: str = "model.name_or_path") -> str:
    """What a model name stands for on this machine: `package:NAME` -> the model (folder or GGUF) inside
    that installed package; a run dir -> its model/ folder; a .gguf file -> the plain folder converted
    from it (once, cached). Hub ids and folders pass through unchanged."""
    from lmtune.gguf_import import converted_folder, is_gguf_file, resolve_package

    name = run_model_folder(resolve_package(name, field))
    if is_gguf_file(name):
        return str(converted_folder(name, field))
    return name


def unreadable_model_files(exc: BaseException) -> bool:
    """Whether a loader's exception says the files are unreadable (missing, malformed, truncated) rather
    than that lmtune or a library went wrong: safetensors' own error, torch's zip reader, JSON, I/O."""
    if isinstance(exc, (OSError, ValueError, KeyError, EOFError)):
        return True
    if type(exc).__name__ == "SafetensorError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("PytorchStreamReader", "safetensors",
                                                                       "invalid load key", "unexpected EOF"))


def damaged_weights(folder: Path) -> Path | None:
    """The first .safetensors file in `folder` whose header does not describe the file (truncated, or
    not safetensors at all), read without loading the tensors."""
    import json
    import struct

    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
    for path in files:
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                header_len = struct.unpack("<Q", fh.read(8))[0]
                if header_len > size - 8:
                    return path
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end != size:
                return path
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            return path
    return None


def run_model_folder(name: str) -> str:
    """An lmtune run dir stands for the model it saved (its model/ folder): `predict RUN`, and chained
    steps naming the previous step's run dir. Anything else passes through unchanged."""
    run = Path(os.path.expanduser(name))
    if (run / "model" / "config.json").is_file():
        return str(run / "model")
    return name


def from_pretrained_or_explain(loader: Callable[..., Any], name: str, what: str, field: str = "model.name_or_path",
                               **kwargs: Any) -> Any:
    """Call a `from_pretrained`-style loader; turn "not found / offline" into one clear InputError."""
    name = local_model_path(name, field)
    if Path(os.path.expanduser(name)).exists():
        try:
            return loader(str(Path(os.path.expanduser(name))), **kwargs)
        except Exception as exc:  # noqa: BLE001 -- sorted below: a damaged file is the user's, anything else ours
            if not unreadable_model_files(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            damaged = damaged_weights(Path(os.path.expanduser(name)))
            if damaged:
                raise InputError(f"{field}: the weights file '{damaged}' is damaged or incomplete ({first[:120]}); "
                                 "copy or download it again.") from None
            raise InputError(
                f"'{name}' exists but cannot be loaded as a {what} ({first[:200]}); "
                f"point {field} at a Hugging Face {what} folder."
            ) from None
    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.lower().endswith(".gguf")):
        raise InputError(f"{field}: '{name}' does not exist; give an existing {what} folder (or a run dir).")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise InputError(offline_message(what, name, field))
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not load {what} '{name}' from the Hub ({first[:200]}); check {field}.") from None
