"""GGUF files in: a `.gguf` model (llama.cpp's format, how most small LLMs are shared) becomes a plain
Hugging Face folder once, cached by the file's content, and every verb then reads that folder.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=NAME)`, with the `gguf` package):
it dequantizes the weights to float32 and rebuilds the tokenizer, chat template included, from the
file's metadata. That takes ~12 s for SmolLM2-135M and ~45 s for Gemma 3 270M on two CPU cores, and
the result is a model transformers will not save (it stays marked as quantized), so lmtune loads it
once with `GgufConfig(dequantize=True)`, drops the quantization marker and saves safetensors, the
config and the tokenizer; later runs load that folder in under a second.

Models shipped inside Python packages are named `package:NAME` (resolved through the installed
package's files, never imported: the package may import a runtime lmtune does not need). A package
may hold a model folder, one `.gguf` file, or a `.gguf` split into raw chunks `NAME.gguf.partNN`,
in the package itself or in sibling packages `NAME_partN` (PyPI's file-size limit).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from lmtune.errors import InputError

log = logging.getLogger("lmtune")

PACKAGE_PREFIX = "package:"
MARKER = "lmtune-gguf.json"  # written last into a converted folder: its presence means complete
_announced: set[Path] = set()


# --------------------------------------------------------------------------------------------------
# package:NAME


def package_folder(module_name: str, field: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InputError(f"{field}: '{PACKAGE_PREFIX}{module_name}' needs the Python package '{module_name}', which is "
                         f"not installed; pip install {module_name.replace('_', '-')} (or give a model folder or "
                         ".gguf file).")
    return Path(locations[0])


def _chunk_groups(folders: list[Path]) -> dict[str, list[Path]]:
    """`X.gguf.part00`, `X.gguf.part01`, ... found in `folders` (at any depth), grouped by `X.gguf`."""
    groups: dict[str, list[Path]] = {}
    for folder in folders:
        for chunk in folder.rglob("*.gguf.part*"):
            groups.setdefault(chunk.name.rsplit(".part", 1)[0], []).append(chunk)
    return {name: sorted(chunks, key=lambda p: p.name) for name, chunks in groups.items()}


def resolve_package(name: str, field: str = "model.name_or_path") -> str:
    """'package:NAME[/FILE]' -> a model folder or .gguf file inside that installed package (or the GGUF
    joined from its chunk packages); anything else passes through unchanged."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module_name, _, inner = name[len(PACKAGE_PREFIX):].partition("/")
    folder = package_folder(module_name, field)
    if inner:
        target = folder / inner
        if not target.exists():
            raise InputError(f"{field}: package '{module_name}' has no '{inner}'; its files are in {folder}.")
        return str(target)
    if (folder / "config.json").is_file():
        return str(folder)
    if (folder / "model" / "config.json").is_file():
        return str(folder / "model")
    ggufs = sorted(folder.rglob("*.gguf"))
    if len(ggufs) == 1:
        return str(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in ggufs)
        raise InputError(f"{field}: package '{module_name}' holds several GGUF files ({names}); name one as "
                         f"'{PACKAGE_PREFIX}{module_name}/FILE'.")
    siblings = sorted(folder.parent.glob(f"{module_name}_part*"))
    groups = _chunk_groups([folder, *siblings])
    if len(groups) == 1:
        (gguf_name, chunks), = groups.items()
        return str(join_chunks(gguf_name, chunks, folder, field))
    raise InputError(f"{field}: package '{module_name}' holds no model folder and no .gguf file ({folder}); "
                     "check the package name.")


def _expected_sha256(folder: Path, gguf_name: str) -> str | None:
    """The checksum a package ships for its joined file (a SHA256SUMS file), if any."""
    for sums in folder.rglob("SHA256SUMS"):
        for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == gguf_name:
                return parts[0].lower()
    return None


