"""Reference-library baselines: the same method run by llm-compressor (vLLM project) on the
same model object and the same calibration token tensors, so the native implementations
can be checked against it (experiment=alignment).

    llmc_gptq         GPTQModifier                       (LLMCompressorGPTQConfig)
    llmc_awq          AWQModifier + QuantizationModifier (LLMCompressorAWQConfig)
    llmc_smoothquant  SmoothQuantModifier + GPTQ-free W8A8 QuantizationModifier
                      (LLMCompressorSmoothQuantConfig)
    llmc_rtn          QuantizationModifier alone: round-to-nearest min-max weights on
                      compressed-tensors' symmetric grid s = max|W| / 7.5 (native rtn
                      w_grid=full) (LLMCompressorRTNConfig)

After `oneshot`, every quantized linear is read back (weight, weight_scale,
weight_zero_point, input_scale) and replaced by our FakeQuantLinear holding the
library's dequantized weights and grid, so every evaluator (and to_runtime) sees the
same module type as for native methods; norms and linears the library rescaled (AWQ,
SmoothQuant folds) keep the library's values. Install: pip install -e .[baselines]
(-c constraints.txt on CPU hosts so torch is not replaced).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.arch import ModelSpec
from methods.base import Calib, ConfigError, Method, QuantConfig, register
from methods.layers import FakeQuantLinear, iter_block_linears, replace_linear
from methods.primitives import QParams

log = logging.getLogger(__name__)

INSTALL_HINT = ("llmcompressor is not installed: pip install -e '.[baselines]' "
                "-c constraints.txt")


def llmcompressor_available() -> bool:
    return importlib.util.find_spec("llmcompressor") is not None


@dataclass(frozen=True)
class LLMCompressorGPTQConfig(QuantConfig):
    group_size: int | None = 128
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True          # llm-compressor actorder="static" (= static groups)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp > 0:
            raise ConfigError(f"llmc_gptq damp={self.damp} must be > 0")


@dataclass(frozen=True)
class LLMCompressorAWQConfig(QuantConfig):
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    ratio_grid: str = "closed"      # fixed by the library: r = i / (n_grid - 1), r = 1 included
    duo_scaling: bool = False       # the library allows duo scaling only per channel

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 2:
            raise ConfigError(f"llmc_awq n_grid={self.n_grid} must be >= 2")
        if self.ratio_grid != "closed":
            raise ConfigError(f"llmc_awq ratio_grid={self.ratio_grid!r}: the library searches "
                              "r = i / (n_grid - 1), i < n_grid ('closed'); only that is available")


@dataclass(frozen=True)
class LLMCompressorSmoothQuantConfig(QuantConfig):
    alpha: float = 0.5              # smoothing_strength (SmoothQuant paper: 0.5 for most)
    act_mode: str = "dynamic_token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"llmc_smoothquant alpha={self.alpha} must be in [0, 1]")


@dataclass(frozen=True)
class LLMCompressorRTNConfig(QuantConfig):
    w_grid: str = "full"            # fixed by the library: s = max|W| / (2^(b-1) - 1/2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric and self.w_grid != "full":
            raise ConfigError(f"llmc_rtn w_grid={self.w_grid!r}: compressed-tensors scales "
                              "symmetric weights by max|W| / (2^(b-1) - 1/2) ('full') only")


class LibraryBaseline(Method):
    """A method run by a reference library on our model and calibration tokens. It needs
    calibration; without the library installed it is skipped with `install_hint`."""

    install_hint = ""

    def library_available(self) -> bool:
        raise NotImplementedError

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, spec: ModelSpec) -> str | None:
        if not self.library_available():
            return self.install_hint
        return super().check(spec)

    def require_library_and_calibration(self, calib: Calib | None) -> None:
        if not self.library_available():
            raise RuntimeError(self.install_hint)
        if not calib:
            raise ValueError(f"{self.name} needs calibration data")


def replace_with_library_grid(model: nn.Module, full: str, lin: nn.Linear, W_hat: torch.Tensor,
                              qp: QParams, cfg: QuantConfig,
                              act_scale: float | None = None) -> None:
    """Swap block linear `full` for a FakeQuantLinear holding the library's dequantized
    weights W_hat [N, K] on the library's grid `qp` (bias and dtype kept)."""
    plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                      device=lin.weight.device, dtype=lin.weight.dtype)
    plain.weight.copy_(W_hat.to(lin.weight.device))
    if lin.bias is not None:
        plain.bias.copy_(lin.bias)
    replace_linear(model, full, FakeQuantLinear(
        plain, w_bits=cfg.w_bits, group_size=cfg.group_size, w_qparams=qp,
        a_bits=cfg.a_bits, act_mode=cfg.act_mode, act_scale=act_scale))


