"""Rotations (Hadamard / Kronecker orthogonal primitives), QuIP and the QuaRot-style
rotation baseline on tiny-llama with injected outliers: LDLQ == the GPTQ solver,
incoherence, exact rotated logits, outlier statistics, error vs RTN / GPTQ, Hydra runs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from harness.inputs.models import tiny_bloom, tiny_llama
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from methods.base import ConfigError
from methods.catalog import build
from methods.gptq import GPTQConfig, GPTQSolver
from methods.layers import FakeQuantLinear, iter_block_linears
from methods.primitives import compute_qparams, fake_quantize, mse_clip_ratio, qrange
from methods.quarot import QuaRotConfig, rotate_model
from methods.quip import QuIPConfig, process
from methods.rotation import (
    Rotation,
    excess_kurtosis,
    hadamard,
    hadamard_factors,
    incoherence,
    make_rotation,
    sylvester,
)
from methods.rtn import RTNConfig
from methods.runtime import runtime_form
from methods.transformed import TransformedLinear
from tests.conftest import TINY_OUTLIERS, TINY_QUICK, tiny_outlier_setup

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_outlier_setup()


def _logit_mse(tiny, config) -> float:
    model, spec, calib, test = tiny
    q = build(config).quantize(copy.deepcopy(model), spec, calib)
    with torch.no_grad():
        return float((q(test).logits - model(test).logits).pow(2).mean())


# ---------------------------------------------------------------- rotation primitives

@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 28, 36, 64, 96, 576, 1536])
def test_hadamard_orders_are_hadamard(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n))


@pytest.mark.parametrize("n", [3, 6, 10])
def test_hadamard_order_without_construction_raises(n):
    with pytest.raises(ValueError, match="rotation=orthogonal"):
        hadamard_factors(n)


@pytest.mark.parametrize("kind", ["hadamard", "kronecker", "orthogonal"])
@pytest.mark.parametrize("n", [64, 96, 576])
def test_factored_rotation_equals_its_dense_matrix(kind, n):
    R = make_rotation(kind, n, seed=3)
    M = R.matrix().double()
    assert_close(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(5, n, dtype=torch.float64)
    tol = {"atol": 1e-5, "rtol": 1e-5}                    # M is formed in fp32
    assert_close(R.apply(x), x @ M.T, **tol)
    assert_close(R.apply_t(x), x @ M, **tol)
    H = x.T @ x
    assert_close(R.conjugate(H), M @ H @ M.T, **tol)
    assert_close(R.apply(x.half()).double(), x.half().double() @ M.T, atol=2e-2, rtol=2e-3)


def test_hadamard_matches_compressed_tensors_reference():
    ref = pytest.importorskip("compressed_tensors.transform.utils.hadamard")
    for n in (16, 64, 256):
        assert torch.equal(ref.deterministic_hadamard_matrix(n, torch.float32), hadamard(n))
        assert torch.equal(sylvester(n), hadamard(n))
        # llm-compressor's randomized Hadamard with the same seed is diag(signs) H = sqrt(n) R^T
        M = ref.random_hadamard_matrix(n, torch.float32, gen=torch.Generator().manual_seed(7))
        assert_close(M, math.sqrt(n) * make_rotation("hadamard", n, 7).matrix().T)
    for n in (12 * 16, 20 * 8):          # non powers of 2: both are Hadamard matrices
        M = ref.random_hadamard_matrix(n, torch.float64, gen=torch.Generator().manual_seed(0))
        assert_close(M @ M.T, n * torch.eye(n, dtype=torch.float64))


def test_mse_clip_ratio_never_worse_than_min_max():
    W = torch.randn(16, 64)
    W[0, 3] = 12.0
    for gran, g in (("per_channel", None), ("per_group", 32)):
        r = mse_clip_ratio(W, 2, False, gran, g)
        assert r.shape == compute_qparams(W, 2, False, gran, g).scale.shape
        base = (fake_quantize(W, 2, False, gran, g) - W).pow(2).sum()
        qp = compute_qparams(W, 2, False, gran, g, r)
        clipped = (fake_quantize(W, 2, False, gran, g, qp) - W).pow(2).sum()
        assert clipped <= base and float(r.min()) < 1.0


# ---------------------------------------------------------------- QuIP

def naive_ldlq(W: torch.Tensor, H: torch.Tensor, qp) -> torch.Tensor:
    """The paper's LDLQ: H = (U + I) D (U + I)^T with U strictly upper triangular,
    W_hat_k = Q(W_k + (W_{:k} - W_hat_{:k}) U_{:k, k}), column by column."""
    n = H.shape[0]
    J = torch.eye(n, dtype=H.dtype).flip(0)
    C = torch.linalg.cholesky(J @ H @ J)                       # J H J = C C^T, C lower
    L = C / torch.diagonal(C)[None, :]                         # unit lower
    U = J @ L @ J - torch.eye(n, dtype=H.dtype)                # unit upper - I
    lo, hi = qrange(qp.bits, qp.zero is None)
    s = qp.scale.reshape(-1, 1)
    z = 0.0 if qp.zero is None else qp.zero.reshape(-1, 1)
    W_hat = torch.zeros_like(W)
    for k in range(n):
        w = W[:, k:k + 1] + (W[:, :k] - W_hat[:, :k]) @ U[:k, k:k + 1]
        W_hat[:, k:k + 1] = (torch.clamp(torch.round(w / s) + z, lo, hi) - z) * s
    return W_hat


@pytest.mark.parametrize("symmetric", [True, False])
def test_ldlq_equals_gptq_solver_on_the_same_h(symmetric):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 48, generator=gen, dtype=torch.float64)
    X = torch.randn(400, 48, generator=gen, dtype=torch.float64)
    X[:, 5] *= 10
    H = 2 * X.T @ X / X.shape[0]
    damp = 0.01
    Hd = H + damp * torch.diag(H).mean() * torch.eye(48, dtype=H.dtype)
    solver = GPTQSolver(W)
    solver.set_hessian(H, X.shape[0])
    W_gptq, qp, _ = solver.solve(3, None, symmetric, act_order=False, block_size=16, damp=damp)
    solver.set_hessian(Hd.float(), X.shape[0])
    W_ldlq = naive_ldlq(W, Hd, qp)
    assert_close(W_gptq.double(), W_ldlq, atol=1e-6, rtol=0)


def test_incoherence_lowers_max_entry_over_frobenius():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=gen)
    W[3, 7], W[40, 50] = 40.0, -25.0                           # outlier weights
    X = torch.randn(512, 96, generator=gen)
    X[:, 11] *= 30                                             # outlier input channel
    H = X.T @ X / 512
    before = incoherence(W)
    for kind in ("kronecker", "hadamard"):
        inc = process(W, H, damp=0.01, rescale=True, kind=kind, seed=0)
        assert incoherence(inc.W) < 0.5 * before, (kind, incoherence(inc.W), before)
        d = torch.diag(inc.H)
        assert float(d.max() / d.mean()) < float(torch.diag(H).max() / torch.diag(H).mean())


def test_quip_undoes_its_transforms_after_rounding(tiny):
    model, spec, calib, test = tiny
    q = build(QuIPConfig(w_bits=8, group_size=None)).quantize(copy.deepcopy(model), spec, calib)
    for _, _, full, mod in iter_block_linears(q, spec):
        assert isinstance(mod, TransformedLinear), full
        U, V = mod.r_out.matrix(), mod.r_in.matrix()
        W_tilde = U.T @ mod.weight @ V * mod.smooth_inv[None, :]
        assert_close(mod.w_dense, W_tilde, atol=1e-5, rtol=1e-4)
        x = torch.randn(3, mod.in_features)
        assert_close(mod(x), F.linear(x, W_tilde), atol=1e-4, rtol=1e-4)
        W0 = model.get_submodule(full).weight
        assert float((W_tilde - W0.detach()).norm() / W0.detach().norm()) < 0.02    # 8 bits: close to W
        mod.codes()                                               # the grid holds exact codes
        cls, reason = runtime_form(mod)
        assert cls is None and "TransformedLinear" in reason


def test_quip_2bit_beats_rtn_and_gptq(tiny):
    kw = {"w_bits": 2, "group_size": 32, "symmetric": False}
    rtn = _logit_mse(tiny, RTNConfig(**kw))
    gptq = _logit_mse(tiny, GPTQConfig(**kw))
    quip = _logit_mse(tiny, QuIPConfig(**kw))
    assert quip < 0.8 * min(rtn, gptq), (quip, rtn, gptq)


def test_quip_config_errors():
    with pytest.raises(ConfigError, match="weights only"):
        QuIPConfig(w_bits=4, a_bits=8)
    with pytest.raises(ConfigError, match="incoherence"):
        QuIPConfig(w_bits=2, incoherence="orthogonal")


# ---------------------------------------------------------------- QuaRot

def _rotated(model, spec, **kw):
    m = copy.deepcopy(model)
    info = rotate_model(m, spec, QuaRotConfig(w_bits=4, a_bits=8, **kw))
    return m, info


@pytest.mark.parametrize("kw", [{}, {"online_heads": True}, {"rotation": "orthogonal"}])
def test_rotated_model_logits_equal_the_original(tiny, kw):
    model, spec, _, test = tiny
    m, _ = _rotated(model, spec, **kw)
    with torch.no_grad():
        ref, out = model(test).logits, m(test).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_rotation_unties_a_tied_lm_head():
    model = tiny_llama(outliers=TINY_OUTLIERS)
    model.lm_head.weight = model.model.embed_tokens.weight          # tie, as SmolLM2 does
    model.config.tie_word_embeddings = True
    spec = ModelSpec.from_model(model, "tied")
    test = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(0))
    m, info = _rotated(model, spec)
    assert info["untied_lm_head"]
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    with torch.no_grad():
        ref, out = model(test).logits, m(test).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def _linear_inputs(model, spec, test, names):
    """{full name: X [tokens, K]} as each linear's weights see it (after an online R)."""
    seen = {}
    mods = {full: mod for _, rel, full, mod in iter_block_linears(model, spec) if rel in names}

    def hook(full):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[full] = mod.r_in.apply(x) if isinstance(mod, TransformedLinear) else x
        return fn

    handles = [m.register_forward_pre_hook(hook(f)) for f, m in mods.items()]
    with torch.no_grad():
        model(test)
    for h in handles:
        h.remove()
    return seen


