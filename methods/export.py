"""Export a simulated (FakeQuantLinear) model as a compressed-tensors checkpoint.

compressed-tensors is the format llm-compressor writes and vLLM / SGLang load. Each block
linear keeps its exact grid: W_hat = (q - z) * s is written back as a plain weight with its
scales (and zero points) attached as the library's parameters, and the library quantizes
and packs it (`ModelCompressor.compress_model`), so the stored codes are ours.

Schemes (one config group per distinct weight / activation setting):
  W4A16   int4 group (or channel) weights, zero points when asymmetric  pack-quantized
  W8A8    int8 per-channel weights, int8 activations per token (dynamic) or per tensor
          (static, our calibrated scale as input_scale)                int-quantized
  W4A8    int4 group weights, int8 per-token dynamic activations       pack-quantized
Smoothing scales (SmoothQuant / FPTQ s) are already folded into the norms and feeder
linears of the simulated model, so they travel as ordinary weights. QuIP's grid lives in a
rotated basis (TransformedLinear: y = R_out^T W_hat R_in (x * smooth_inv)): W_hat is packed
as above and the transforms become compressed-tensors online transforms (`transform_config`,
type random-matrix, one config group per linear since every linear has its own U, V):
  input   x -> x M_in,   M_in  = diag(smooth_inv) R_in^T   [K, K]
  output  y -> y M_out,  M_out = R_out                     [N, N]
stored dense as `<linear>.<group>_<location>.weight` (what vLLM and
`apply_transform_config` load; nothing is fused into the packed weight). Stated deviations (in
the export report, never silent): static per-tensor activations of a 4-bit-weight layer
are exported dynamic per-token (serving engines have no W4A8 static kernel); a simulated
KV-cache setting is not exported. Refused with the reason: a linear that still carries an
unfolded pre-scale (smooth_inv) outside a QuIP transform, a rotated linear with quantized
activations or fp weights (QuaRot's online rotations), weights of 2 / 3 bits, 4-bit
activations.

Asymmetric codes: ours q in [0, 2^b - 1] with zero point z; compressed-tensors stores signed
codes q - 2^(b-1) with zero point z - 2^(b-1): (q - z) * s is unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from methods.arch import ModelSpec
from methods.kvcache import detach_kv_cache_quant
from methods.layers import FakeQuantLinear, iter_block_linears, replace_linear
from methods.transformed import TransformedLinear

FORMATS = ("compressed_tensors", "gptq")
SUPPORTED = "W4A16 (int4 group/channel), W8A16, W8A8 (dynamic per-token or static per-tensor), W4A8"
REPORT_FILE = "ptqbench_export.json"


class ExportError(ValueError):
    """The model cannot be expressed in the export format; the message says why."""


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: weight and input-activation settings."""
    w_bits: int
    group_size: int | None
    symmetric: bool
    a_bits: int
    act: str | None          # None (a16) | "token" (dynamic) | "tensor" (static)

    @property
    def label(self) -> str:
        act = f"a{self.a_bits}-{self.act}" if self.act else "a16"
        g = f"g{self.group_size}" if self.group_size else "channel"
        return f"w{self.w_bits}-{g}-{'sym' if self.symmetric else 'asym'}-{act}"

    @property
    def format(self) -> str:
        return "pack-quantized" if self.w_bits <= 4 else "int-quantized"


