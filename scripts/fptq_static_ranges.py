"""Where FPTQ's static per-tensor activation ranges come from, and what each estimator costs
per linear, on the fp model and its calibration set. For the first linear of every group
(the group's linears share their input X):

  max|X| over all tokens, max|X| without the first position of each sample (a window start
  without BOS draws massive activations), the 99.99th percentile and the int8 MSE-optimal
  clip (methods/act_range.py), the group's FPTQ bucket at the paper's thresholds, and
  the relative output error ||X W^T - Q(X) W^T||^2 / ||X W^T||^2 (fp weights, so only the
  int8 activation quantizer differs) for static per-tensor scales from each estimator
  (narrow grid) and for dynamic per-token scales;
  and whether LAE's enlarged weight columns hurt the int4 rounding: the same relative error
  for int4 group-wise RTN weights alone, before LAE (X Q(W)^T) and after it
  ((X / s) Q(W diag(s))^T, s = lae_scale(max|X_j|)), and for the W4A8 static path both ways
  (Q8(X) Q(W)^T against Q8(X / s) Q(W diag(s))^T, minmax ranges).

One JSON per model under results/fptq/ (two passes over the calibration samples per block,
then the fp block output feeds the next block).

    python scripts/fptq_static_ranges.py model=smollm2-135m calib=c4-32x512
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from harness.inputs.calib import CalibSpec, load_calibration
from harness.inputs.models import load_model
from methods.act_range import AbsHistogram, RangeEstimator
from methods.blockwise import run_block_hooked, walk_blocks
from methods.fptq import assign_bucket, lae_scale
from methods.layers import FakeQuantLinear
from methods.primitives import fake_quantize_activation, fake_quantize_weight

ESTIMATORS = {"minmax": RangeEstimator("minmax"), "p99.99": RangeEstimator("percentile", 99.99),
              "mse_int8": RangeEstimator("mse", bits=8)}

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness.run.config_defaults import register_method_defaults

    register_method_defaults()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("run", overrides=overrides)


class RangeProbe:
    """Per linear: |X| histogram, max|X|, max|X| over positions >= 1, max|X_j| [K]."""

    def __init__(self) -> None:
        self.hist: dict[str, AbsHistogram] = {}
        self.rest_max: dict[str, float] = {}
        self.channel_max: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()                                   # [1, T, K]
        self.hist.setdefault(name, AbsHistogram()).add(x)
        cm = x.abs().amax(dim=(0, 1))
        self.channel_max[name] = torch.maximum(self.channel_max.get(name, cm), cm)
        rest = float(x[:, 1:].abs().max()) if x.shape[1] > 1 else 0.0
        self.rest_max[name] = max(self.rest_max.get(name, 0.0), rest)


def static_scale(v: float) -> torch.Tensor:
    """The int8 per-tensor scale of range v (narrow grid), as FakeQuantLinear computes it."""
    return torch.tensor(FakeQuantLinear.static_scale_from_max(v, 8))


class OutputError:
    """Accumulates ||X W^T - Y_hat||^2 and ||X W^T||^2 per (linear, quantizer): int8
    activations with fp weights, and int4 weights before / after LAE (see module doc)."""

    def __init__(self, block, ranges: dict[str, dict[str, float]],
                 channel_max: dict[str, torch.Tensor], group_size: int):
        self.block, self.ranges = block, ranges
        self.err: dict[tuple[str, str], float] = {}
        self.ref: dict[str, float] = {}
        self.s = {n: lae_scale(cm) for n, cm in channel_max.items()}           # [K]
        # static int8 scales from the minmax range of X and of X / s
        self.a_scale = {n: (static_scale(ranges[n]["minmax"]),
                            static_scale(float((cm / self.s[n]).max())))
                        for n, cm in channel_max.items()}
        self.W_hat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for n, s in self.s.items():
            W = block.get_submodule(n).weight.float()                         # [N, K]
            self.W_hat[n] = (fake_quantize_weight(W, 4, group_size),
                             fake_quantize_weight(W * s, 4, group_size))

    def __call__(self, name: str, x: torch.Tensor) -> None:
        W = self.block.get_submodule(name).weight.float()
        x = x.detach().float()
        y = x @ W.T
        self.ref[name] = self.ref.get(name, 0.0) + float(y.pow(2).sum())
        quantizers = {f"static_{k}": ("static_tensor", static_scale(v))
                      for k, v in self.ranges[name].items()}
        quantizers["dynamic_token"] = ("dynamic_token", None)
        outputs = {key: fake_quantize_activation(x, 8, mode, s) @ W.T
                   for key, (mode, s) in quantizers.items()}
        W_plain, W_lae = self.W_hat[name]
        s_plain, s_lae = self.a_scale[name]
        x_lae = x / self.s[name]
        outputs["w4"] = x @ W_plain.T
        outputs["w4_lae"] = x_lae @ W_lae.T
        outputs["w4a8_static"] = (
            fake_quantize_activation(x, 8, "static_tensor", s_plain) @ W_plain.T)
        outputs["w4a8_lae_static"] = (
            fake_quantize_activation(x_lae, 8, "static_tensor", s_lae) @ W_lae.T)
        for key, y_hat in outputs.items():
            e = y_hat - y
            self.err[(name, key)] = self.err.get((name, key), 0.0) + float(e.pow(2).sum())

    def relative(self, name: str) -> dict[str, float]:
        return {k: v / max(self.ref[name], 1e-30) for (n, k), v in self.err.items() if n == name}


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    cache = Path(cfg.paths.cache_dir)
    lm = load_model(cfg.model, cache)
    from harness.inputs.data import resolve_data_dir
    calib, info = load_calibration(lm.tokenizer, CalibSpec(**{k: cfg.calib[k] for k in (
        "dataset", "n_samples", "seqlen", "seed")}), resolve_data_dir(), cache, False,
        lm.model.config.vocab_size)
    spec = lm.spec
    rows = []

    def on_block(i, block, inputs):
        names = [g.linears[0] for g in spec.table.groups]
        probe = RangeProbe()
        run_block_hooked(block, inputs, {n: probe for n in names})
        ranges = {n: {k: est.estimate(probe.hist[n]) for k, est in ESTIMATORS.items()}
                  for n in names}
        errors = OutputError(block, ranges, probe.channel_max, int(cfg.model.group_size))
        run_block_hooked(block, inputs, {n: errors for n in names})
        for g, n in zip(spec.table.groups, names, strict=True):
            h = probe.hist[n]
            rows.append({"block": i, "linear": n, "role": g.role, "max": h.max,
                         "max_without_first": probe.rest_max[n],
                         "p99.99": ranges[n]["p99.99"], "mse_int8": ranges[n]["mse_int8"],
                         "bucket_paper": assign_bucket(h.max, 15.0, 150.0),
                         "rel_output_error": errors.relative(n)})

    with torch.no_grad():
        walk_blocks(lm.model, spec, calib, on_block, desc="static ranges")
    first_sets = [r for r in rows if r["max"] > 1.5 * r["max_without_first"]]
    out = {"model": cfg.model.name, "calibration": info, "n_groups": len(rows),
           "n_range_set_by_first_position": len(first_sets), "rows": rows}
    path = REPO / "results" / "fptq" / f"static_ranges_{cfg.model.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"{path}: {len(first_sets)} of {len(rows)} linear groups have max|X| > 1.5 x the "
          "max without the first position")


if __name__ == "__main__":
    main(sys.argv[1:])
