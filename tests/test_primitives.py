import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    pack_int4,
    qrange,
    quantize,
    quantize_weight,
    unpack_int4,
)

GRANS = ["per_tensor", "per_channel", "per_group", "per_token"]


def _rand(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(),
       gran=st.sampled_from(GRANS), rows=st.integers(1, 6), groups=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_error_bound_half_step(bits, symmetric, gran, rows, groups, seed):
    """|x - Q(x)| <= s/2 inside the clipping range (min-max scales never clip)."""
    gs = 8
    x = _rand(rows, groups * gs, seed)
    qp = compute_qparams(x, bits, symmetric, gran, gs)
    xh = dequantize(quantize(x, qp, gran, gs), qp, gran, gs)
    from methods.primitives import _grouped
    err = _grouped((x - xh).abs(), gran, gs)
    assert (err <= qp.scale / 2 + 1e-5).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([3, 4, 8]), symmetric=st.booleans(), gran=st.sampled_from(GRANS),
       seed=st.integers(0, 2**16))
def test_requantize_is_exact(bits, symmetric, gran, seed):
    """Values already on the grid round-trip exactly with the same qparams."""
    x = _rand(4, 16, seed)
    qp = compute_qparams(x, bits, symmetric, gran, 8)
    q = quantize(x, qp, gran, 8)
    lo, hi = qrange(bits, symmetric)
    assert q.min() >= lo and q.max() <= hi
    xh = dequantize(q, qp, gran, 8)
    torch.testing.assert_close(quantize(xh, qp, gran, 8), q, rtol=0, atol=0)


def test_symmetric_max_hits_largest_code():
    W = torch.tensor([[1.0, -2.0, 0.75, 3.5]])
    q, qp = quantize_weight(W, 4, None)
    assert q.tolist() == [[2, -4, 2, 7]]  # s = 3.5 / 7 = 0.5; 1.5 rounds half to even
    torch.testing.assert_close(qp.scale.flatten(), torch.tensor([0.5]))


def test_asymmetric_zero_point_covers_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    qp = compute_qparams(x, 2, symmetric=False, granularity="per_channel")
    q = quantize(x, qp, "per_channel")
    assert q.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(dequantize(q, qp, "per_channel"), x)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 96), 4, 64)


@given(st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_roundtrip(vals):
    q = torch.tensor(vals, dtype=torch.int8).reshape(1, -1)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape[-1] == q.shape[-1] // 2
    torch.testing.assert_close(unpack_int4(p), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]]))


def test_activation_modes():
    x = torch.tensor([[0.1, -10.0], [1.0, 2.0]])
    dyn = fake_quantize_activation(x, 8, "dynamic_token")
    torch.testing.assert_close(dyn[0, 1], torch.tensor(-10.0))
    torch.testing.assert_close(dyn[1, 1], torch.tensor(2.0))
    static = fake_quantize_activation(x, 8, "static_tensor", torch.tensor(10.0 / 127))
    # per-tensor: the small row loses resolution that per-token keeps
    assert (static[1] - x[1]).abs().max() > (dyn[1] - x[1]).abs().max()
    with pytest.raises(ValueError):
        fake_quantize_activation(x, 8, "static_tensor", None)


def test_fake_quantize_shape_dtype():
    x = torch.randn(3, 32, dtype=torch.float16)
    y = fake_quantize(x, 4, granularity="per_group", group_size=8)
    assert y.shape == x.shape and y.dtype == x.dtype
