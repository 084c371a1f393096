"""GPTQ run by GPTQModel (ModelCloud), the maintained successor of AutoGPTQ: the second
reference library for native GPTQ (experiment=alignment).

The library loads models from a directory, so the in-memory model (with its config and a
placeholder tokenizer: calibration arrives as token ids) is written to a temporary
directory, quantized there by `GPTQModel.load(...).quantize(...)`, and every packed
linear is read back: codes q [K, N] and zeros z [G, N] unpacked from int32 words (v1
format: stored z - 1), scales s [G, N] (fp16, the GPTQ checkpoint format). Each block linear of *our* model is then
replaced by FakeQuantLinear holding W_hat = (q - z) * s, checked against the library's own
dequantization, so evaluators and to_runtime see the usual module type.

Install (gptqmodel 7.7 declares torch>=2.14.1 and transformers>=5.20.2, which would replace
the pinned CPU torch and break llm-compressor's transformers<=5.17 pin; it imports and
quantizes on CPU with torch 2.13 / transformers 5.17): `make install-gptqmodel`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec
from methods.base import Calib, ConfigError, QuantConfig, register
from methods.baselines import LibraryBaseline, library_version, replace_with_library_grid
from methods.layers import iter_block_linears
from methods.primitives import QParams, dequantize

log = logging.getLogger(__name__)

INSTALL_HINT = "gptqmodel is not installed: make install-gptqmodel (see README, Methods)"


def gptqmodel_available() -> bool:
    return importlib.util.find_spec("gptqmodel") is not None


@dataclass(frozen=True)
class GPTQModelGPTQConfig(QuantConfig):
    group_size: int | None = 128
    damp: float = 0.01              # damp_percent
    act_order: bool = True          # desc_act=True with static_groups=True
    true_sequential: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptqmodel_gptq damp={self.damp} must be in (0, 1)")
        if self.keep_fp or self.keep_w8:
            raise ConfigError("gptqmodel_gptq does not support keep_fp / keep_w8 "
                              "(mixed precision): use the native gptq method")


@register(GPTQModelGPTQConfig)
class GPTQModelGPTQ(LibraryBaseline):
    name = "gptqmodel_gptq"
    install_hint = INSTALL_HINT
    # Packing in 32-bit words along K: 2, 4 and 8 bits divide 32 (3-bit codes straddle words).
    supported_bits = frozenset({(4, 16), (8, 16), (2, 16)})

    def library_available(self) -> bool:
        return gptqmodel_available()

    def library_config(self, device: str):
        from gptqmodel.quantization.config import GPTQConfig
        c = self.config
        return GPTQConfig(bits=c.w_bits, group_size=c.group_size or -1, sym=c.symmetric,
                          desc_act=c.act_order, static_groups=c.act_order,
                          act_group_aware=False, true_sequential=c.true_sequential,
                          damp_percent=c.damp, device=device,
                          offload_to_disk=False)   # keep the packed modules in memory

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        self.require_library_and_calibration(calib)
        # The library sizes its CPU pool as ceil(cores / 2) but asks for 2 loader workers:
        # on a 2-core host that raises ("requests 2 workers but parent 'cpu' only has 1").
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
        from gptqmodel import GPTQModel

        device = next(model.parameters()).device.type
        rows = [t.reshape(-1) for t in calib]
        data = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in rows]
        log.info("%s: GPTQModel on %d x %d tokens (%s)", self.name, len(rows), rows[0].numel(),
                 device)
        with tempfile.TemporaryDirectory(prefix="ptqbench-gptqmodel-") as tmp, \
                _library_logs_under(Path(tmp) / "logs") as log_dir:
            model.save_pretrained(tmp, safe_serialization=True)
            _placeholder_tokenizer(model).save_pretrained(tmp)
            qmodel = GPTQModel.load(tmp, self.library_config(device),
                                    dtype=next(model.parameters()).dtype)
            qmodel.quantize(data, batch_size=1)
            self._read_back(model, spec, qmodel.model)
            self.artifacts["gptqmodel_layers"] = library_layer_log(log_dir)
        self.artifacts["baseline"] = {"library": "gptqmodel",
                                      "version": library_version("gptqmodel")}
        return model

    @torch.no_grad()
    def _read_back(self, model: nn.Module, spec: ModelSpec, lib_model: nn.Module) -> None:
        c = self.config
        for _, _, full, lin in iter_block_linears(model, spec):
            packed = lib_model.get_submodule(full)
            q, z_stored, s = unpack_gptq(packed, c.w_bits)   # [N, K], [N, G], [N, G]
            g = c.group_size or lin.in_features
            groups_of_k = packed.g_idx.long().cpu()
            if not torch.equal(groups_of_k, torch.arange(lin.in_features) // g):
                raise RuntimeError(f"{full}: GPTQModel returned non-contiguous groups (g_idx); "
                                   "only static groups are representable")
            _check_against_library(full, self._dequantize(q, z_stored, s), packed)
            # GPTQ's symmetric grid is a zero-point grid with z = 2^(b-1): keep z explicit.
            qp = QParams(s.float(), true_zero(z_stored, packed, c.w_bits).float(), c.w_bits)
            replace_with_library_grid(model, full, lin, self._dequantize(q, qp.zero, s), qp, c)

    def _dequantize(self, q: Tensor, z: Tensor, s: Tensor) -> Tensor:
        """W_hat [N, K] = (q - z) * s for codes q [N, K] and z, s [N, G] over contiguous
        groups (G = 1: per channel)."""
        qp = QParams(s.float().unsqueeze(-1), z.float().unsqueeze(-1), self.config.w_bits)
        return dequantize(q, qp, "per_group", q.shape[1] // s.shape[1])


def unpack_gptq(packed: nn.Module, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ checkpoint tensors -> codes q [N, K], zeros z [N, G], scales s [N, G].

    qweight int32 [K * bits / 32, N]: code k sits in word k // (32 / bits) at bit offset
    bits * (k % (32 / bits)); qzeros int32 [G, N * bits / 32] packs along N the same way.
    """
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1

    def unpack(words: Tensor, dim: int) -> Tensor:
        w = words.cpu().to(torch.int32)
        parts = (w.unsqueeze(dim + 1) >> shifts.view([-1 if i == dim + 1 else 1
                                                      for i in range(w.dim() + 1)])) & mask
        shape = list(w.shape)
        shape[dim] *= per_word
        return parts.reshape(shape)

    q = unpack(packed.qweight, 0).t()                                 # [N, K]
    n = q.shape[0]
    z = unpack(packed.qzeros, 1)[:, :n].t()                           # [N, G]
    s = packed.scales.detach().cpu().t()                              # [N, G]
    return q.contiguous(), z.contiguous(), s.contiguous()


