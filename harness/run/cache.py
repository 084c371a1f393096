"""Quantized-model cache: quantize once, evaluate many times.

An entry holds a job's SIMULATED quantized model, keyed by what determines it: the model
config, the method config, the calibration config (when the method calibrates), the seed,
the torch version and the method's code version (`Method.code_version`: sha256 of the
source files its modules import):

    <cache.dir>/<key>/model.safetensors   what quantization produced: integer weight codes
                                         (4-bit packed two per byte, else one byte), scales,
                                         zero points, smoothing vectors, activation scales,
                                         and the tensors quantization changed (folded norms);
                                         unchanged ones (embeddings) come from the base model
                                         on restore, checked against their sha256
                      artifacts.json       method.artifacts (stats, policy tables)
                      manifest.json        FakeQuantLinear.layout() per linear, how its codes
                                           are stored, tied-tensor aliases, sha256 of both files

A linear's weight is stored as codes only when (q - z) * s rebuilds it bit for bit (checked
at save; otherwise its weight is stored as is). A reuse loads a fresh base model, swaps in
`FakeQuantLinear.empty(layout)` modules as the manifest lists them, rebuilds W_hat from the
codes and loads the state dict strictly: the identical simulated model. `cache.max_gb` caps
the cache: least recently used entries (manifest mtime, touched on every hit) are evicted. Writers build the entry in a unique temp
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
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file
from torch import nn

from harness.util.fsutil import StagedDir
from harness.util.hashing import sha256_file
from harness.util.security import safe_name, within_root
from methods.arch import ModelSpec
from methods.base import Method
from methods.layers import (
    DTYPES,
    FakeQuantLinear,
    dtype_from_name,
    dtype_name,
    iter_block_linears,
    replace_linear,
)

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "rebuilt", "off"]
FORMAT = 3      # 3: integer codes + scales (2: dequantized weights; 1: the cache's own fields)
PACKINGS = ("nibbles", "bytes")   # two 4-bit codes per uint8 | one code (<= 8 bits) per uint8
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


# ---------------------------------------------------------------- codes

def _dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """W_hat = (q - z) * s for codes q [N, K] and scale / zero [N, G]."""
    n, k = q.shape
    g = q.float().view(n, scale.shape[1], -1)
    if zero is not None:
        g = g - zero.float()[..., None]
    return (g * scale.float()[..., None]).view(n, k).to(dtype)


def _pack(q: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Codes as unsigned bytes: u = q + offset in [0, 2^bits); two per byte when bits <= 4
    and K is even. Returns (packed uint8, manifest fields)."""
    offset = (1 << (bits - 1)) if symmetric else 0
    u = (q + offset).to(torch.int32)
    if int(u.min()) < 0 or int(u.max()) >= (1 << bits):
        raise ValueError(f"codes leave [0, 2^{bits}) after offset {offset}")
    u = u.to(torch.uint8)
    if bits <= 4 and q.shape[1] % 2 == 0:
        packed, packing = u[:, 0::2] | (u[:, 1::2] << 4), "nibbles"
    else:
        packed, packing = u, "bytes"
    return packed.contiguous(), {"packing": packing, "offset": offset,
                                 "shape": list(q.shape)}


def _unpack(packed: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    n, k = meta["shape"]
    if meta["packing"] == "nibbles":
        u = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, k)
    else:
        u = packed
    if tuple(u.shape) != (n, k):
        raise CacheEntryError(f"codes of shape {tuple(u.shape)}, manifest says {(n, k)}")
    return u.to(torch.int32) - int(meta["offset"])


def _codes_of(mod: FakeQuantLinear) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """(packed codes, fields) when the codes rebuild mod.weight bit for bit, else None."""
    if mod.w_scale is None or mod.w_bits > 8:
        return None
    try:
        q = mod.codes()
        packed, meta = _pack(q, mod.w_bits, mod.w_zero is None)
    except ValueError:
        return None
    if not torch.equal(_dequant(q, mod.w_scale, mod.w_zero, mod.weight.dtype), mod.weight):
        return None
    return packed, {**meta, "dtype": dtype_name(mod.weight.dtype)}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def tensor_digests(model: nn.Module) -> dict[str, str]:
    """{state-dict name: tensor_digest} of the base model before quantization: tensors that
    quantization leaves unchanged (embeddings, untouched norms) are then not stored."""
    return {n: tensor_digest(t) for n, t in model.state_dict().items()}