def test_rotation_lowers_kurtosis_and_max_to_mean(tiny):
    model, spec, _, test = tiny
    m, _ = _rotated(model, spec)
    names = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")
    before = _linear_inputs(model, spec, test, names)
    after = _linear_inputs(m, spec, test, names)
    for key in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.gate_proj",
                "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        x0, x1 = before[key], after[key]
        k0, k1 = excess_kurtosis(x0).mean(), excess_kurtosis(x1).mean()
        r0 = (x0.abs().amax(-1) / x0.abs().mean(-1)).mean()
        r1 = (x1.abs().amax(-1) / x1.abs().mean(-1)).mean()
        assert k1 < 0.5 * k0, (key, float(k0), float(k1))
        assert r1 < r0, (key, float(r0), float(r1))


@pytest.mark.parametrize("a_bits", [8, 4])
def test_quarot_beats_its_weight_solver_unrotated(tiny, a_bits):
    """Same per-token activations and weight solver (QuaRot's RTN with its MSE-searched range;
    without it the rotation alone does not beat RTN here: the folded norm gains become weight
    columns with outliers) -> lower logit error."""
    kw = {"w_bits": 4, "a_bits": a_bits, "group_size": None, "act_mode": "dynamic_token"}
    for plain, solver in ((RTNConfig(**kw), "rtn"), (GPTQConfig(**kw), "gptq")):
        base = _logit_mse(tiny, plain)
        ours = _logit_mse(tiny, QuaRotConfig(**kw, weight_solver=solver))
        assert ours < 0.95 * base, (solver, ours, base)


