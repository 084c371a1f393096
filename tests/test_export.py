"""compressed-tensors export, round-tripped through transformers on tiny-llama.

Tolerances: the decompressed weights are bit-exact (same codes, scales, zero points), so a
model with static (or no) activation quantization reproduces the simulated logits to 1e-5.
Dynamic per-token activations are fake-quantized by compressed-tensors' own forward with
s = max|x| / 127.5 (its symmetric scale spans 255 steps) where ptqbench and the serving
kernels use max|x| / 127; against the simulated model on that grid (`_on_ct_token_grid`)
the logits agree to 1e-4, against ptqbench's grid they differ by up to ~0.4 on tiny-llama
(|logits| ~2.6)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from harness.inputs.models import tiny_llama
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.catalog import build
from methods.checkpoint import save_runtime_checkpoint
from methods.layers import FakeQuantLinear, iter_block_linears
from methods.rtn import RTNConfig
from tests.conftest import TINY_QUICK

pytestmark = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                reason="compressed-tensors (the `export` extra) not installed")

G = 32


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=4)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 300, (1, 32), generator=gen) for _ in range(2)]
    ids = torch.randint(3, 300, (1, 40), generator=gen)
    return model, ModelSpec.from_model(model, "tiny"), calib, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(tiny, cfg):
    model, spec, calib, _ = tiny
    m = copy.deepcopy(model)
    build(cfg).quantize(m, spec, calib)
    return m


def _on_ct_token_grid(model, spec):
    """A copy whose dynamic per-token int8 inputs use compressed-tensors' scale
    max|x| / 127.5 (codes clamped to [-128, 127]) instead of ptqbench's max|x| / 127."""
    ref = copy.deepcopy(model)

    def quant(mod, args):
        x = args[0]
        s = (x.abs().amax(dim=-1, keepdim=True) / 127.5).clamp_min(1e-8)
        return (torch.clamp(torch.round(x / s), -128, 127) * s,)

    for *_, fq in iter_block_linears(ref, spec):
        if isinstance(fq, FakeQuantLinear) and fq.a_bits == 8 and fq.act_mode == "dynamic_token":
            fq.a_bits = 16
            fq.register_forward_pre_hook(quant)
    return ref


def _gptq(**kw):
    from methods.gptq import GPTQConfig
    return GPTQConfig(**kw)


def _smoothquant(**kw):
    from methods.smoothquant import SmoothQuantConfig
    return SmoothQuantConfig(**kw)


def _fptq(**kw):
    from methods.fptq import FPTQConfig
    return FPTQConfig(**kw)


def _quip(**kw):
    from methods.quip import QuIPConfig
    return QuIPConfig(**kw)


