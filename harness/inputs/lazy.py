"""Models larger than host memory: a meta-device skeleton whose decoder blocks are read from
their safetensors files when the block-wise engine needs them (placement.mode=disk).

    model, store = load_lazy(path, dtype, device)   # embeddings, norms, head materialised
    with compute_on(device, store):                  # block i: read (or re-read) -> compute
        method.quantize(model, spec, calib)          #   -> written back to a work dir
        ppl = blockwise_window_nlls(...)             #   -> dropped to meta again

Only one block's weights (plus the embeddings and head) are ever in memory. A block that
was quantized is written back as all its tensors (the FakeQuantLinear codes grid, scales,
act scales, smoothing vectors) and re-read from there; the module objects stay, so its
structure is kept and only storage comes and goes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from methods.arch import ModelSpec
from methods.blockwise import BlockStore

log = logging.getLogger(__name__)


class LazyLoadError(ValueError):
    """The checkpoint cannot be loaded lazily; the message says why and what to do."""


class SafetensorsCheckpoint:
    """Tensor name -> file of a Hugging Face checkpoint directory (sharded or not)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / f for name, f in weight_map.items()}
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.files = {name: self.path / "model.safetensors" for name in f.keys()}
        else:
            raise LazyLoadError(f"{self.path} has no model.safetensors(.index.json): "
                                "placement.mode=disk reads safetensors checkpoints only")

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise LazyLoadError(f"{self.path}: tensors {missing[:3]} are not in the checkpoint")
        out: dict[str, Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for file, ns in by_file.items():
            with safe_open(file, "pt") as f:
                for n in ns:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if t.is_floating_point() else t
        return out


def module_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (persistent or not) by dotted name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assign_tensors(module: nn.Module, tensors: dict[str, Tensor], device: torch.device) -> None:
    """Put each tensor in place of the (meta) parameter or buffer of that name."""
    for name, t in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        t = t.to(device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).
    A block's weights and a solver's temporaries (e.g. GPTQ's K x K Hessian factors) are
    freed after each block, but glibc keeps freed mid-size chunks mapped, so without this the
    resident memory of a disk-placed model grows towards the sum of the blocks' peaks."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class DiskBlocks(BlockStore):
    """Blocks live in files: the original checkpoint until a block is rewritten, then the
    work directory (deleted with the store)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, spec: ModelSpec, dtype: torch.dtype,
                 work_root: Path | None = None):
        self.checkpoint, self.spec, self.dtype = checkpoint, spec, dtype
        if work_root is not None:
            Path(work_root).mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix="ptqbench-blocks-", dir=work_root))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.work_dir), True)
        self.reads = self.writes = 0

    def _file(self, index: int) -> Path:
        return self.work_dir / f"block{index}.safetensors"

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        if self._file(index).is_file():
            tensors = load_file(self._file(index))
        else:
            prefix = f"{self.spec.table.blocks}.{index}."
            names = [n for n, t in module_tensors(block).items() if t.is_meta]
            read = self.checkpoint.read([prefix + n for n in names], self.dtype)
            tensors = {n: read[prefix + n] for n in names}
        assign_tensors(block, tensors, device)
        self.reads += 1

    def offload(self, index: int, block: nn.Module, changed: bool) -> None:
        if changed:
            tensors = {n: t.detach().to("cpu").contiguous()
                       for n, t in module_tensors(block).items()}
            tmp = self._file(index).with_suffix(".tmp")
            save_file(tensors, tmp)
            tmp.replace(self._file(index))
            self.writes += 1
        block.to("meta")
        return_freed_memory()

    def close(self) -> None:
        self._cleanup()


def load_lazy(path: Path, dtype: torch.dtype, trust_remote_code: bool = False
              ) -> tuple[nn.Module, SafetensorsCheckpoint]:
    """The model with every decoder block on the meta device and everything else (embeddings,
    norms, head, rotary buffers) read from the checkpoint into host memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = SafetensorsCheckpoint(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():   # parameters on meta; buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    spec = ModelSpec.from_model(model, Path(path).name)
    blocks_prefix = spec.table.blocks + "."
    outside = [n for n, t in module_tensors(model).items()
               if t.is_meta and not n.startswith(blocks_prefix)]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_weight = spec.table.lm_head + ".weight"
    to_read = [n for n in outside if not (tied and n == head_weight)]
    assign_tensors(model, checkpoint.read(to_read, dtype), torch.device("cpu"))
    if tied:
        model.tie_weights()
    model.eval().requires_grad_(False)
    return model, checkpoint