def _entry_tensors(model: nn.Module, spec: ModelSpec, base: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str],
                              dict[str, str]]:
    """(tensors to save, {linear: codes fields}, {tied name: stored name},
    {name: digest} of tensors equal to the base model's, taken from it on restore)."""
    codes: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for _, _, full, mod in iter_block_linears(model, spec):
        if type(mod) is FakeQuantLinear and (got := _codes_of(mod)) is not None:
            tensors[f"{full}.weight.codes"], codes[full] = got
    aliases: dict[str, str] = {}
    from_base: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if name.removesuffix(".weight") in codes and name.endswith(".weight"):
            continue
        if base is not None and name in base and tensor_digest(t) == base[name]:
            from_base[name] = base[name]
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device.type)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.detach().contiguous()
    return tensors, codes, aliases, from_base


def _check_codes_manifest(codes: Any, aliases: Any) -> None:
    if not isinstance(codes, dict) or not isinstance(aliases, dict):
        raise CacheEntryError("manifest codes / aliases are not objects")
    for full, m in codes.items():
        ok = (isinstance(m, dict) and m.get("packing") in PACKINGS
              and type(m.get("offset")) is int and 0 <= m["offset"] <= 128
              and isinstance(m.get("shape"), list) and len(m["shape"]) == 2
              and all(type(v) is int and v > 0 for v in m["shape"])
              and m.get("dtype") in DTYPES)
        if not ok:
            raise CacheEntryError(f"manifest codes of {full!r} are malformed: {m!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CacheEntryError("manifest aliases are malformed")


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir() if p.is_file())


@dataclass
class CachedQuantization:
    model: nn.Module
    artifacts: dict[str, Any]
    manifest: dict[str, Any]