CASES = {   # name: (config, exact logits?)
    "rtn-w4a16-asym": (lambda: RTNConfig(w_bits=4, group_size=G, symmetric=False), True),
    "gptq-w4a16": (lambda: _gptq(w_bits=4, group_size=G), True),
    # the paper's Kronecker U, V with the rescale s; QuIP#'s randomized Hadamard without s
    "quip-w4a16-kronecker": (lambda: _quip(w_bits=4, group_size=G), True),
    "quip-w4a16-hadamard": (lambda: _quip(w_bits=4, group_size=G, incoherence="hadamard",
                                          rescale=False), True),
    "rtn-w8a8-static": (lambda: RTNConfig(w_bits=8, a_bits=8, act_mode="static_tensor"), True),
    "smoothquant-w8a8-static": (lambda: _smoothquant(w_bits=8, a_bits=8), True),
    "rtn-w8a8-dynamic": (lambda: RTNConfig(w_bits=8, a_bits=8, act_mode="dynamic_token"), False),
    "rtn-w4a8-dynamic": (lambda: RTNConfig(w_bits=4, a_bits=8, group_size=G,
                                           act_mode="dynamic_token"), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_reproduces_simulated_logits(tiny, tmp_path, name):
    from methods.export import export_compressed_tensors, load_compressed_tensors
    make, exact = CASES[name]
    model, spec, _, ids = tiny
    m = _quantized(tiny, make())
    report = export_compressed_tensors(m, spec, tmp_path / "ct")
    back = load_compressed_tensors(tmp_path / "ct")
    for _, _, full, fq in iter_block_linears(m, spec):
        torch.testing.assert_close(back.get_submodule(full).weight, fq.weight, atol=0, rtol=0)
    sim, out = _logits(m, ids), _logits(back, ids)
    if exact:
        torch.testing.assert_close(out, sim, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out, _logits(_on_ct_token_grid(m, spec), ids),
                                   atol=1e-4, rtol=1e-4)
    assert (out - _logits(model, ids)).abs().max() > 1e-3     # it is the quantized model
    assert report["tensor_bytes"] == report["expected_tensor_bytes"]
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == report["ct_format"]


def test_quip_transforms_are_online_random_matrix_groups(tiny, tmp_path):
    """One compressed-tensors transform group per linear and side, its matrix the simulated
    rotation: x M_in = R_in (x / s), y M_out = R_out^T y."""
    from safetensors.torch import load_file

    from methods.transformed import TransformedLinear
    _, spec, _, _ = tiny
    m = _quantized(tiny, _quip(w_bits=4, group_size=G))
    from methods.export import export_compressed_tensors
    report = export_compressed_tensors(m, spec, tmp_path / "ct")
    tcfg = json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["transform_config"]["config_groups"]
    linears = [(full, fq) for *_, full, fq in iter_block_linears(m, spec)]
    assert len(tcfg) == 2 * len(linears) == report["transforms"]["groups"]
    assert {sc["type"] for sc in tcfg.values()} == {"random-matrix"}
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    x = torch.randn(3, linears[0][1].in_features, generator=torch.Generator().manual_seed(1))
    for g, sc in tcfg.items():
        (args,) = sc["apply"]
        full, loc = args["targets"][0], args["location"]
        fq = m.get_submodule(full)
        assert isinstance(fq, TransformedLinear) and not args["inverse"]
        M = tensors[f"{full}.{g}_{loc}.weight"]
        if loc == "input" and fq.in_features == x.shape[1]:
            torch.testing.assert_close(x @ M, fq.r_in.apply(x * fq.smooth_inv))
        if loc == "output":
            torch.testing.assert_close(M @ M.T, torch.eye(M.shape[0]), atol=1e-5, rtol=0)


def test_rotations_that_cannot_export_are_refused(tiny, tmp_path):
    """QuaRot's online rotation sits before an activation quantizer (compressed-tensors'
    input transform runs there too, but a16 only is round-trip tested); the GPTQ format
    has no transforms at all."""
    from methods.export import ExportError, export_compressed_tensors, export_model
    from methods.quarot import QuaRotConfig
    _, spec, _, _ = tiny
    m = _quantized(tiny, QuaRotConfig(w_bits=4, a_bits=8, weight_solver="rtn"))
    with pytest.raises(ExportError, match="QuIP w4a16"):
        export_compressed_tensors(m, spec, tmp_path / "x")
    q = _quantized(tiny, _quip(w_bits=4, group_size=G, incoherence="hadamard", rescale=False))
    with pytest.raises(ExportError, match="export=compressed_tensors"):
        export_model(q, spec, "gptq", tmp_path / "g")


def test_file_size_follows_bits_per_weight(tiny, tmp_path):
    from methods.export import export_compressed_tensors
    _, spec, _, _ = tiny
    sizes = {}
    for bits in (4, 8):
        m = _quantized(tiny, RTNConfig(w_bits=bits, group_size=G if bits == 4 else None))
        sizes[bits] = export_compressed_tensors(m, spec, tmp_path / f"w{bits}")
    n = sizes[4]["quantized_weights"]
    # 4 bits fewer per weight, less the int4 layers' extra group scales (fp32, one per G)
    groups_extra = n // G - sum(fq.out_features for *_, fq in iter_block_linears(
        _quantized(tiny, RTNConfig(w_bits=4, group_size=G)), spec))
    assert sizes[8]["tensor_bytes"] - sizes[4]["tensor_bytes"] == (
        n // 2 - 4 * groups_extra - 16 * 14)


def test_fptq_static_w4a8_layers_exported_dynamic_and_listed(tiny, tmp_path):
    from methods.export import export_compressed_tensors, load_compressed_tensors
    model, spec, _, ids = tiny
    m = _quantized(tiny, _fptq(group_size=G, v0=1.0, v1=1e4))     # every group static (LAE)
    static = [full for *_, full, fq in iter_block_linears(m, spec)
              if isinstance(fq, FakeQuantLinear) and fq.act_mode == "static_tensor"]
    assert static
    report = export_compressed_tensors(m, spec, tmp_path / "ct")
    (dev, listed), = report["deviations"].items()
    assert "dynamic per-token" in dev and sorted(listed) == sorted(static)
    ref = copy.deepcopy(m)
    for *_, fq in iter_block_linears(ref, spec):
        fq.act_mode = "dynamic_token"
    out = _logits(load_compressed_tensors(tmp_path / "ct"), ids)
    torch.testing.assert_close(out, _logits(_on_ct_token_grid(ref, spec), ids),
                               atol=1e-4, rtol=1e-4)


def test_refusals_name_the_supported_schemes(tiny, tmp_path):
    from methods.export import ExportError, export_compressed_tensors, export_model
    _, spec, _, _ = tiny
    with pytest.raises(ExportError, match="W4A16"):
        export_compressed_tensors(_quantized(tiny, RTNConfig(w_bits=3, group_size=G)), spec,
                                  tmp_path / "x")
    with pytest.raises(ExportError, match="supported formats"):
        export_model(_quantized(tiny, RTNConfig(w_bits=4, group_size=G)), spec, "awq", tmp_path)
    m = _quantized(tiny, RTNConfig(w_bits=4, group_size=G))
    rt = build(RTNConfig(w_bits=4, group_size=G)).to_runtime(m, spec)
    with pytest.raises(ExportError, match="runtime=false"):
        export_compressed_tensors(rt, spec, tmp_path / "y")


def test_cli_exports_a_saved_checkpoint(tiny, tmp_path, capsys):
    from harness.run.export_cli import main
    from methods.export import load_compressed_tensors
    _, spec, _, ids = tiny
    m = _quantized(tiny, RTNConfig(w_bits=4, group_size=G))
    ckpt = save_runtime_checkpoint(m, spec, tmp_path / "ckpt", {"model": "tiny"})
    assert main([str(ckpt), str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "compressed_tensors"
    torch.testing.assert_close(_logits(load_compressed_tensors(tmp_path / "out"), ids),
                               _logits(m, ids), atol=1e-5, rtol=1e-5)
    assert main([str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2


def test_cli_never_replaces_a_directory_that_is_not_an_export(tiny, tmp_path, capsys):
    # the output directory is replaced whole: `.`, a user directory or the checkpoint's own
    # directory given as the output were deleted
    from harness.run.export_cli import main
    _, spec, _, _ = tiny
    ckpt = save_runtime_checkpoint(_quantized(tiny, RTNConfig(w_bits=4, group_size=G)), spec,
                                   tmp_path / "run" / "ckpt", {"model": "tiny"})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, ckpt, ckpt.parent, mine / "notes.txt"):
        assert main([str(ckpt), str(out)]) == 2
    assert main([str(ckpt), str(tmp_path / "o"), "--tokenizer", str(tmp_path / "none")]) == 2
    assert (mine / "notes.txt").read_text() == "keep me" and (ckpt / "ptq_runtime.json").is_file()
    err = capsys.readouterr().err
    assert "is not a previous export" in err and "contains the checkpoint" in err
    for fmt in ("gptq", "gptq"):      # a previous export is replaced; gptq printed a KeyError
        assert main([str(ckpt), str(tmp_path / "g"), "--format", fmt]) == 0
        assert json.loads(capsys.readouterr().out)["format"] == "gptq"


def test_run_option_writes_export_beside_the_record(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16", "export=compressed_tensors"))
    assert rec.status == "ok", rec.error
    ex = rec.artifacts["export"]
    assert ex["format"] == "compressed_tensors" and ex["size_bytes"] > 0
    assert ex["path"].endswith("export-compressed_tensors") and not ex["deviations"]
    bad = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w3a16", "export=compressed_tensors"))
    assert bad.status == "ok" and "W4A16" in bad.artifacts["export"]["error"]
    quip = run_one(compose_cfg(*TINY_QUICK, "method=quip", "bits=w4a16",
                               "export=compressed_tensors"))
    assert quip.status == "ok", quip.error
    from harness.results.paper_tables import exports_table
    from harness.results.records import records_frame
    from harness.results.store import ResultStore
    table = exports_table(records_frame(ResultStore(rec.config["paths"]["runs_dir"])))
    cells = {(r[1].text.split()[0], r[2].text): [c.text for c in r] for r in table.rows}
    assert cells["rtn", "w4a16"][3] == "compressed_tensors/pack-quantized"
    assert cells["rtn", "w4a16"][6] == ex["path"] and "W4A16" in cells["rtn", "w3a16"][6]
    n = quip.artifacts["export"]["transforms"]["groups"]
    assert n > 0 and cells["quip", "w4a16"][3] == (
        f"compressed_tensors/pack-quantized + {n} online transforms")


# ------------------------------------------------------------------ GPTQ format

def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference reader of the AutoGPTQ layout: int32 [R', C] -> codes [R' * 32 / bits, C]."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * i)) & (2 ** bits - 1) for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1, words.shape[1])


@pytest.mark.parametrize("cfg", [
    RTNConfig(w_bits=4, group_size=G), RTNConfig(w_bits=4, group_size=G, symmetric=False),
    RTNConfig(w_bits=8), _gptq(w_bits=4, group_size=G, symmetric=False)],
    ids=["w4-sym", "w4-asym", "w8-channel", "gptq-w4-asym"])
def test_gptq_format_v1_zero_points_dequantize_to_the_simulated_weights(tiny, tmp_path, cfg):
    from safetensors.torch import load_file

    from methods.export import export_model
    _, spec, _, _ = tiny
    m = _quantized(tiny, cfg)
    report = export_model(m, spec, "gptq", tmp_path / "g")
    qc = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq" and qc["bits"] == cfg.w_bits
    assert qc["sym"] == cfg.symmetric and qc["group_size"] == (cfg.group_size or -1)
    assert json.loads((tmp_path / "g" / "config.json").read_text())[
        "quantization_config"]["quant_method"] == "gptq"
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    b = cfg.w_bits
    for *_, full, fq in iter_block_linears(m, spec):
        u = _unpack_rows(t[f"{full}.qweight"], b)                       # [K, N]
        z = _unpack_rows(t[f"{full}.qzeros"].T.contiguous(), b).T + 1     # v1: stored z - 1
        g = t[f"{full}.g_idx"].long()
        W = (u - z[g]).float() * t[f"{full}.scales"].float()[g]          # [K, N]
        if b == 4:    # fp16 group scales already: exact
            torch.testing.assert_close(W.T, fq.weight, atol=0, rtol=0)
        else:         # fp32 scales stored as fp16: the listed deviation
            torch.testing.assert_close(W.T, fq.weight, atol=0, rtol=2 ** -11)
    assert f"{full}.weight" not in t and report["size_bytes"] > 0
    assert bool(report["deviations"]) == (b == 8)


def test_gptq_format_refuses_activation_quantization(tiny, tmp_path):
    from methods.export import ExportError, export_model
    _, spec, _, _ = tiny
    m = _quantized(tiny, RTNConfig(w_bits=4, a_bits=8, group_size=G, act_mode="dynamic_token"))
    with pytest.raises(ExportError, match="compressed_tensors"):
        export_model(m, spec, "gptq", tmp_path / "g")


@pytest.mark.slow      # GPTQModel's import and kernel selection take minutes on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="GPTQModel is not installed (make install-gptqmodel)")
def test_gptq_format_loads_through_gptqmodel(tiny, tmp_path):
    """GPTQModel reads the v1 zero points right: its (fp16) logits equal the simulated
    model's to 1% of their norm (a v2 misreading shifts every code by one step)."""
    from gptqmodel import GPTQModel

    from harness.inputs.models import tiny_tokenizer
    from methods.export import export_model
    _, spec, _, ids = tiny
    m = _quantized(tiny, RTNConfig(w_bits=4, group_size=G))
    export_model(m, spec, "gptq", tmp_path / "g", tokenizer=tiny_tokenizer())
    back = GPTQModel.load(str(tmp_path / "g"), device="cpu")
    out, sim = _logits(back.model, ids).float(), _logits(m, ids)
    assert float((out - sim).norm() / sim.norm()) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [
    RTNConfig(w_bits=4, group_size=64, symmetric=False),
    RTNConfig(w_bits=8, a_bits=8, act_mode="dynamic_token"),
    RTNConfig(w_bits=4, a_bits=8, group_size=64, act_mode="dynamic_token"),
    _quip(w_bits=4, group_size=64, keep_fp=("model.layers.[1-9]*",))],   # block 0: CPU time
    ids=["w4a16", "w8a8-dynamic", "w4a8-dynamic", "quip-w4a16"])
def test_smollm2_round_trip(compose_cfg, tmp_path, cfg):
    """SmolLM2-135M (tied embeddings): bit-exact weights and the logits of the simulated
    model (dynamic schemes: on compressed-tensors' token grid; QuIP: through its online
    transforms, block 0's seven linears, every shape, calibrated on two random 64-token
    sequences; the other blocks stay fp and are listed in `ignore`)."""
    from harness.inputs.models import load_model
    from methods.export import export_compressed_tensors, load_compressed_tensors
    from methods.quip import QuIPConfig

    c = compose_cfg("model=smollm2-135m", "model.device=cpu")
    lm = load_model(c.model, c.paths.cache_dir)
    gen = torch.Generator().manual_seed(1)
    calib = ([torch.randint(0, 1000, (1, 64), generator=gen) for _ in range(2)]
             if isinstance(cfg, QuIPConfig) else None)
    build(cfg).quantize(lm.model, lm.spec, calib)
    report = export_compressed_tensors(lm.model, lm.spec, tmp_path / "ct", tokenizer=lm.tokenizer)
    back = load_compressed_tensors(tmp_path / "ct")
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = _on_ct_token_grid(lm.model, lm.spec) if cfg.a_bits < 16 else lm.model
    torch.testing.assert_close(_logits(back, ids), _logits(ref, ids), atol=1e-3, rtol=1e-3)
    assert report["tensor_bytes"] == report["expected_tensor_bytes"]


def test_simulated_kv_cache_is_a_listed_deviation(tiny, tmp_path):
    from methods.export import export_compressed_tensors, load_compressed_tensors
    _, spec, _, ids = tiny
    cfg = RTNConfig(w_bits=4, group_size=G, kv_bits=4)
    m = _quantized(tiny, cfg)
    build(cfg).quantize_kv_cache(m, spec, None)
    report = export_compressed_tensors(m, spec, tmp_path / "ct", kv_bits=4)
    assert any(d.startswith("kv_bits=4") for d in report["deviations"])
    assert "ptqbench" not in (tmp_path / "ct" / "config.json").read_text()
    assert m.config._attn_implementation.startswith("ptqbench_kv")    # the source untouched
    back = load_compressed_tensors(tmp_path / "ct")
    assert not any(hasattr(x, "kv_quant") for x in back.modules())
    assert _logits(back, ids).isfinite().all()