def join_chunks(gguf_name: str, chunks: list[Path], package: Path, field: str) -> Path:
    """The chunks joined once into the cache (keyed by their names and sizes), checked against the
    package's SHA256SUMS when it has one."""
    from lmtune.data.packing import cache_root

    key = hashlib.sha256("|".join(f"{c.name}:{c.stat().st_size}" for c in chunks).encode()).hexdigest()[:24]
    target = cache_root() / "gguf-joined" / key / gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{gguf_name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        expected = _expected_sha256(package, gguf_name)
        if expected and digest.hexdigest() != expected:
            raise InputError(f"{field}: the chunks of {gguf_name} in the installed packages do not add up to the "
                             "file their SHA256SUMS names; reinstall the packages.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("joined %d chunks of %s into %s", len(chunks), gguf_name, target)
    return target


# --------------------------------------------------------------------------------------------------
# .gguf -> a plain folder


def is_gguf_file(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf") and Path(os.path.expanduser(path)).is_file()


def content_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _gguf_package(field: str):
    try:
        import gguf
    except ImportError:
        raise InputError(f"{field}: reading a .gguf file needs the 'gguf' package; pip install 'lmtune[gguf]' "
                         "(or pip install gguf).") from None
    return gguf


def _dequantizable_types(gguf) -> set[str] | None:
    """The tensor types the gguf package can turn back into floats (None: cannot tell, try them all)."""
    traits = getattr(gguf.quants, "_type_traits", None)  # the package's own table of block formats
    if not isinstance(traits, dict):
        return None
    return {t.name for t in traits} | {"F32", "F16", "F64"}


def readable_architectures() -> set[str]:
    """The `general.architecture` values transformers converts (its older table and its newer one)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:  # older transformers: only the first table
        pass
    return names


def check_gguf(path: Path, field: str) -> dict:
    """What the file is (architecture, tensor types), read from its header without loading weights;
    one sentence for what cannot be converted."""
    gguf = _gguf_package(field)
    supported = readable_architectures()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 -- the reader raises ValueError, struct.error, IndexError...
        raise InputError(f"{field}: '{path}' is not a readable GGUF file ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); check that the file is complete.") from None
    arch_field = reader.fields.get("general.architecture")
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace") if arch_field else "?"
    if architecture not in supported:
        raise InputError(f"{field}: '{path}' holds a '{architecture}' model, which transformers cannot read from "
                         f"GGUF (it reads {', '.join(sorted(supported)[:10])}, ...); use a Hugging Face folder of "
                         "it instead.")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    readable = _dequantizable_types(gguf)
    unreadable = [t for t in types if readable is not None and t not in readable]
    if unreadable:
        raise InputError(f"{field}: '{path}' stores weights as {', '.join(unreadable)}, which cannot be dequantized "
                         "here; use a GGUF file with another quantization (F16, Q8_0, Q4_K_M...).")
    return {"architecture": architecture, "tensor_types": types, "tensors": len(reader.tensors)}


def converted_folder(path: str | Path, field: str = "model.name_or_path") -> Path:
    """The plain Hugging Face folder made from a .gguf file (converted on first use, then cached)."""
    from lmtune.data.packing import cache_root

    path = Path(os.path.expanduser(path)).resolve()
    key = content_key(path)
    folder = cache_root() / "gguf" / key[:24]
    if (folder / MARKER).is_file():
        if folder not in _announced:  # the config, tokenizer and model each resolve the name: say it once
            _announced.add(folder)
            log.info("GGUF: using %s, converted earlier from %s", folder, path.name)
        return folder
    info = check_gguf(path, field)
    log.info("GGUF: converting %s (%s, %s) once into a plain Hugging Face folder at %s", path.name,
             info["architecture"], "/".join(info["tensor_types"]), folder)
    started = time.time()
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(path, tmp, field)
        (tmp / MARKER).write_text(json.dumps({"source": str(path), "sha256": key, **info,
                                              "seconds": round(time.time() - started, 1)}, indent=2) + "\n")
        if not (folder / MARKER).is_file():  # else another process finished first: keep its folder
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt (no marker)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("GGUF: converted in %.0f s", time.time() - started)
    _announced.add(folder)
    return folder


def _report_dequantizing_as_lmtune_progress() -> None:
    """transformers' GGUF reader shows a tqdm bar of its own, which prints bar characters into logs;
    lmtune's progress (a bar on a terminal, plain lines elsewhere) replaces it."""
    import transformers.modeling_gguf_pytorch_utils as reader

    from lmtune.progress import progress

    if getattr(reader, "tqdm", None) is not None:
        reader.tqdm = lambda items, desc=None, **_: progress(items, "dequantizing GGUF tensors", total=len(items),
                                                             unit="tensors")


def _convert(path: Path, out: Path, field: str) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    _report_dequantizing_as_lmtune_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        architectures = getattr(config, "architectures", None) or []
        auto = getattr(transformers, architectures[0], None) if architectures else None
        if auto is None or not architectures[0].endswith("ForCausalLM"):
            auto = transformers.AutoModelForCausalLM
        model = auto.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                     quantization_config=GgufConfig(dequantize=True))
    except NotImplementedError as exc:  # a block format the gguf package has no dequantizer for
        raise InputError(f"{field}: '{path}' uses a weight format that cannot be dequantized here ({exc}); use a "
                         "GGUF file with another quantization.") from None
    except (ValueError, KeyError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{field}: transformers cannot convert '{path}' ({first[:160]}); use a Hugging Face "
                         "folder of this model instead.") from None
    # transformers keeps the model marked as quantized (GGUF) although its weights are plain floats now,
    # and refuses to save it so; without the marker it is an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        tokenizer.model_max_length = limit
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