class QuantizedModelCache:
    def __init__(self, root: str | os.PathLike, verify: bool = True,
                 max_gb: float | None = None):
        self.root = Path(root)
        self.verify = verify
        if max_gb is not None and (isinstance(max_gb, bool) or not float(max_gb) > 0):
            raise ValueError(f"cache.max_gb={max_gb!r}: give a positive size in GB, or null "
                             "for no limit")
        self.max_bytes = None if max_gb is None else int(float(max_gb) * 2**30)

    @classmethod
    def from_config(cls, cache_cfg: Any) -> QuantizedModelCache | None:
        """The `cache` config group; None when disabled (cache=off)."""
        if cache_cfg is None or not bool(cache_cfg.get("enabled", False)):
            return None
        return cls(cache_cfg.dir, bool(cache_cfg.get("verify", True)), cache_cfg.get("max_gb"))

    def entries(self) -> list[Path]:
        """Entry directories (not temp or trash), least recently used first."""
        if not self.root.is_dir():
            return []
        dirs = [d for d in self.root.iterdir()
                if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")]

        def last_used(d: Path) -> float:
            try:
                return (d / MANIFEST).stat().st_mtime
            except OSError:
                return d.stat().st_mtime if d.exists() else 0.0
        return sorted(dirs, key=last_used)

    def touch(self, key: str) -> None:
        """Mark an entry used now (LRU order)."""
        try:
            os.utime(self.entry_dir(key) / MANIFEST)
        except OSError:
            pass

    def discard_old_formats(self) -> list[str]:
        """Entries written by another cache format are never read again: remove them."""
        removed = []
        for d in self.entries():
            try:
                fmt = json.loads((d / MANIFEST).read_text(encoding="utf-8")).get("format")
            except (OSError, ValueError, AttributeError):
                continue      # partial or being written: read_manifest decides
            if fmt != FORMAT:
                self.discard(d.name, f"cache format {fmt!r}, this ptqbench writes {FORMAT}")
                removed.append(d.name)
        return removed

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove entries of old formats, then least recently used entries until the cache
        fits max_bytes."""
        removed = self.discard_old_formats()
        if self.max_bytes is None:
            return removed
        entries = [(d, _entry_bytes(d)) for d in self.entries()]
        total = sum(b for _, b in entries)
        for d, size in entries:
            if total <= self.max_bytes:
                break
            if d.name == keep:
                continue
            self.discard(d.name, f"least recently used; cache over cache.max_gb "
                                 f"({total / 2**30:.2f} GB > {self.max_bytes / 2**30:.2f} GB)")
            total -= size
            removed.append(d.name)
        return removed

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
        if not isinstance(manifest, dict):
            raise CacheEntryError(f"{entry}: manifest is not an object")
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise CacheEntryError(f"{entry}: manifest is for another key or format "
                                  f"({manifest.get('format')!r}, this ptqbench: {FORMAT})")
        try:
            files = ((WEIGHTS, manifest["weights"]), (ARTIFACTS, manifest["artifacts"]))
            for name, meta in files:
                path = entry / name
                if not path.is_file() or path.stat().st_size != meta["bytes"]:
                    raise CacheEntryError(f"{path}: missing or truncated")
                if self.verify and sha256_file(path) != meta["sha256"]:
                    raise CacheEntryError(f"{path}: sha256 does not match the manifest")
            if not isinstance(manifest["fake_quant"], dict):
                raise TypeError("fake_quant is not an object")
            _check_codes_manifest(manifest["codes"], manifest["aliases"])
            if not isinstance(manifest["from_base"], dict):
                raise TypeError("from_base is not an object")
        except (KeyError, TypeError, AttributeError) as e:
            raise CacheEntryError(f"{entry}: malformed manifest ({type(e).__name__}: {e})"
                                  ) from e
        return manifest

    def restore(self, key: str, manifest: Mapping[str, Any], model: nn.Module,
                spec: ModelSpec) -> CachedQuantization:
        """Turn a freshly loaded base `model` into the cached quantized model, in place.
        On CacheEntryError the model may be half-restored: load a fresh one."""
        entry = self.entry_dir(key)
        try:
            state = model.state_dict()
            base = {}
            for name, digest in manifest["from_base"].items():   # before linears are swapped
                if name not in state or tensor_digest(state[name]) != digest:
                    raise CacheEntryError(f"{name} of the base model differs from the one the "
                                          "entry was made from")
                base[name] = state[name]
            for full, fields in manifest["fake_quant"].items():
                linear = model.get_submodule(full)
                if type(linear) is not nn.Linear:
                    raise CacheEntryError(f"{full} is a {type(linear).__name__}, not nn.Linear")
                replace_linear(model, full, _rebuild_fake_quant(linear, fields))
            device = next(model.parameters()).device
            tensors = load_safetensors_file(str(entry / WEIGHTS), device=str(device))
            for full, meta in manifest["codes"].items():
                q = _unpack(tensors.pop(f"{full}.weight.codes"), meta)
                tensors[f"{full}.weight"] = _dequant(
                    q, tensors[f"{full}.w_scale"], tensors.get(f"{full}.w_zero"),
                    dtype_from_name(meta["dtype"]))
            tensors.update(base)
            for alias, name in manifest["aliases"].items():
                tensors[alias] = tensors[name]
            model.load_state_dict(tensors, strict=True)
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
             artifacts: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
             base_digests: Mapping[str, str] | None = None) -> Path:
        """Write an entry atomically; keep an existing complete entry of the same key.
        base_digests (`tensor_digests` of the model before quantization): tensors still
        equal to the base model's are not stored; a restore checks and takes them from it."""
        layout = fake_quant_layout(model, spec)
        final = self.entry_dir(key)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp()
        with StagedDir(final) as stage:
            tmp = stage.path
            tensors, codes, aliases, from_base = _entry_tensors(model, spec, base_digests)
            save_safetensors_file(tensors, str(tmp / WEIGHTS), metadata={"ptqbench_key": key})
            _write_json(tmp / ARTIFACTS, dict(artifacts))
            manifest = {
                "format": FORMAT, "key": key, "key_parts": dict(parts),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "weights": {"sha256": sha256_file(tmp / WEIGHTS),
                            "bytes": (tmp / WEIGHTS).stat().st_size},
                "artifacts": {"sha256": sha256_file(tmp / ARTIFACTS),
                              "bytes": (tmp / ARTIFACTS).stat().st_size},
                "fake_quant": layout, "codes": codes, "aliases": aliases,
                "from_base": from_base,
                **dict(extra or {})}
            _write_json(tmp / MANIFEST, manifest)   # last: its presence marks completeness
        if not stage.published:
            log.info("cache entry %s was written by another job; keeping it", final)
            return final
        log.info("cached quantized model %s (%.1f MB; %d linears as integer codes)", final,
                 manifest["weights"]["bytes"] / 2**20, len(codes))
        self.evict(keep=key)
        return final
