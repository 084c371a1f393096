"""Quantized-model cache: quantize once, evaluate many times.

An entry holds a job's SIMULATED quantized model, keyed by what determines it: the model
config, the method config, the calibration config (when the method calibrates), the seed,
the torch version and the method's code version (`Method.code_version`: sha256 of the
source files its modules import):

    <cache.dir>/<key>/model.safetensors   full state_dict (folded norms differ from the base)
                      artifacts.json       method.artifacts (stats, policy tables)
                      manifest.json        FakeQuantLinear.layout() per linear + sha256 of both files

A reuse loads a fresh base model, swaps in `FakeQuantLinear.empty(layout)` modules as the
manifest lists them and loads the state dict strictly. Writers build the entry in a unique temp
directory (manifest last) and rename it into place; if another writer got there first
the existing entry is kept. An entry whose manifest is missing or unreadable, or whose
checksums do not match, is never used: it is moved aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from harness.util.fsutil import StagedDir
from harness.util.hashing import sha256_file
from harness.util.security import safe_name, within_root
from methods.arch import ModelSpec
from methods.base import Method
from methods.layers import FakeQuantLinear, iter_block_linears, replace_linear

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "rebuilt", "off"]
FORMAT = 2      # 2: manifest layouts are FakeQuantLinear.layout() (1: the cache's own fields)
MANIFEST, WEIGHTS, ARTIFACTS = "manifest.json", "model.safetensors", "artifacts.json"


class CacheEntryError(RuntimeError):
    """An entry is partial, corrupt or does not fit the model; it is rebuilt, never used."""


# ---------------------------------------------------------------- keys

def cache_key_parts(model_cfg: Mapping, method_cfg: Mapping, calib_cfg: Mapping | None,
                    seed: int, method: Method) -> dict[str, Any]:
    return {"format": FORMAT, "model": dict(model_cfg), "method": dict(method_cfg),
            "calib": dict(calib_cfg) if calib_cfg is not None else None, "seed": int(seed),
            "code_version": method.code_version(), "torch": torch.__version__.split("+")[0]}


def cache_key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- layout of FakeQuantLinear

def fake_quant_layout(model: nn.Module, spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """{full name: FakeQuantLinear.layout()} for every block linear that is one.
    Raises CacheEntryError for module types the cache cannot rebuild."""
    layout = {}
    for _, _, full, mod in iter_block_linears(model, spec):
        if type(mod) is FakeQuantLinear:
            layout[full] = mod.layout()
        elif type(mod) is not nn.Linear:
            raise CacheEntryError(f"{full} is a {type(mod).__name__}; the cache rebuilds only "
                                  "nn.Linear and FakeQuantLinear block linears")
    return layout


def _rebuild_fake_quant(linear: nn.Linear, layout: Mapping[str, Any]) -> FakeQuantLinear:
    """An empty FakeQuantLinear of `layout` in place of the base `linear` (values come from
    the state dict)."""
    if (linear.in_features, linear.out_features) != (layout["in_features"],
                                                     layout["out_features"]):
        raise CacheEntryError(f"linear is {linear.in_features}->{linear.out_features}, entry "
                              f"has {layout['in_features']}->{layout['out_features']}")
    return FakeQuantLinear.empty(layout, linear.weight.dtype).to(linear.weight.device)


# ---------------------------------------------------------------- the cache

def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, default=_jsonable, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class CachedQuantization:
    model: nn.Module
    artifacts: dict[str, Any]
    manifest: dict[str, Any]


class QuantizedModelCache:
    def __init__(self, root: str | os.PathLike, verify: bool = True):
        self.root = Path(root)
        self.verify = verify

    @classmethod
    def from_config(cls, cache_cfg: Any) -> QuantizedModelCache | None:
        """The `cache` config group; None when disabled (cache=off)."""
        if cache_cfg is None or not bool(cache_cfg.get("enabled", False)):
            return None
        return cls(cache_cfg.dir, bool(cache_cfg.get("verify", True)))

    def entry_dir(self, key: str) -> Path:
        safe_name(key, "cache key")
        return within_root(self.root, self.root / key, "cache entry")

    # ---- read

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        """The verified manifest of a complete entry; None if there is none;
        CacheEntryError if an entry exists but is partial or corrupt."""
        entry = self.entry_dir(key)
        if not entry.exists():
            return None
        try:
            manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CacheEntryError(f"{entry}: no manifest (partial entry)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheEntryError(f"{entry}: unreadable manifest ({e})") from e
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise CacheEntryError(f"{entry}: manifest is for another key or format")
        for name, meta in ((WEIGHTS, manifest["weights"]), (ARTIFACTS, manifest["artifacts"])):
            path = entry / name
            if not path.is_file() or path.stat().st_size != meta["bytes"]:
                raise CacheEntryError(f"{path}: missing or truncated")
            if self.verify and sha256_file(path) != meta["sha256"]:
                raise CacheEntryError(f"{path}: sha256 does not match the manifest")
        return manifest

    def restore(self, key: str, manifest: Mapping[str, Any], model: nn.Module,
                spec: ModelSpec) -> CachedQuantization:
        """Turn a freshly loaded base `model` into the cached quantized model, in place.
        On CacheEntryError the model may be half-restored: load a fresh one."""
        entry = self.entry_dir(key)
        try:
            for full, fields in manifest["fake_quant"].items():
                linear = model.get_submodule(full)
                if type(linear) is not nn.Linear:
                    raise CacheEntryError(f"{full} is a {type(linear).__name__}, not nn.Linear")
                replace_linear(model, full, _rebuild_fake_quant(linear, fields))
            device = next(model.parameters()).device
            load_safetensors_model(model, entry / WEIGHTS, strict=True, device=str(device))
            artifacts = json.loads((entry / ARTIFACTS).read_text(encoding="utf-8"))
        except CacheEntryError:
            raise
        except (AttributeError, KeyError, RuntimeError, OSError, ValueError) as e:
            raise CacheEntryError(f"{entry}: does not fit the model ({type(e).__name__}: "
                                  f"{e})") from e
        return CachedQuantization(model.eval(), artifacts, dict(manifest))

    # ---- write

    def remove_stale_temp(self, older_than_s: float = 86400.0) -> None:
        """Temp and trash dirs left by writers that were killed (a day old: not in use)."""
        now = time.time()
        for d in self.root.glob(".*-*"):
            if d.name.startswith((".tmp-", ".trash-")) and d.is_dir() and not d.is_symlink():
                try:
                    if now - d.stat().st_mtime > older_than_s:
                        shutil.rmtree(d, ignore_errors=True)
                except FileNotFoundError:
                    pass

    def discard(self, key: str, reason: str) -> None:
        """Move a bad entry aside (atomic for readers), then delete it."""
        entry = self.entry_dir(key)
        trash = self.root / f".trash-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            return   # another process already discarded it
        log.warning("cache entry %s discarded: %s", entry, reason)
        shutil.rmtree(trash, ignore_errors=True)

    def save(self, key: str, parts: Mapping[str, Any], model: nn.Module, spec: ModelSpec,
             artifacts: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
        """Write an entry atomically; keep an existing complete entry of the same key."""
        layout = fake_quant_layout(model, spec)
        final = self.entry_dir(key)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp()
        with StagedDir(final) as stage:
            tmp = stage.path
            save_safetensors_model(model, str(tmp / WEIGHTS), metadata={"ptqbench_key": key})
            _write_json(tmp / ARTIFACTS, dict(artifacts))
            manifest = {
                "format": FORMAT, "key": key, "key_parts": dict(parts),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "weights": {"sha256": sha256_file(tmp / WEIGHTS),
                            "bytes": (tmp / WEIGHTS).stat().st_size},
                "artifacts": {"sha256": sha256_file(tmp / ARTIFACTS),
                              "bytes": (tmp / ARTIFACTS).stat().st_size},
                "fake_quant": layout, **dict(extra or {})}
            _write_json(tmp / MANIFEST, manifest)   # last: its presence marks completeness
        if not stage.published:
            log.info("cache entry %s was written by another job; keeping it", final)
            return final
        log.info("cached quantized model %s (%.1f MB)", final,
                 manifest["weights"]["bytes"] / 2**20)
        return final