def scheme_of(name: str, fq: FakeQuantLinear) -> tuple[Scheme, str | None]:
    """(scheme, deviation or None) of one simulated linear; ExportError when impossible."""
    if isinstance(fq, TransformedLinear):
        _check_transformed(name, fq)
    elif fq.smooth_inv is not None:
        raise ExportError(f"{name} keeps an unfolded smoothing pre-scale (X / s at runtime), "
                          "which compressed-tensors cannot store; use a setting that folds s "
                          "(e.g. fold_linear_feeders) or another method")
    if fq.w_bits not in (4, 8):
        raise ExportError(f"{name}: w{fq.w_bits} weights cannot be exported; supported "
                          f"schemes: {SUPPORTED}")
    if fq.a_bits not in (8, 16):
        raise ExportError(f"{name}: a{fq.a_bits} activations cannot be exported; supported "
                          f"schemes: {SUPPORTED}")
    act, deviation = None, None
    if fq.a_bits == 8:
        act = "token" if fq.act_mode == "dynamic_token" else "tensor"
        if act == "tensor" and fq.w_bits == 4:
            act = "token"
            deviation = ("static per-tensor int8 activations exported as dynamic per-token "
                         "(no W4A8 static kernel in serving engines)")
    return Scheme(fq.w_bits, fq.group_size, fq.w_symmetric, fq.a_bits, act), deviation


def _check_transformed(name: str, fq: TransformedLinear) -> None:
    """A weight-only rotated linear (QuIP) exports; rotations around quantized activations
    or an fp weight (QuaRot) do not."""
    if fq.a_bits < 16 or fq.w_bits >= 16:
        raise ExportError(f"{name} rotates its input online around w{fq.w_bits}a{fq.a_bits} "
                          "(QuaRot): only weight-only rotated linears (QuIP w4a16 / w8a16) "
                          f"export; supported schemes: {SUPPORTED}")
    if fq.bias is not None and fq.r_out is not None:
        raise ExportError(f"{name} has a bias added after its output rotation, which a "
                          "compressed-tensors output transform would rotate too; QuIP "
                          "export covers bias-free linears (llama, qwen2 MLP / o_proj ...)")


def transform_matrices(fq: TransformedLinear) -> dict[str, Tensor]:
    """{"input": M_in [K, K], "output": M_out [N, N]} (fp32) with x M_in = R_in (x * smooth_inv)
    and y M_out = R_out^T y row-wise: compressed-tensors' online transform is value @ weight."""
    out = {}
    if fq.r_in is not None or fq.smooth_inv is not None:
        eye = torch.eye(fq.in_features, dtype=torch.float64)
        M = eye if fq.r_in is None else fq.r_in.apply(eye)               # R_in^T
        if fq.smooth_inv is not None:
            M = fq.smooth_inv.detach().double()[:, None] * M
        out["input"] = M.float()
    if fq.r_out is not None:
        eye = torch.eye(fq.out_features, dtype=torch.float64)
        out["output"] = fq.r_out.apply(eye).T.float()                    # R_out
    return out