def true_zero(z_stored: Tensor, packed: nn.Module, bits: int) -> Tensor:
    """GPTQ v1 format (what `quantize()` leaves in memory and what checkpoints hold) stores
    z - 1 (mod 2^bits); loaders add the 1 back before running kernels (v1 -> v2)."""
    fmt = packed.qzero_format() if hasattr(packed, "qzero_format") else 1
    return (z_stored + 1) % (1 << bits) if fmt == 1 else z_stored


def _check_against_library(name: str, W_hat: Tensor, packed: nn.Module) -> None:
    """Our decoding [N, K] of the stored tensors must match the library's own dequantization
    of the same in-memory module ([K, N], computed in fp16, hence the tolerance): guards
    changes of the packing layout."""
    if not hasattr(packed, "dequantize_weight"):
        return
    ref = packed.dequantize_weight().float().cpu().t()
    err = float((W_hat - ref).abs().max()) if ref.shape == W_hat.shape else float("inf")
    if not err <= 2e-3 * float(W_hat.abs().max()):
        raise RuntimeError(f"{name}: decoded GPTQModel weights differ from its own "
                           f"dequantization by up to {err:.3g} (packing format changed?)")


@contextmanager
def _library_logs_under(log_dir: Path):
    """GPTQModel writes one JSON log per processor run to `./logs/` of the working
    directory; it goes to the run's temporary directory instead (and into the record)."""
    from gptqmodel.looper import loop_processor
    old = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = log_dir
    try:
        yield log_dir
    finally:
        loop_processor._PROJECT_LOG_DIR = old


def library_layer_log(log_dir: Path) -> list[dict]:
    """The library's per-linear log (concatenated JSON objects: layer, module, loss, damp,
    samples, time) as a list of dicts; [] when it wrote none."""
    rows: list[dict] = []
    decoder = json.JSONDecoder()
    for path in sorted(log_dir.glob("*.log")):
        text, pos = path.read_text(), 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break
            if isinstance(obj, dict):
                rows.append({k: obj[k] for k in ("layer", "module", "loss", "damp", "samples",
                                                  "time") if k in obj})
    return rows


def _placeholder_tokenizer(model: nn.Module):
    """The library loads a tokenizer from the model directory; calibration is token ids, so
    a word-level tokenizer over the model's vocabulary size stands in (never encodes)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<t{i}>": i for i in range(int(model.config.vocab_size))}
    specials = {"unk": 0, "eos": getattr(model.config, "eos_token_id", None) or 0}
    names = {i: f"<t{i}>" for i in specials.values()}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names[specials["unk"]]))
    eos = names[specials["eos"]]
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=names[0], eos_token=eos,
                                   pad_token=eos, bos_token=eos)