def test_quarot_quantized_linears(tiny):
    model, spec, calib, _ = tiny
    method = build(QuaRotConfig(w_bits=4, a_bits=8, group_size=32))
    q = method.quantize(copy.deepcopy(model), spec, calib)
    for _, rel, full, mod in iter_block_linears(q, spec):
        assert isinstance(mod, FakeQuantLinear) and mod.w_bits == 4 and mod.a_bits == 8
        assert mod.act_mode == "dynamic_token"
        assert isinstance(mod, TransformedLinear) == (rel == "mlp.down_proj"), full
    assert method.artifacts["quarot"]["online"] == ["mlp.down_proj"]
    assert len(method.artifacts["gptq_layers"]) == 14


def test_quarot_skips_layernorm_families_and_rejects_static_activations():
    bloom = tiny_bloom()
    reason = build(QuaRotConfig(w_bits=4, a_bits=8)).check(ModelSpec.from_model(bloom, "b"))
    assert reason and "LayerNorm" in reason
    with pytest.raises(ConfigError, match="dynamic_token"):
        QuaRotConfig(w_bits=4, a_bits=8, act_mode="static_tensor")


# ---------------------------------------------------------------- Hydra

@pytest.mark.parametrize("overrides", [("method=quip", "bits=w2a16"),
                                       ("method=quarot", "bits=w4a8"),
                                       ("method=quarot", "bits=w4a4",
                                        "method.weight_solver=rtn")])
