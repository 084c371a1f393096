"""Tests for kernels/: packing layout, exact references, Triton kernels vs references.

Triton kernels run on CPU under TRITON_INTERPRET=1 (marker `interpret`), which must be set
before triton decorates the kernels: this module sets it (when no CUDA device exists) before
importing any kernels.* Triton module. With a GPU, the same grid runs compiled (`gpu`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from kernels import ops  # noqa: E402
from kernels.reference import (  # noqa: E402
    ACT_SCALE_EPS,
    from_kernel_layout,
    int_matmul,
    kernel_layout_chunk,
    pack_int4,
    quant_per_tensor_ref,
    quant_per_token_ref,
    to_kernel_layout,
    two_level_int8_weight,
    unpack_int4,
    w4a8_gemm_ref,
    w4a8_two_level_ref,
    w8a8_gemm_ref,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
INTERPRETED = False
if HAS_TRITON:
    from kernels._triton_common import INTERPRETED  # noqa: E402
    from kernels.quant_per_token import quant_per_tensor, quant_per_token  # noqa: E402
    from kernels.w4a8_gemm import w4a8_gemm, w4a8_two_level_gemm  # noqa: E402
    from kernels.w8a8_gemm import w8a8_gemm  # noqa: E402

DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.interpret,
            pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 set before import"),
        ],
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton"),
        ],
    ),
]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint(lo: int, hi: int, shape, seed: int) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=_gen(seed), dtype=torch.int8)


def _close(y: torch.Tensor, r: torch.Tensor) -> None:
    """fp comparison scaled to the output magnitude (accumulation-order rounding only)."""
    assert y.dtype == r.dtype and y.shape == r.shape
    tol = TOL[r.dtype]
    atol = tol * max(1.0, float(r.float().abs().max()))
    assert_close(y.float().cpu(), r.float().cpu(), rtol=tol, atol=atol)


def _w4_problem(m: int, n: int, k: int, g: int, seed: int, device="cpu"):
    xq = _randint(-128, 128, (m, k), seed)
    w = _randint(-8, 8, (n, k), seed + 1)
    ws = (torch.rand(n, k // g, generator=_gen(seed + 2)) * 0.02 + 0.001).half()
    xs = torch.rand(m, generator=_gen(seed + 3)) * 0.05 + 0.001
    bias = torch.randn(n, generator=_gen(seed + 4)).half()
    return [t.to(device) for t in (xq, w, pack_int4(w), ws, xs, bias)]


# ---------------------------------------------------------------------------------------
# packing layout
# ---------------------------------------------------------------------------------------


def test_pack_layout_hand_computed():
    w = torch.tensor([[1, -1, -8, 7], [0, 3, -2, -5]], dtype=torch.int8)
    expected = torch.tensor([[0xF1, 0x78], [0x30, 0xBE]], dtype=torch.uint8)
    assert torch.equal(pack_int4(w), expected)
    assert torch.equal(unpack_int4(expected), w)


def test_pack_round_trip_all_values():
    w = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 4)[:, torch.randperm(64, generator=_gen(0))]
    p = pack_int4(w)
    assert p.shape == (3, 32) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), w)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8))


def test_nibble_word_trick_matches_unpack():
    """The compiled W4A8 kernel sign-extends nibbles four bytes per 32-bit word (inline PTX
    in kernels.w4a8_gemm: t = (v >> shift) & 0x0F0F0F0F; t | ((t & 0x08080808) * 30)). The
    same arithmetic on every byte value equals unpack_int4 (the PTX itself runs in the gpu
    tests only: the interpreter executes no PTX)."""
    pytest.importorskip("triton")
    from kernels.w4a8_gemm import _HI_ASM, _LO_ASM

    assert "0x0F0F0F0F" in _LO_ASM.value and "mul.lo.u32 m, m, 30" in _HI_ASM.value
    b = torch.arange(256, dtype=torch.int64)
    words = b | (b.roll(1) << 8) | (b.roll(2) << 16) | (b.roll(3) << 24)
    want = unpack_int4(torch.stack([(words >> (8 * j)) & 0xFF for j in range(4)], 1).to(torch.uint8))
    for half, shift in ((0, 0), (1, 4)):
        t = (words >> shift) & 0x0F0F0F0F
        r = (t | ((t & 0x08080808) * 30)) & 0xFFFFFFFF
        got = torch.stack([(r >> (8 * j)) & 0xFF for j in range(4)], 1).to(torch.uint8).view(torch.int8)
        assert torch.equal(got, want[:, half::2])


@pytest.mark.parametrize("g,chunk", [(64, 64), (128, 128), (192, 64), (256, 128), (32, None)])
def test_prepare_w4a8_weight_kernel_layout(g, chunk):
    _, w, p, ws, _, _ = _w4_problem(1, 8, 768, g, 0)
    kp, ws2 = ops.prepare_w4a8_weight(p, ws.float(), g)
    assert kernel_layout_chunk(g) == chunk and ws2.dtype == torch.float16
    assert torch.equal(from_kernel_layout(kp, g), p)
    if chunk is None:  # reference-only group sizes keep the packing layout
        assert torch.equal(kp, p)
        return
    # byte j of chunk c: w[c*C + j] in the low nibble, w[c*C + C/2 + j] in the high nibble
    c, j = 1, 5
    byte = int(kp[0, c * chunk // 2 + j])
    lo, hi = byte & 0xF, byte >> 4
    assert [v - 16 if v >= 8 else v for v in (lo, hi)] == [int(w[0, c * chunk + j]), int(w[0, c * chunk + chunk // 2 + j])]
    with pytest.raises(ValueError):
        ops.prepare_w4a8_weight(p, ws, 96)


# ---------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["int_mm", "int64", "float64", "auto"])
@pytest.mark.parametrize("m", [1, 9])
def test_int_matmul_exact(backend, m):
    if backend == "int_mm" and not hasattr(torch, "_int_mm"):
        pytest.skip("torch._int_mm missing")
    a, b = _randint(-128, 128, (m, 512), 1), _randint(-128, 128, (24, 512), 2)
    exact = a.long() @ b.long().t()
    assert torch.equal(int_matmul(a, b, backend).long(), exact)
    worst = int_matmul(torch.full((m, 4096), -128, dtype=torch.int8),
                       torch.full((8, 4096), -128, dtype=torch.int8), backend)  # fmt: skip
    assert worst.dtype == torch.int32 and int(worst.min()) == int(worst.max()) == 128 * 128 * 4096


@pytest.mark.parametrize("m,n,k,g", [(1, 40, 128, 64), (7, 72, 256, 128), (33, 40, 256, 32)])
@pytest.mark.parametrize("per_token", [True, False])
def test_w4a8_ref_vs_dequant_float64(m, n, k, g, per_token):
    xq, w, p, ws, xs, bias = _w4_problem(m, n, k, g, seed=m + n)
    xs = xs if per_token else xs[0].clone().reshape(())
    y = w4a8_gemm_ref(xq, xs, p, ws, g, bias=bias, out_dtype=torch.float32)
    w_deq = w.double() * ws.double().repeat_interleave(g, dim=1)
    xs64 = xs.double()[:, None] if per_token else xs.double()
    naive = (xq.double() @ w_deq.t()) * xs64 + bias.double()
    assert_close(y.double(), naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))


def test_w4a8_ref_exact_integer_part_worst_case():
    m, n, k, g = 3, 5, 256, 128
    xq = torch.full((m, k), -128, dtype=torch.int8)
    p = pack_int4(torch.full((n, k), -8, dtype=torch.int8))
    ones = torch.ones(n, k // g, dtype=torch.float16)
    y = w4a8_gemm_ref(xq, torch.tensor(1.0), p, ones, g, out_dtype=torch.float32)
    assert torch.equal(y, torch.full((m, n), 1024.0 * k))


def test_w8a8_ref_vs_float64():
    m, n, k = 5, 24, 320
    xq, wq = _randint(-128, 128, (m, k), 3), _randint(-128, 128, (n, k), 4)
    ws, xs = torch.rand(n, generator=_gen(5)) * 0.01, torch.rand(m, generator=_gen(6))
    y = w8a8_gemm_ref(xq, xs, wq, ws, out_dtype=torch.float32)
    naive = (xq.double() @ wq.double().t()) * ws.double() * xs.double()[:, None]
    assert_close(y.double(), naive, rtol=1e-5, atol=1e-6)


def test_quant_per_token_ref_semantics():
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, 127.0], [0.0] * 5, [-1.0, 0.25, 0.0, 0.0, 0.0]])
    xq, s = quant_per_token_ref(x)
    assert torch.equal(s, torch.tensor([1.0, ACT_SCALE_EPS, 1.0 / 127.0], dtype=torch.float32))
    assert xq[0].tolist() == [0, 2, 2, -2, 127]  # ties to even
    assert xq[1].tolist() == [0] * 5 and xq[2, 0] == -127
    sm = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5])
    xq2, s2 = quant_per_token_ref(x, sm)
    assert float(s2[0]) == pytest.approx(63.5 / 127.0) and xq2[0, 4] == 127
    q = quant_per_tensor_ref(x, 0.5)
    assert q[0].tolist() == [1, 3, 5, -5, 127] and q.dtype == torch.int8


# ---------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, compiled on CUDA)
# ---------------------------------------------------------------------------------------

W4_GRID = [(1, 40, 128, 64), (2, 72, 256, 128), (7, 40, 256, 64), (16, 72, 128, 64),
           (33, 40, 256, 128), (70, 72, 256, 64),
           (5, 40, 512, 256), (3, 24, 384, 192)]  # several layout chunks per group  # fmt: skip
OUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx", range(len(W4_GRID)))
def test_w4a8_kernel_vs_ref(device, idx):
    m, n, k, g = W4_GRID[idx]
    xq, _, p, ws, xs, bias = _w4_problem(m, n, k, g, seed=idx, device=device)
    for j, (per_token, use_bias) in enumerate([(True, True), (False, False), (True, False)]):
        x_scale = xs if per_token else xs[:1].clone().reshape(())
        b = bias if use_bias else None
        out_dtype = OUT_DTYPES[(idx + j) % 3]
        y = w4a8_gemm(xq, x_scale, to_kernel_layout(p, g), ws, g, bias=b, out_dtype=out_dtype)
        r = w4a8_gemm_ref(xq.cpu(), x_scale.cpu(), p.cpu(), ws.cpu(), g,
                          bias=None if b is None else b.cpu(), out_dtype=out_dtype)  # fmt: skip
        _close(y, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k,g", [(1, 64), (2, 64), (3, 64), (2, 128)])
def test_w4a8_kernel_exact_int32(device, split_k, g):
    """Unit scales + fp32 output expose the integer accumulation: must be exact."""
    m, n, k = 7, 40, 512
    xq, w, p, _, _, _ = _w4_problem(m, n, k, g, seed=11, device=device)
    ones = torch.ones(n, k // g, dtype=torch.float16, device=device)
    one = torch.tensor(1.0, device=device)
    y = w4a8_gemm(xq, one, to_kernel_layout(p, g), ones, g, out_dtype=torch.float32, split_k=split_k)
    exact = (xq.cpu().long() @ w.cpu().long().t()).float()
    assert torch.equal(y.cpu(), exact)
    # worst case: xq = -128, w = -8 everywhere
    xq = torch.full((m, k), -128, dtype=torch.int8, device=device)
    p = pack_int4(torch.full((n, k), -8, dtype=torch.int8)).to(device)
    y = w4a8_gemm(xq, one, p, ones, g, out_dtype=torch.float32, split_k=split_k)
    assert torch.equal(y.cpu(), torch.full((m, n), 1024.0 * k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 128), (7, 72, 300), (33, 40, 256), (70, 24, 520)])
def test_w8a8_kernel_vs_ref(device, m, n, k):
    xq, wq = _randint(-128, 128, (m, k), m), _randint(-128, 128, (n, k), n)
    ws = torch.rand(n, generator=_gen(1)) * 0.01 + 1e-4
    xs = torch.rand(m, generator=_gen(2)) * 0.05 + 1e-3
    bias = torch.randn(n, generator=_gen(3)).half()
    dev = [t.to(device) for t in (xq, wq, ws, xs, bias)]
    for j, (per_token, use_bias) in enumerate([(True, True), (False, False)]):
        x_scale = dev[3] if per_token else dev[3][:1].clone().reshape(())
        out_dtype = OUT_DTYPES[(m + j) % 3]
        y = w8a8_gemm(dev[0], x_scale, dev[1], dev[2], dev[4] if use_bias else None, out_dtype)
        r = w8a8_gemm_ref(xq, x_scale.cpu(), wq, ws, bias if use_bias else None, out_dtype)
        _close(y, r)
    one = torch.tensor(1.0, device=device)
    for split_k in (1, 2):
        y = w8a8_gemm(dev[0], one, dev[1], torch.ones(n, device=device),
                      out_dtype=torch.float32, split_k=split_k)  # fmt: skip
        assert torch.equal(y.cpu(), (xq.long() @ wq.long().t()).float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_kernels_match_ref_bitwise(device, dtype):
    for m, k in [(1, 64), (7, 300), (3, 1000)]:
        x = (torch.randn(m, k, generator=_gen(m * k)) * 3).to(dtype)
        x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, 127.0 / 2])  # exact ties
        if m > 2:
            x[2] = 0.0  # all-zero row -> eps scale
        smooth = torch.rand(k, generator=_gen(k)) + 0.5
        for s in (None, smooth):
            xq, sc = quant_per_token(x.to(device), None if s is None else s.to(device))
            xq_r, sc_r = quant_per_token_ref(x, s)
            assert torch.equal(xq.cpu(), xq_r) and torch.equal(sc.cpu(), sc_r)
            q = quant_per_tensor(x.to(device), 0.03, None if s is None else s.to(device))
            assert torch.equal(q.cpu(), quant_per_tensor_ref(x, 0.03, s))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_linear_triton_vs_reference(device):
    n, k, g = 40, 256, 128
    _, _, p, ws, _, bias = _w4_problem(1, n, k, g, seed=5, device=device)
    x = torch.randn(2, 3, k, generator=_gen(9)).half().to(device)
    smooth = (torch.rand(k, generator=_gen(8)) + 0.5).to(device)
    kp, ws16 = ops.prepare_w4a8_weight(p, ws, g)  # kernel layout, as the runtime modules hold
    for mode, scale in (("dynamic_token", None), ("static_tensor", 0.02)):
        kw = dict(act_mode=mode, act_scale=scale, smooth_inv=smooth, bias=bias)
        y = ops.w4a8_linear(x, kp, ws16, g, backend="triton", **kw)
        r = ops.w4a8_linear(x.cpu(), kp.cpu(), ws16.cpu(), g, backend="reference",
                            **{**kw, "smooth_inv": smooth.cpu(), "bias": bias.cpu()})  # fmt: skip
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        _close(y, r)
        xq, xs = ops.quantize_activations(x.cpu().reshape(-1, k), mode, scale, smooth.cpu())
        direct = w4a8_gemm_ref(xq, xs, p.cpu(), ws16.cpu(), g, bias=bias.cpu())  # packing layout
        assert torch.equal(r.reshape(-1, n), direct)
    wq = _randint(-128, 128, (n, k), 4).to(device)
    wsc = (torch.rand(n, generator=_gen(4)) * 0.01).to(device)
    y = ops.w8a8_linear(x, wq, wsc, backend="triton", out_dtype=torch.float32)
    r = ops.w8a8_linear(x.cpu(), wq.cpu(), wsc.cpu(), backend="reference", out_dtype=torch.float32)
    _close(y, r)


# ---------------------------------------------------------------------------------------
# input validation (checks run before any launch)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_w4a8_bad_inputs():
    xq, _, p, ws, xs, bias = _w4_problem(4, 40, 256, 128, seed=0)
    with pytest.raises(TypeError, match="xq"):
        w4a8_gemm(xq.float(), xs, p, ws, 128)
    with pytest.raises(TypeError, match="w_packed"):
        w4a8_gemm(xq, xs, p.to(torch.int8), ws, 128)
    with pytest.raises(ValueError, match="contiguous"):
        w4a8_gemm(xq.t().contiguous().t(), xs, p, ws, 128)
    with pytest.raises(ValueError, match="group_size"):
        w4a8_gemm(xq, xs, p, ws, 96)
    with pytest.raises(ValueError, match="multiple of 64"):
        w4a8_gemm(xq, xs, p, ws, 32)
    with pytest.raises(ValueError, match="not a multiple"):
        w4a8_gemm(xq[:, :192].contiguous(), xs, p[:, :96].contiguous(), ws[:, :1].contiguous(), 128)
    with pytest.raises(ValueError, match="K="):
        w4a8_gemm(xq[:, :128].contiguous(), xs, p, ws, 128)
    with pytest.raises(ValueError, match="w_scale"):
        w4a8_gemm(xq, xs, p, ws[:, :1].contiguous(), 128)
    with pytest.raises(ValueError, match="x_scale"):
        w4a8_gemm(xq, xs[:3].contiguous(), p, ws, 128)
    with pytest.raises(TypeError, match="x_scale"):
        w4a8_gemm(xq, xs.half(), p, ws, 128)
    with pytest.raises(ValueError, match="bias"):
        w4a8_gemm(xq, xs, p, ws, 128, bias=bias[:5].contiguous())
    with pytest.raises(TypeError, match="out_dtype"):
        w4a8_gemm(xq, xs, p, ws, 128, out_dtype=torch.int32)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_w8a8_and_quant_bad_inputs():
    xq, wq = _randint(-128, 128, (4, 64), 0), _randint(-128, 128, (8, 64), 1)
    ws, xs = torch.ones(8), torch.ones(4)
    with pytest.raises(ValueError, match="disagree on K"):
        w8a8_gemm(xq, xs, wq[:, :32].contiguous(), ws)
    with pytest.raises(TypeError, match="w_scale"):
        w8a8_gemm(xq, xs, wq, ws.half())
    with pytest.raises(ValueError, match="contiguous"):
        w8a8_gemm(xq, xs, wq.t().contiguous().t(), ws)
    with pytest.raises(TypeError, match="x"):
        quant_per_token(xq)
    with pytest.raises(ValueError, match="smooth_inv"):
        quant_per_token(torch.randn(4, 64), torch.ones(63))
    with pytest.raises(ValueError, match="scalar"):
        quant_per_tensor(torch.randn(4, 64), torch.ones(2))


def test_ops_bad_inputs():
    _, _, p, ws, _, _ = _w4_problem(1, 8, 128, 64, 0)
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match="act_scale"):
        ops.w4a8_linear(x, p, ws, 64, act_mode="static_tensor")
    with pytest.raises(ValueError, match="act_mode"):
        ops.w4a8_linear(x, p, ws, 64, act_mode="per_channel")
    with pytest.raises(ValueError, match="last dim"):
        ops.w4a8_linear(torch.randn(3, 64), p, ws, 64)
    with pytest.raises(ValueError, match="backend"):
        ops.w4a8_linear(x, p, ws, 64, backend="cuda")


def test_reference_modules_import_without_triton():
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def block(name, *a, **k):\n"
        "    if name.split('.')[0] == 'triton':\n"
        "        raise ImportError('blocked')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = block\n"
        "import kernels, kernels.reference, kernels.ops\n"
        "assert not kernels.ops.triton_available()\n"
        "assert not hasattr(kernels, 'get_kernel')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=120)


# ---------------------------------------------------------------------------------------
# bad static scales and non-finite activations (the same on every backend)
# ---------------------------------------------------------------------------------------

BAD_SCALES = [0.0, -0.02, float("nan"), float("inf"), 1e-46]  # 1e-46 flushes to 0 in fp32


@pytest.mark.parametrize("bad", BAD_SCALES + [torch.tensor(0.0), torch.tensor(float("nan"))],
                         ids=lambda v: f"t{float(v)}" if isinstance(v, torch.Tensor) else str(v))
def test_bad_static_activation_scale_is_refused(bad):
    n, k, g = 40, 256, 128
    _, _, p, ws, _, _ = _w4_problem(1, n, k, g, seed=3)
    kp, ws16 = ops.prepare_w4a8_weight(p, ws, g)
    x = torch.randn(3, k)
    wq, wsc = _randint(-128, 128, (n, k), 4), torch.rand(n, generator=_gen(4)) * 0.01
    backends = ["reference"] + (["triton"] if INTERPRETED else [])
    for backend in backends:
        with pytest.raises(ValueError, match="act_scale"):
            ops.w4a8_linear(x, kp, ws16, g, act_mode="static_tensor", act_scale=bad, backend=backend)
        with pytest.raises(ValueError, match="act_scale"):
            ops.w8a8_linear(x, wq, wsc, act_mode="static_tensor", act_scale=bad, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        quant_per_tensor_ref(x, bad)
    xq = _randint(-128, 128, (3, k), 5)
    s = torch.as_tensor(bad, dtype=torch.float32)
    with pytest.raises(ValueError, match="x_scale"):
        w4a8_gemm_ref(xq, s, p, ws, g)
    with pytest.raises(ValueError, match="x_scale"):
        w8a8_gemm_ref(xq, s, wq, wsc)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="scale"):
            quant_per_tensor(x, bad)
        with pytest.raises(ValueError, match="x_scale"):
            w4a8_gemm(xq, s, kp, ws16, g)
        with pytest.raises(ValueError, match="x_scale"):
            w8a8_gemm(xq, s, wq, wsc)


def test_static_scale_checked_once_per_version():
    """A scale tensor that passed is not read again (no stream sync per call on a GPU) until
    it is modified in place."""
    from kernels.validate import static_scale

    s = torch.tensor(0.5)
    static_scale(s, "act_scale")
    s.zero_()  # in-place change: checked again
    with pytest.raises(ValueError, match="act_scale"):
        static_scale(s, "act_scale")


def _nonfinite_x(k: int, dtype=torch.float16) -> torch.Tensor:
    x = torch.randn(6, k, generator=_gen(7)).to(dtype)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[4, k - 1] = float("-inf")
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,scale", [("dynamic_token", None), ("static_tensor", 0.03)])
def test_nonfinite_activations_give_nan_rows_on_every_backend(device, mode, scale):
    """NaN / inf in a row of x -> that output row is NaN, the other rows are unchanged, on the
    Triton path and the reference alike (codes and scales equal bit for bit, NaN included)."""
    n, k, g = 40, 256, 128
    _, _, p, ws, _, bias = _w4_problem(1, n, k, g, seed=5)
    kp, ws16 = ops.prepare_w4a8_weight(p, ws, g)
    x = _nonfinite_x(k)
    smooth = torch.rand(k, generator=_gen(8)) + 0.5
    bad = torch.tensor([False, True, True, False, True, False])
    xq_r, xs_r = ops.quantize_activations(x, mode, scale, smooth, use_triton=False)
    xq_t, xs_t = ops.quantize_activations(x.to(device), mode, scale, smooth.to(device), use_triton=True)
    assert torch.equal(xq_t.cpu(), xq_r) and not xq_r[~torch.isfinite(x)].any()
    assert_close(xs_t.cpu(), xs_r, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(xs_r.isnan(), bad)
    wq, wsc = _randint(-128, 128, (n, k), 4), torch.rand(n, generator=_gen(4)) * 0.01
    kw = dict(act_mode=mode, act_scale=scale, bias=bias)
    for run in (lambda dev, b: ops.w4a8_linear(x.to(dev), kp.to(dev), ws16.to(dev), g, backend=b,
                                               smooth_inv=smooth.to(dev), **{**kw, "bias": bias.to(dev)}),
                lambda dev, b: ops.w8a8_linear(x.to(dev), wq.to(dev), wsc.to(dev), backend=b,
                                               smooth_inv=smooth.to(dev), **{**kw, "bias": bias.to(dev)})):
        r = run("cpu", "reference")
        y = run(device, "triton").cpu()
        assert r[bad].isnan().all() and y[bad].isnan().all()
        assert torch.isfinite(r[~bad]).all()
        _close(y[~bad], r[~bad])


# ---------------------------------------------------------------------------------------
# benchmark and ablation code paths (no timing claims on CPU)
# ---------------------------------------------------------------------------------------


def test_bench_pieces_on_references():
    """GEMM rows (every variant, correctness check vs the references) and the end-to-end
    decoder run on CPU references at tiny sizes."""
    from functools import partial

    from kernels.bench.decoder import bench_e2e
    from kernels.bench.gemm import Impl, bench_gemms
    from kernels.bench.report import markdown_table, summary
    from kernels.bench.timing import cpu_timer

    timer = partial(cpu_timer, reps=1)
    rows = bench_gemms({"tiny": [(64, 128)]}, [1, 16], "cpu", timer, Impl(False), None)
    assert [r["M"] for r in rows] == [1, 16] and not any(r["errors"] for r in rows)
    assert all(r["check"]["quant_exact"] and r["check"]["w4a8_max_rel_err"] < 1e-3 for r in rows)
    assert "w4a8+quant" in rows[0]["speedup_vs_fp16"] and "| tiny | 64x128 | 1 |" in markdown_table(rows, None)
    assert "decode_M<=16/w4a8" in summary(rows)
    e2e = bench_e2e("cpu", timer, Impl(False), 1, {"hidden": 128, "intermediate": 256, "vocab": 64},
                    [1], 4, 8)
    assert set(e2e["speedup"]) == {"decode_b1", "prefill_8"}


@pytest.mark.slow
def test_bench_cli_cpu_smoke(tmp_path, monkeypatch):
    """`python -m kernels.bench --allow-cpu` end to end on the references (~20 s)."""
    import json

    from kernels.bench.__main__ import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references, not the interpreter
    out = tmp_path / "smoke.json"
    assert main(["--allow-cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    checked = [r["check"] for r in res["gemm"] if "check" in r]
    assert checked and all(c["quant_exact"] and c["w4a8_max_rel_err"] < 1e-3 for c in checked)
    assert not any(r["errors"] for r in res["gemm"])
    assert set(res["e2e_smoke"]["speedup"]) == {"decode_b1", "decode_b4", "prefill_32"}


@pytest.mark.parametrize("device", DEVICES)
def test_ablation_flags_live_outside_the_production_wrapper(device):
    """kernels.ablate sets constexpr flags through launch_w4a8; w4a8_gemm takes none. With one
    scale per row the 'no_rescale' variant computes the same numbers (one rescale at the end)."""
    import inspect

    from kernels.ablate import VARIANTS
    from kernels.w4a8_gemm import launch_w4a8

    assert "flags" not in inspect.signature(w4a8_gemm).parameters
    m, n, k, g = 5, 40, 256, 64
    xq, _, p, _, xs, _ = _w4_problem(m, n, k, g, seed=2, device=device)
    ws = (torch.rand(n, 1, generator=_gen(3)) * 0.02 + 1e-3).half().expand(n, k // g).contiguous().to(device)
    kp = to_kernel_layout(p, g)
    full = w4a8_gemm(xq, xs, kp, ws, g, out_dtype=torch.float32, split_k=1)
    same = launch_w4a8(xq, xs, kp, ws, g, None, torch.float32, 1, VARIANTS["no_rescale"])
    _close(same, full)
    shift = launch_w4a8(xq, xs, kp, ws, g, None, torch.float32, 1, VARIANTS["shift_unpack"])
    assert torch.equal(shift, full)


# ---------------------------------------------------------------------------------------
# two-level weight scales (QServe progressive: q8 = s2 * (q - z), one int8 GEMM over K)
# ---------------------------------------------------------------------------------------


def _two_level_problem(m: int, n: int, k: int, g: int, zero: bool, seed: int, device="cpu"):
    """Random codes with in-range level-2 parts: symmetric q in [-8, 7], s2 in [1, 15];
    asymmetric q - z in [-7, 7] via q in [-8, 7] and z in [-1, 0] with s2 in [1, 16]."""
    xq = _randint(-128, 128, (m, k), seed)
    q = _randint(-8, 8, (n, k), seed + 1)
    s2 = torch.randint(1, 16 if not zero else 17, (n, k // g), generator=_gen(seed + 2)).to(torch.uint8)
    z = None
    if zero:
        z = _randint(-1, 1, (n, k // g), seed + 3)
        q = q.clamp(-8 + 1, 7 - 1)  # |q - z| <= 7: s2 * (q - z) in int8 for s2 <= 16 (-8 * 16 = -128)
    s1 = (torch.rand(n, generator=_gen(seed + 4)) * 0.01 + 1e-4).half()
    xs = torch.rand(m, generator=_gen(seed + 5)) * 0.05 + 0.001
    bias = torch.randn(n, generator=_gen(seed + 6)).half()
    out = [xq, q, pack_int4(q), s1, s2, z, xs, bias]
    return [None if t is None else t.to(device) for t in out]


def test_two_level_int8_weight_hand_computed():
    q = torch.tensor([[1, -2, 7, -8], [3, 0, -1, 2]], dtype=torch.int8)
    s2 = torch.tensor([[3, 15], [2, 5]], dtype=torch.uint8)  # group size 2
    z = torch.tensor([[0, -1], [1, 0]], dtype=torch.int8)
    q8 = two_level_int8_weight(pack_int4(q), s2, z, 2)
    assert q8.tolist() == [[3, -6, 120, -105], [4, -2, -5, 10]]
    with pytest.raises(ValueError, match="int8"):
        two_level_int8_weight(pack_int4(q), torch.full((2, 2), 17, dtype=torch.uint8), None, 2)


@pytest.mark.parametrize("zero", [False, True])
def test_two_level_ref_is_one_int8_gemm(zero):
    m, n, k, g = 5, 24, 256, 64
    xq, q, p, s1, s2, z, xs, bias = _two_level_problem(m, n, k, g, zero, seed=3)
    y = w4a8_two_level_ref(xq, xs, p, s1, s2, z, g, bias=bias, out_dtype=torch.float32)
    qz = q.long().view(n, -1, g) - (0 if z is None else z.long()[..., None])
    q8 = (qz * s2.long()[..., None]).view(n, k)
    naive = (xq.double() @ q8.double().t()) * s1.double() * xs.double()[:, None] + bias.double()
    assert_close(y.double(), naive, rtol=1e-5, atol=1e-5 * float(naive.abs().max()))


TWO_LEVEL_GRID = [(1, 40, 256, 64, False), (7, 72, 256, 128, True), (33, 40, 512, 256, False),
                  (70, 72, 256, 64, True), (16, 40, 384, 192, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx", range(len(TWO_LEVEL_GRID)))
def test_w4a8_two_level_kernel_vs_ref(device, idx):
    m, n, k, g, zero = TWO_LEVEL_GRID[idx]
    xq, _, p, s1, s2, z, xs, bias = _two_level_problem(m, n, k, g, zero, seed=idx, device=device)
    kp = to_kernel_layout(p, g)
    for j, (per_token, use_bias) in enumerate([(True, True), (False, False)]):
        x_scale = xs if per_token else xs[:1].clone().reshape(())
        b = bias if use_bias else None
        out_dtype = OUT_DTYPES[(idx + j) % 3]
        y = w4a8_two_level_gemm(xq, x_scale, kp, s1, s2, z, g, bias=b, out_dtype=out_dtype)
        r = w4a8_two_level_ref(xq.cpu(), x_scale.cpu(), p.cpu(), s1.cpu(), s2.cpu(),
                               None if z is None else z.cpu(), g, None if b is None else b.cpu(),
                               out_dtype)  # fmt: skip
        _close(y, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k,zero", [(1, False), (1, True), (3, True)])
def test_w4a8_two_level_kernel_exact_int32(device, split_k, zero):
    """Unit channel / token scales and fp32 output expose the int32 accumulation over K."""
    m, n, k, g = 7, 40, 512, 64
    xq, _, p, _, s2, z, _, _ = _two_level_problem(m, n, k, g, zero, seed=13, device=device)
    ones = torch.ones(n, dtype=torch.float16, device=device)
    one = torch.tensor(1.0, device=device)
    y = w4a8_two_level_gemm(xq, one, to_kernel_layout(p, g), ones, s2, z, g,
                            out_dtype=torch.float32, split_k=split_k)  # fmt: skip
    q8 = two_level_int8_weight(p.cpu(), s2.cpu(), None if z is None else z.cpu(), g)
    assert torch.equal(y.cpu(), (xq.cpu().long() @ q8.long().t()).float())


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_w4a8_two_level_bad_inputs():
    xq, _, p, s1, s2, z, xs, _ = _two_level_problem(4, 40, 256, 64, True, seed=0)
    kp = to_kernel_layout(p, 64)
    with pytest.raises(ValueError, match="w_scale"):
        w4a8_two_level_gemm(xq, xs, kp, s1[:5].contiguous(), s2, z, 64)
    with pytest.raises(TypeError, match="w_scale2"):
        w4a8_two_level_gemm(xq, xs, kp, s1, s2.to(torch.int8), z, 64)
    with pytest.raises(ValueError, match="w_zero"):
        w4a8_two_level_gemm(xq, xs, kp, s1, s2, z[:, :1].contiguous(), 64)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_two_level_linear_triton_vs_reference(device):
    n, k, g = 40, 256, 128
    _, _, p, s1, s2, z, _, bias = _two_level_problem(1, n, k, g, True, seed=5)
    kp, _ = ops.prepare_w4a8_weight(p, torch.ones(n, k // g), g)
    x = torch.randn(2, 3, k, generator=_gen(9)).half()
    for mode, scale in (("dynamic_token", None), ("static_tensor", 0.02)):
        args = (kp, s1, s2, z, g)
        y = ops.w4a8_two_level_linear(x.to(device), *(a.to(device) for a in args[:4]), g,
                                      act_mode=mode, act_scale=scale, bias=bias.to(device),
                                      backend="triton")  # fmt: skip
        r = ops.w4a8_two_level_linear(x, *args, act_mode=mode, act_scale=scale, bias=bias,
                                      backend="reference")  # fmt: skip
        assert y.shape == (2, 3, n) and y.dtype == torch.float16
        _close(y, r)


# ---------------------------------------------------------------------------------------
# RMSNorm fused with the activation quantization
# ---------------------------------------------------------------------------------------


def test_rmsnorm_ref_is_hugging_face_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from kernels.reference import rmsnorm_ref

    for dtype in (torch.float32, torch.float16):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(96, generator=_gen(1)) + 0.5)
        x = (torch.randn(5, 96, generator=_gen(2)) * 3).to(dtype)
        assert torch.equal(rmsnorm_ref(x, norm.weight.detach(), 1e-5), norm(x).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_rmsnorm_quant_kernel_vs_ref(device, dtype, static):
    """Same norm output and codes as RMSNorm followed by the quantizer, up to the order of
    the variance sum (a code on a rounding boundary may move by one step)."""
    from kernels.reference import rmsnorm_quant_ref
    from kernels.rmsnorm_quant import rmsnorm_quant

    m, k = 6, 300
    x = (torch.randn(m, k, generator=_gen(3)) * 2).to(dtype)
    x[3, 7] = float("nan")
    w = (torch.rand(k, generator=_gen(4)) + 0.5).to(dtype)
    smooth = torch.rand(k, generator=_gen(5)) + 0.5
    scale = 0.05 if static else None
    y_r, q_r, s_r = rmsnorm_quant_ref(x, w, 1e-5, scale, smooth)
    y, q, s = rmsnorm_quant(x.to(device), w.to(device), 1e-5, scale, smooth.to(device))
    ok = torch.arange(m) != 3
    assert_close(y.cpu()[ok], y_r[ok], rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=0)
    assert_close(s.cpu(), s_r, rtol=1e-6, atol=0, equal_nan=True)
    assert bool(s.cpu()[3].isnan()) and (q.cpu() - q_r).abs().max() <= 1
    assert (q.cpu() != q_r).float().mean() < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("two_level", [False, True])
def test_splitk_reduced_in_one_launch_equals_two_launches(device, two_level):
    """Decode split-K: the last split program of each tile sums the partials in split order,
    in the GEMM's own launch; bit for bit the two-launch result, counters left at zero."""
    from kernels._triton_common import _COUNTERS
    from kernels.w4a8_gemm import launch_w4a8

    m, n, k, g = 3, 72, 512, 64
    xq, _, p, ws, xs, bias = _w4_problem(m, n, k, g, seed=21, device=device)
    kp = to_kernel_layout(p, g)
    extra = {}
    if two_level:
        _, _, p2, s1, s2, z, _, _ = _two_level_problem(m, n, k, g, True, seed=22, device=device)
        kp, ws, extra = to_kernel_layout(p2, g), s1, {"w_scale2": s2, "w_zero": z}
    for split in (2, 3, 8):
        one = launch_w4a8(xq, xs, kp, ws, g, bias, torch.float32, split, {}, **extra)
        two = launch_w4a8(xq, xs, kp, ws, g, bias, torch.float32, split, {"in_kernel_reduce": False}, **extra)
        assert torch.equal(one, two), split
    assert not _COUNTERS[xq.device].any()


def test_bench_shape_sets_and_library_table():
    """LLaMA-3-8B / Qwen2.5-7B shapes fit the W4A8 kernel (K a multiple of the group); the
    library comparison lists an absent library with its reason instead of a number."""
    from kernels.bench.gemm import GROUP_SIZE, SHAPES
    from kernels.bench.libraries import LIBRARIES, bench_libraries, library_table
    from kernels.bench.timing import cpu_timer

    assert {"llama3-8b", "qwen2.5-7b"} <= set(SHAPES)
    assert all(k % GROUP_SIZE == 0 for nks in SHAPES.values() for _, k in nks)
    res = bench_libraries([(64, 128)], [1], lambda fn: cpu_timer(fn, reps=1), device="cpu")
    assert set(res["rows"][0]["ms"]) >= {"fp16"}
    missing = {n for n in LIBRARIES if importlib.util.find_spec(n.split("_")[0]) is None}
    assert missing <= set(res["skipped"]) and "| 64x128 | 1 |" in library_table(res)