class _LLMCompressorMethod(LibraryBaseline):
    install_hint = INSTALL_HINT

    def library_available(self) -> bool:
        return llmcompressor_available()

    def modifiers(self, spec: ModelSpec, ignore: list[str]) -> list[Any]:
        """The llm-compressor recipe (modifier instances)."""
        raise NotImplementedError

    def scheme(self) -> Any:
        """compressed-tensors QuantizationScheme for every block linear."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        c = self.config
        g = c.group_size
        weights = QuantizationArgs(num_bits=c.w_bits, type="int", symmetric=c.symmetric,
                                   strategy="group" if g else "channel", group_size=g,
                                   observer="minmax")
        acts = None
        if c.quantizes_activations:
            dynamic = c.act_mode == "dynamic_token"
            acts = QuantizationArgs(num_bits=c.a_bits, type="int", symmetric=True,
                                    strategy="token" if dynamic else "tensor", dynamic=dynamic)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)

    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        self.require_library_and_calibration(calib)
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        # Our token tensors as a ready DataLoader: the library tokenizes nothing. It still
        # insists on a processor object when data is given; the placeholder is never used.
        batches = [{"input_ids": t.reshape(1, -1), "attention_mask": torch.ones_like(
            t.reshape(1, -1))} for t in calib]
        loader = DataLoader(batches, batch_size=None, shuffle=False)
        ids = [t.reshape(-1) for t in calib]
        ignore = ["lm_head"] + [n for _, _, n, _ in iter_block_linears(model, spec)
                                if self.config.keeps(n)]
        log.info("%s: llm-compressor oneshot on %d x %d tokens", self.name, len(ids),
                 len(ids[0]))
        with _config_on_disk(model), _no_pinning_without_accelerator():
            oneshot(model=model, dataset=loader, processor=_TokenIdsOnly(),
                    recipe=self.modifiers(spec, ignore),
                    num_calibration_samples=len(ids), max_seq_length=len(ids[0]),
                    shuffle_calibration_samples=False, pipeline="sequential")
        self.artifacts["baseline"] = {"library": "llmcompressor",
                                      "version": library_version("llmcompressor"),
                                      "compressed_tensors": library_version("compressed-tensors")}
        return to_fake_quant(model, spec, self.config)


@contextmanager
def _config_on_disk(model: nn.Module):
    """oneshot re-reads model.config from config.name_or_path; in-memory models (tiny,
    GGUF-dequantized) get a temporary directory holding their config."""
    old = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="ptqbench-llmc-") as tmp:
        model.config.save_pretrained(tmp)
        model.config.name_or_path = tmp
        try:
            yield
        finally:
            model.config.name_or_path = old


@contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14 AWQ pins cached CPU tensors for faster host-to-device copies;
    pin_memory() raises on hosts with no accelerator. Pinning is only a transfer speed-up,
    so on such hosts it is skipped for the duration of oneshot."""
    if torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = original