def _transform_config(found: dict[str, tuple[FakeQuantLinear, Scheme]]):
    """(TransformConfig or None, {group: (linear name, location, matrix)}): one random-matrix
    group per rotated linear and location."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
    groups, mats = {}, {}
    for i, (full, (fq, _)) in enumerate(found.items()):
        if not isinstance(fq, TransformedLinear):
            continue
        for loc, M in transform_matrices(fq).items():
            g = f"quip{i}_{'v' if loc == 'input' else 'u'}"
            groups[g] = TransformScheme(type="random-matrix", precision=torch.float32,
                                        apply=[TransformArgs(targets=[full], location=loc)])
            mats[g] = (full, loc, M)
    return (TransformConfig(config_groups=groups) if groups else None), mats


def _apply_transforms(model: nn.Module, config) -> None:
    """compressed-tensors' `apply_transform_config` without a progress bar per group (one
    group per linear here): each group's factory attaches its transforms, and the config
    rides on the model for `ModelCompressor`. No weights are shared across groups."""
    from compressed_tensors import TRANSFORM_CONFIG_NAME
    from compressed_tensors.transform import TransformFactory
    for name, scheme in config.config_groups.items():
        TransformFactory.from_scheme(scheme, name=name).apply_to_model(model, use_tqdm=False)
    setattr(model, TRANSFORM_CONFIG_NAME, config)


def _set_transforms(ex: nn.Module, mats: dict[str, tuple[str, str, Tensor]]) -> None:
    """Our matrices into the transform modules `apply_transform_config` attached."""
    with torch.no_grad():
        for g, (full, loc, M) in mats.items():
            t = ex.get_submodule(f"{full}.{g}_{loc}")
            t.weight.data = M.to(t.weight.dtype).contiguous()


def _quant_args(s: Scheme):
    from compressed_tensors.quantization import QuantizationArgs
    weights = QuantizationArgs(num_bits=s.w_bits, type="int", symmetric=s.symmetric,
                               strategy="group" if s.group_size else "channel",
                               group_size=s.group_size)
    acts = None if s.act is None else QuantizationArgs(
        num_bits=s.a_bits, type="int", symmetric=True, strategy=s.act,
        dynamic=s.act == "token")
    return weights, acts


def _plain_linear(fq: FakeQuantLinear) -> nn.Linear:
    lin = nn.Linear(fq.in_features, fq.out_features, bias=fq.bias is not None,
                    device=fq.weight.device, dtype=fq.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(fq.weight)
        if fq.bias is not None:
            lin.bias.copy_(fq.bias)
    return lin


def _set_qparams(mod: nn.Module, fq: FakeQuantLinear, s: Scheme) -> None:
    """Our scales / zero points / static input scale into the library's parameters."""
    with torch.no_grad():
        mod.weight_scale.copy_(fq.w_scale.reshape(mod.weight_scale.shape)
                               .to(mod.weight_scale.dtype))
        if not s.symmetric:
            offset = 2 ** (s.w_bits - 1)
            mod.weight_zero_point.copy_((fq.w_zero - offset).reshape(
                mod.weight_zero_point.shape).to(mod.weight_zero_point.dtype))
        if s.act == "tensor":
            mod.input_scale.copy_(fq.act_scale.reshape(mod.input_scale.shape)
                                  .to(mod.input_scale.dtype))