def test_hydra_runs_give_ok_records(compose_cfg, overrides):
    cfg = compose_cfg(*TINY_QUICK, *overrides, "calib.n_samples=2", "calib.seqlen=32")
    rec = run_one(cfg)
    assert rec.status == "ok", rec.error
    assert rec.metrics["ppl_ptb"] > 1
    assert rec.config["method"]["name"] in ("quip", "quarot")
    repr_ = rec.provenance["model_repr"]
    assert sum(repr_.values()) == 14 and "TransformedLinear" in repr_


def test_quip_with_activation_bits_is_skipped_with_reason(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=quip", "bits=w4a8"))
    assert rec.status == "skipped" and "weights only" in rec.error


def test_rotation_dataclass_checks_order():
    R = Rotation((torch.eye(4),))
    with pytest.raises(ValueError, match="order 4"):
        R.apply(torch.zeros(2, 8))


@pytest.mark.slow
def test_smollm2_rotated_logits_equal_the_original(compose_cfg):
    """SmolLM2-135M (tied lm_head, 576 = 36 x 16, 1536 = 12 x 128): exact before quantizing."""
    from harness.inputs.models import load_model

    cfg = compose_cfg("model=smollm2-135m", "model.device=cpu")
    lm = load_model(cfg.model, cfg.paths.cache_dir)
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids).logits
    info = rotate_model(lm.model, lm.spec, QuaRotConfig(w_bits=4, a_bits=8, online_heads=True))
    assert info["untied_lm_head"]
    with torch.no_grad():
        out = lm.model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_distributions_compare_quip_in_the_input_basis_and_refuse_quarot(compose_cfg):
    diag = ["model=tiny-llama", "calib=random-tokens", "calib.n_samples=2", "calib.seqlen=32",
            "eval=distributions", "eval.max_windows=1", "eval.seqlen=64"]
    rec = run_one(compose_cfg(*diag, "method=quip", "bits=w4a16"))
    assert rec.status == "ok", rec.error
    # Ŵ in the processed basis vs W would give ~0 dB; the undone W_tilde is close to W
    assert rec.metrics["sqnr_w_min_db"] > 10
    rec = run_one(compose_cfg(*diag, "method=quarot", "bits=w4a8"))
    assert "rotated residual stream" in str(rec.error or rec.artifacts.get("eval_errors")), rec
