"""Quantized checkpoints: a runtime (or simulated) model saved as safetensors + a JSON config.

    save_runtime_checkpoint(model, spec, "ckpt/", meta={"method": method.describe()})
    model = load_runtime_checkpoint("ckpt/")                 # architecture from the stored config
    model = load_runtime_checkpoint("ckpt/", base_model)     # or onto a given fp model

Every tensor of the model is saved (packed codes and scales, and also embeddings, norms with
folded smoothing scales, lm_head), so reloading needs no calibration and no base weights.
No pickle anywhere: tensors in `model.safetensors`, everything else in `ptq_runtime.json`.
The format is described in docs/checkpoint_format.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from methods.arch import ModelSpec
from methods.layers import (
    DTYPES,
    FakeQuantLinear,
    dtype_from_name,
    dtype_name,
    iter_block_linears,
    replace_linear,
)
from methods.runtime import LINEAR_KINDS, RUNTIME_KINDS, RuntimeLinear

log = logging.getLogger(__name__)

FORMAT = "ptqbench-quantized"
FORMAT_VERSION = 3  # 3: W4A8TwoLevelLinear, FakeQuantLinear.w_scale2 (two-level weight
#                      scales); 2: W4A8Linear.w_packed in the kernel layout (1: packing layout)
CONFIG_FILE = "ptq_runtime.json"
TENSORS_FILE = "model.safetensors"
BaseModel = nn.Module | Callable[[], nn.Module] | None


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says what to do."""


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks (also the caches' checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def linear_layouts(model: nn.Module, spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """{full name: layout} for every quantized block linear; plain nn.Linear are omitted."""
    out: dict[str, dict[str, Any]] = {}
    for _, _, full, mod in iter_block_linears(model, spec):
        if isinstance(mod, (RuntimeLinear, FakeQuantLinear)):
            out[full] = mod.layout()
    return out


def save_runtime_checkpoint(model: nn.Module, spec: ModelSpec, path: str | Path,
                            meta: dict[str, Any] | None = None, *,
                            overwrite: bool = False) -> Path:
    """Write `path/` atomically (a temp dir renamed into place); returns path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True or choose another path")
    dtype = next(model.parameters()).dtype
    hf_config = json.loads(model.config.to_json_string()) if hasattr(model, "config") else None
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"name": spec.name, "family": spec.table.family, "dtype": dtype_name(dtype),
                  "num_layers": spec.num_layers, "hf_config": hf_config},
        "meta": meta or {},
        "linears": linear_layouts(model, spec),
        "tensors": TENSORS_FILE,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # save_model drops duplicate names of shared tensors (tied embeddings / lm_head)
        save_model(model, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        config["sha256"] = sha256_file(tmp / TENSORS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved quantized checkpoint %s (%d quantized linears)", path,
             len(config["linears"]))
    return path


MAX_FEATURES = 1 << 20
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_INT_FIELDS = {"in_features": (1, MAX_FEATURES), "out_features": (1, MAX_FEATURES),
               "w_bits": (1, 16), "a_bits": (1, 16), "group_size": (-1, MAX_FEATURES),
               "scale_groups": (1, MAX_FEATURES), "w_layout_chunk": (1, MAX_FEATURES)}
_BOOL_FIELDS = ("zero_point", "smooth", "bias", "two_level")
ACT_MODES = (None, "static_tensor", "dynamic_token")


def _bad(cfg_file: Path, where: str, value: Any, allowed: str) -> CheckpointError:
    return CheckpointError(f"{cfg_file}: {where}={value!r} is not valid ({allowed}); the "
                           "checkpoint is corrupt or was not written by ptqbench: save it again")


def _validate_layout(cfg_file: Path, name: str, layout: Any) -> None:
    """Kind, sizes, bit widths, flags and buffer dtypes of one linear, from allowlists."""
    where = f"linears[{name!r}]"
    if not isinstance(name, str) or not _MODULE_PATH.match(name):
        raise _bad(cfg_file, "linears key", name, "a dotted module path")
    if not isinstance(layout, dict):
        raise _bad(cfg_file, where, layout, "an object")
    if layout.get("kind") not in LINEAR_KINDS:
        raise _bad(cfg_file, f"{where}.kind", layout.get("kind"),
                   f"one of {sorted(LINEAR_KINDS)}")
    for key in ("in_features", "out_features"):
        if key not in layout:
            raise _bad(cfg_file, f"{where}.{key}", None, "required")
    for key, (lo, hi) in _INT_FIELDS.items():
        v = layout.get(key)
        if v is not None and (type(v) is not int or not lo <= v <= hi):
            raise _bad(cfg_file, f"{where}.{key}", v, f"an integer in [{lo}, {hi}]")
    for key in _BOOL_FIELDS:
        if key in layout and type(layout[key]) is not bool:
            raise _bad(cfg_file, f"{where}.{key}", layout[key], "true or false")
    if layout.get("act_mode") not in ACT_MODES:
        raise _bad(cfg_file, f"{where}.act_mode", layout.get("act_mode"), f"one of {ACT_MODES}")
    scale = layout.get("act_scale")
    if scale is not None and (type(scale) not in (int, float) or not math.isfinite(scale)
                              or scale <= 0):
        raise _bad(cfg_file, f"{where}.act_scale", scale, "a finite positive number or null")
    dtypes = layout.get("dtypes", {})
    if not isinstance(dtypes, dict):
        raise _bad(cfg_file, f"{where}.dtypes", dtypes, "an object")
    for buf, dt in dtypes.items():
        if not isinstance(buf, str) or not buf.isidentifier() or dt not in DTYPES:
            raise _bad(cfg_file, f"{where}.dtypes[{buf!r}]", dt, f"one of {sorted(DTYPES)}")


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ptq_runtime.json, validated: format, tensors file inside the
    checkpoint directory, dtype names and linear layouts from allowlists, a sha256."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: {path} is not a ptqbench quantized "
                              "checkpoint (write one with save_runtime_checkpoint)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file} is not readable JSON ({e}); save the checkpoint "
                              "again") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{cfg_file}: format {got!r}, expected {FORMAT!r}")
    version = config.get("format_version")
    if type(version) is not int or version < 1:
        raise _bad(cfg_file, "format_version", version, "a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {version} is newer "
                              f"than this ptqbench reads ({FORMAT_VERSION}); upgrade ptqbench")
    tensors = config.get("tensors")
    if (not isinstance(tensors, str) or Path(tensors).name != tensors or tensors in ("", ".",
                                                                                      "..")
            or not tensors.endswith(".safetensors")):
        raise _bad(cfg_file, "tensors", tensors,
                   "a .safetensors file name inside the checkpoint directory")
    resolved = (path / tensors).resolve()
    if resolved.parent != path.resolve():
        raise _bad(cfg_file, "tensors", tensors, "a file inside the checkpoint directory, "
                   "not a link out of it")
    sha = config.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _bad(cfg_file, "sha256", sha, "64 hex digits")
    model = config.get("model")
    if not isinstance(model, dict) or model.get("dtype") not in DTYPES:
        raise _bad(cfg_file, "model.dtype", (model or {}).get("dtype") if isinstance(
            model, dict) else model, f"one of {sorted(DTYPES)}")
    hf = model.get("hf_config")
    if hf is not None and (not isinstance(hf, dict)
                           or not isinstance(hf.get("model_type"), str)):
        raise _bad(cfg_file, "model.hf_config", type(hf).__name__,
                   "an object with a model_type")
    linears = config.get("linears")
    if not isinstance(linears, dict):
        raise _bad(cfg_file, "linears", type(linears).__name__, "an object")
    for name, layout in linears.items():
        _validate_layout(cfg_file, name, layout)
    return config


def _skeleton(config: dict[str, Any], base: BaseModel) -> nn.Module:
    """The fp architecture to load into: base as given, base(), or built from hf_config."""
    if isinstance(base, nn.Module):
        return base
    if base is not None:
        return base()
    hf = dict(config["model"].get("hf_config") or {})
    if not hf:
        raise CheckpointError("the checkpoint stores no Hugging Face config: pass the base "
                              "model (or a function building it) to load_runtime_checkpoint")
    from transformers import AutoConfig, AutoModelForCausalLM
    hf.pop("quantization_config", None)      # e.g. GGUF dequantization: weights come from here
    hf.pop("auto_map", None)                 # never remote code: built-in architectures only
    try:
        hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"stored hf_config cannot build a transformers architecture "
                              f"({e}); pass the base model to load_runtime_checkpoint") from e
    dtype = dtype_from_name(config["model"]["dtype"])
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()


def _empty_linear(layout: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    kind = layout["kind"]
    if kind not in LINEAR_KINDS:
        raise CheckpointError(f"unknown linear kind {kind!r}; known: {sorted(LINEAR_KINDS)}")
    try:
        return LINEAR_KINDS[kind].empty(layout, dtype)
    except ValueError as e:
        raise CheckpointError(f"linear layout {layout}: {e}") from e


def _upgrade_w4a8_layout(model: nn.Module) -> None:
    """format_version 1 stored W4A8 weights in the packing layout: convert to the kernel's."""
    from kernels.reference import to_kernel_layout

    for mod in model.modules():
        if isinstance(mod, RUNTIME_KINDS["W4A8Linear"]):
            mod.w_packed.copy_(to_kernel_layout(mod.w_packed, mod.group_size))


def load_runtime_checkpoint(path: str | Path, base: BaseModel = None, *,
                            verify: bool = True) -> nn.Module:
    """Rebuild the saved model: the fp architecture (from `base` or the stored HF config),
    its quantized linears swapped for empty modules of the saved kinds and shapes, then every
    tensor loaded strictly from safetensors. verify: check the tensors file's sha256."""
    path = Path(path)
    config = read_checkpoint_config(path)
    tensors = path / config["tensors"]
    if not tensors.is_file():
        raise CheckpointError(f"{tensors} not found: the checkpoint is incomplete")
    if verify and sha256_file(tensors) != config.get("sha256"):
        raise CheckpointError(f"{tensors} does not match the sha256 in {CONFIG_FILE}: the "
                              "checkpoint is corrupt or was modified; save it again")
    model = _skeleton(config, base)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for full, layout in config["linears"].items():
        replace_linear(model, full, _empty_linear(layout, dtype).to(device))
    try:
        load_model(model, str(tensors), strict=True, device=str(device))
    except RuntimeError as e:
        raise CheckpointError(f"{tensors} does not fit the model architecture: {e}") from e
    if int(config["format_version"]) < 2:
        _upgrade_w4a8_layout(model)
    model.requires_grad_(False)
    log.info("loaded quantized checkpoint %s (%d quantized linears)", path,
             len(config["linears"]))
    return model.eval()