def _expected_bytes(model: nn.Module, linears: dict[str, Scheme],
                    transforms: dict[str, tuple[str, str, Tensor]]) -> int:
    """Tensor bytes the checkpoint should hold, from the bit widths: int4 codes packed eight
    to an int32 (pack-quantized) or int8 codes, one scale per row and group at the weight's
    dtype, packed int4 zero points when asymmetric, a static input scale, the [2] int64
    weight_shape of packed layers, the fp32 transform matrices; every other tensor at its
    own dtype (ties stored once)."""
    total = sum(M.numel() * 4 for *_, M in transforms.values())
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        mod_name, _, leaf = name.rpartition(".")
        s = linears.get(mod_name)
        if s is None:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
            continue
        if leaf == "bias":
            total += t.numel() * t.element_size()
        if leaf != "weight":
            continue           # w_scale / w_zero / act_scale / smooth_inv: counted below
        n, k = t.shape
        groups = k // s.group_size if s.group_size else 1
        packed = s.format == "pack-quantized"
        total += n * k * s.w_bits // 8 if packed else n * k
        total += n * groups * t.element_size()
        if not s.symmetric:
            total += (n * s.w_bits // 32) * groups * 4 if packed else n * groups
        if s.act == "tensor":
            total += t.element_size()
        if packed:
            total += 2 * 8
    return total


def export_compressed_tensors(model: nn.Module, spec: ModelSpec, out_dir: str | Path,
                              tokenizer: Any = None, meta: dict[str, Any] | None = None,
                              kv_bits: int | None = None) -> dict[str, Any]:
    """Write `out_dir` (config.json with quantization_config, model.safetensors, tokenizer)
    from a simulated model (left untouched); returns the export report (also written to
    out_dir/ptqbench_export.json)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    out_dir = Path(out_dir)
    found: dict[str, tuple[FakeQuantLinear, Scheme]] = {}
    kept_fp: list[str] = []
    deviations: dict[str, list[str]] = {}
    for _, _, full, mod in iter_block_linears(model, spec):
        if isinstance(mod, TransformedLinear) or (
                isinstance(mod, FakeQuantLinear) and (mod.w_bits < 16 or mod.a_bits < 16)):
            if mod.w_bits == 16 and not isinstance(mod, TransformedLinear):
                raise ExportError(f"{full}: activation-only quantization (w16a{mod.a_bits}) "
                                  f"has no compressed-tensors scheme here; supported: {SUPPORTED}")
            scheme, dev = scheme_of(full, mod)
            found[full] = (mod, scheme)
            if dev:
                deviations.setdefault(dev, []).append(full)
        elif isinstance(mod, nn.Linear):
            kept_fp.append(full)
        else:
            raise ExportError(f"{full} is a {type(mod).__name__}: export the simulated model "
                              "(FakeQuantLinear; a checkpoint saved with runtime=false), not "
                              "one converted to runtime kernels")
    if not found:
        raise ExportError("the model has no quantized block linears: nothing to export")
    if kv_bits:
        deviations.setdefault(f"kv_bits={kv_bits}: the simulated KV-cache quantization is not "
                              "exported (the checkpoint keeps an fp KV cache)", [])

    ex = copy.deepcopy(model)
    detach_kv_cache_quant(ex, spec)        # simulated only: listed as a deviation above
    for full in found:
        replace_linear(ex, full, _plain_linear(found[full][0]))
    schemes = sorted({s for _, s in found.values()}, key=lambda s: s.label)
    groups = {}
    for i, s in enumerate(schemes):
        names = sorted(n for n, (_, sc) in found.items() if sc == s)
        w_args, a_args = _quant_args(s)
        groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(schemes) == 1 else names, weights=w_args,
            input_activations=a_args, format=s.format)
    ignore = [spec.table.lm_head, *kept_fp]
    qconfig = QuantizationConfig(config_groups=groups, ignore=ignore,
                                 quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(ex, qconfig, show_progress=False)
    for full, (fq, s) in found.items():
        _set_qparams(ex.get_submodule(full), fq, s)
    tconfig, mats = _transform_config(found)
    if tconfig is not None:
        _apply_transforms(ex, tconfig)
        _set_transforms(ex, mats)
    fmt = schemes[0].format if len({s.format for s in schemes}) == 1 else "mixed-precision"
    compressor = ModelCompressor.from_pretrained_model(ex, quantization_format=fmt)
    compressor.compress_model(ex)
    expected = _expected_bytes(model, {n: s for n, (_, s) in found.items()}, mats)

    tmp = _staging_dir(out_dir)
    ex.save_pretrained(tmp)
    compressor.update_config(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    tensors = tmp / "model.safetensors"
    size = tensors.stat().st_size
    header = 8 + int.from_bytes(tensors.read_bytes()[:8], "little")
    n_weights = sum(fq.weight.numel() for fq, _ in found.values())
    report = {
        "format": "compressed_tensors", "ct_format": fmt, "path": str(out_dir),
        "compressed_tensors_version": _version(),
        "schemes": {s.label: sorted(n for n, (_, sc) in found.items() if sc == s)
                    for s in schemes},
        "transforms": {"groups": len(mats), "type": "random-matrix", "online": True,
                       "tensor_bytes": sum(M.numel() * 4 for *_, M in mats.values())
                       } if mats else {},
        "ignored_fp": ignore, "deviations": deviations,
        "size_bytes": size, "tensor_bytes": size - header, "expected_tensor_bytes": expected,
        "quantized_weights": n_weights, "meta": meta or {},
    }
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    _publish(tmp, out_dir)
    return report


def _version() -> str:
    import compressed_tensors
    return compressed_tensors.__version__


def load_compressed_tensors(path: str | Path) -> nn.Module:
    """The exported checkpoint loaded back through transformers, decompressed (fp weights
    W_hat; activations fake-quantized by compressed-tensors' forward)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    _attach_transforms(model, Path(path))
    return model


def _attach_transforms(model: nn.Module, path: Path) -> None:
    """transformers (5.x) does not apply a checkpoint's `transform_config`: attach its online
    transforms with compressed-tensors' factories and load their matrices from
    model.safetensors (what vLLM's loader does)."""
    from compressed_tensors.transform import TransformConfig
    from safetensors import safe_open
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config", {})
    tcfg = qcfg.get("transform_config") or {}
    if not tcfg.get("config_groups"):
        return
    config = TransformConfig.model_validate(tcfg)
    if any(not a.is_online() for sc in config.config_groups.values() for a in sc.apply):
        raise ExportError(f"{path}: weight-side transforms are fused into the stored weights "
                          "by the writer; this loader applies online ones only")
    from compressed_tensors.utils import match_named_modules
    names = {f"{m}.{g}_{a.location}.weight" for g, sc in config.config_groups.items()
             for a in sc.apply for m, _ in match_named_modules(model, a.targets, a.ignore)}
    _apply_transforms(model, config)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        missing = names - set(f.keys())
        if missing:
            raise ExportError(f"{path}: transform matrices missing from model.safetensors: "
                              f"{sorted(missing)[:3]}")
        with torch.no_grad():
            for key in names:
                model.get_parameter(key).data = f.get_tensor(key)


# ------------------------------------------------------------------ GPTQ format

GPTQ_BITS = (4, 8)


def pack_gptq_rows(u: Tensor, bits: int) -> Tensor:
    """Unsigned codes u [R, C] -> int32 [R * bits / 32, C]: 32 / bits consecutive rows per
    word, row r at bit offset bits * (r % (32 / bits)) (AutoGPTQ's qweight layout)."""
    per = 32 // bits
    r, c = u.shape
    if r % per:
        raise ExportError(f"{r} rows do not pack {per} to an int32 word")
    u = u.to(torch.int64).view(r // per, per, c)
    shifts = (torch.arange(per, dtype=torch.int64) * bits)[None, :, None]
    word = (u << shifts).sum(dim=1)                                  # < 2^32
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def gptq_tensors(fq: FakeQuantLinear) -> dict[str, Tensor]:
    """qweight / qzeros / scales / g_idx (and bias) of one linear, AutoGPTQ v1 layout:
    W[n, k] = scales[g, n] * (u[n, k] - (qzeros[g, n] + 1)), g = g_idx[k]; symmetric
    weights are stored unsigned with the zero point 2^(b-1)."""
    bits = fq.w_bits
    q = fq.codes()                                                    # [N, K]
    n, k = q.shape
    groups = fq.w_scale.shape[1]
    if fq.w_zero is None:
        u, z = q + 2 ** (bits - 1), torch.full((n, groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        u, z = q, fq.w_zero.round().to(torch.int32)
    out = {"qweight": pack_gptq_rows(u.T.contiguous(), bits),        # [K * b / 32, N]
           # v1 stores z - 1 (wrapping to 2^b - 1 for z = 0), packed along N: [G, N * b / 32]
           "qzeros": pack_gptq_rows((z - 1) & (2 ** bits - 1), bits).T.contiguous(),
           "scales": fq.w_scale.T.to(torch.float16).contiguous(),     # [G, N]
           "g_idx": (torch.arange(k) // (k // groups)).to(torch.int32)}
    if fq.bias is not None:
        out["bias"] = fq.bias.detach().to(torch.float16)
    return out


def export_gptq(model: nn.Module, spec: ModelSpec, out_dir: str | Path, tokenizer: Any = None,
                meta: dict[str, Any] | None = None, kv_bits: int | None = None
                ) -> dict[str, Any]:
    """AutoGPTQ / GPTQModel checkpoint (format "gptq", v1 zero points): weight-only
    w4 / w8 with one group size for every quantized linear."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    found: dict[str, FakeQuantLinear] = {}
    for _, _, full, mod in iter_block_linears(model, spec):
        if isinstance(mod, TransformedLinear):
            raise ExportError(f"{full} computes in a rotated basis (QuIP / QuaRot transforms), "
                              "which the GPTQ format cannot hold; use export=compressed_tensors "
                              "(online transforms in its transform_config)")
        if isinstance(mod, FakeQuantLinear) and mod.w_bits < 16:
            if mod.w_bits not in GPTQ_BITS or mod.a_bits < 16 or mod.smooth_inv is not None:
                raise ExportError(f"{full} is w{mod.w_bits}a{mod.a_bits}: the GPTQ format "
                                  f"holds weight-only w{'/w'.join(map(str, GPTQ_BITS))} "
                                  f"(a16); for activations use export=compressed_tensors "
                                  f"(supported: {SUPPORTED})")
            found[full] = mod
        elif not isinstance(mod, nn.Linear):
            raise ExportError(f"{full} is a {type(mod).__name__}: export the simulated model")
    if not found:
        raise ExportError("the model has no quantized block linears: nothing to export")
    kinds = {(m.w_bits, m.group_size, m.w_symmetric) for m in found.values()}
    if len(kinds) > 1:
        raise ExportError(f"the GPTQ format has one bits / group_size / sym for the whole "
                          f"model; this one mixes {sorted(kinds, key=str)}")
    (bits, group_size, sym), = kinds
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in found or t.data_ptr() in seen:
            continue                      # quantized linears below; tied weights once
        seen.add(t.data_ptr())
        tensors[name] = t.detach().to(torch.float16) if t.is_floating_point() else t
    for full, fq in found.items():
        tensors.update({f"{full}.{k}": v for k, v in gptq_tensors(fq).items()})
    qcfg = {"bits": bits, "group_size": group_size or -1, "desc_act": False, "sym": sym,
            "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
            "quant_method": "gptq", "modules_in_block_to_quantize": None}
    tmp = _staging_dir(out_dir)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    hf_cfg = copy.deepcopy(model.config)
    hf_cfg.quantization_config = qcfg
    hf_cfg.torch_dtype = torch.float16
    hf_cfg.save_pretrained(tmp)
    (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    deviations: dict[str, list[str]] = {}
    rounded = sorted(n for n, fq in found.items()
                     if not torch.equal(fq.w_scale.half().float(), fq.w_scale.float()))
    if rounded:   # w8 layers keep fp32 scales in ptqbench; the format stores fp16
        deviations["scales rounded to fp16 (relative change <= 2^-11)"] = rounded
    if kv_bits:
        deviations[f"kv_bits={kv_bits}: the simulated KV-cache quantization is not exported"] = []
    report = {"format": "gptq", "path": str(out_dir), "quantize_config": qcfg,
              "linears": sorted(found), "deviations": deviations,
              "size_bytes": (tmp / "model.safetensors").stat().st_size,
              "quantized_weights": sum(m.weight.numel() for m in found.values()),
              "meta": meta or {}}
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    _publish(tmp, out_dir)
    return report


def check_export_target(out_dir: str | Path, source: str | Path | None = None) -> Path:
    """The resolved output directory, refused (ExportError) unless it is new, empty or a
    previous export (holds REPORT_FILE), and neither is nor contains `source`: an existing
    directory is replaced whole, so a typo (`.`, $HOME, the checkpoint) must never reach it."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"export output {out} is a file: give a directory path")
    if source is not None:
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents:
            raise ExportError(f"export output {out} is or contains the checkpoint {src} it "
                              "reads: give a separate directory")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_FILE).is_file():
        raise ExportError(f"export output {out} exists and is not a previous export (no "
                          f"{REPORT_FILE}); it would be replaced: give a new or empty directory")
    return out


def _staging_dir(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir (new, empty or a previous export: check_export_target) by tmp."""
    check_export_target(out_dir)
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def export_model(model: nn.Module, spec: ModelSpec, fmt: str, out_dir: str | Path,
                 source: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Write `model` as a `fmt` serving checkpoint in out_dir; `source`: the checkpoint it was
    read from (the output may not be or contain it)."""
    if fmt not in FORMATS:
        raise ExportError(f"export={fmt!r}; supported formats: {FORMATS}")
    out_dir = check_export_target(out_dir, source)
    if fmt == "gptq":
        return export_gptq(model, spec, out_dir, **kwargs)
    return export_compressed_tensors(model, spec, out_dir, **kwargs)