class _TokenIdsOnly:
    """Processor placeholder: calibration arrives as token ids, there is no text."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("calibration is passed as token ids; nothing to tokenize")


def library_version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


@torch.no_grad()
def to_fake_quant(model: nn.Module, spec: ModelSpec, cfg: QuantConfig) -> nn.Module:
    """Replace each library-quantized block linear by FakeQuantLinear with the library's
    grid: compressed-tensors codes are signed (q in [-2^(b-1), 2^(b-1)-1], zero z in that
    range); ours are unsigned for asymmetric grids, so z_ours = z + 2^(b-1)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    for _, _, full, lin in iter_block_linears(model, spec):
        qscheme = getattr(lin, "quantization_scheme", None)
        if qscheme is None or qscheme.weights is None:
            continue
        wargs = qscheme.weights
        scale, zp = lin.weight_scale.detach(), getattr(lin, "weight_zero_point", None)
        W_hat = fake_quantize(lin.weight.detach(), scale, zp, wargs)
        zero = None
        if not wargs.symmetric and zp is not None:
            zero = zp.float() + 2 ** (wargs.num_bits - 1)
        qp = QParams(scale.float().reshape(lin.out_features, -1),
                     None if zero is None else zero.reshape(lin.out_features, -1),
                     wargs.num_bits)
        act_scale = None
        if cfg.quantizes_activations and cfg.act_mode == "static_tensor":
            act_scale = float(lin.input_scale.reshape(-1)[0])
        replace_with_library_grid(model, full, lin, W_hat, qp, cfg, act_scale)
    return model


@register(LLMCompressorGPTQConfig)
class LLMCompressorGPTQ(_LLMCompressorMethod):
    name = "llmc_gptq"
    supported_bits = frozenset({(4, 16), (3, 16), (8, 16), (4, 8)})

    def modifiers(self, spec: ModelSpec, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier
        c = self.config
        return [GPTQModifier(config_groups={"group_0": self.scheme()}, ignore=ignore,
                             block_size=c.block_size, dampening_frac=c.damp,
                             actorder="static" if c.act_order else None)]


@register(LLMCompressorAWQConfig)
class LLMCompressorAWQ(_LLMCompressorMethod):
    name = "llmc_awq"
    supported_bits = frozenset({(4, 16), (3, 16), (4, 8)})
    # family -> why the library's AWQ mapping for it does not run here
    UNSUPPORTED_FAMILIES = {
        "bloom": "llm-compressor 0.14's BLOOM AWQ mapping smooths into `mlp.gelu_impl`, a "
                 "BloomGelu without a weight in transformers 5 (AttributeError in the library)",
    }

    def check(self, spec: ModelSpec) -> str | None:
        return self.UNSUPPORTED_FAMILIES.get(spec.table.family) or super().check(spec)

    def modifiers(self, spec: ModelSpec, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        c = self.config
        return [AWQModifier(n_grid=c.n_grid, duo_scaling=c.duo_scaling, ignore=ignore),
                QuantizationModifier(config_groups={"group_0": self.scheme()}, ignore=ignore)]


@register(LLMCompressorRTNConfig)
class LLMCompressorRTN(_LLMCompressorMethod):
    name = "llmc_rtn"
    supported_bits = frozenset({(4, 16), (3, 16), (8, 16), (4, 8), (8, 8)})

    def modifiers(self, spec: ModelSpec, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        return [QuantizationModifier(config_groups={"group_0": self.scheme()}, ignore=ignore)]


@register(LLMCompressorSmoothQuantConfig)
class LLMCompressorSmoothQuant(_LLMCompressorMethod):
    name = "llmc_smoothquant"
    supported_bits = frozenset({(8, 8), (4, 8)})

    def modifiers(self, spec: ModelSpec, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        return [SmoothQuantModifier(smoothing_strength=self.config.alpha, ignore=ignore),
                QuantizationModifier(config_groups={"group_0": self.scheme()}, ignore=ignore)]
