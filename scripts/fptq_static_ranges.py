"""Where FPTQ's static per-tensor activation ranges come from, and what each estimator costs
per linear, on the fp model and its calibration set. For the first linear of every group
(the group's linears share their input X):

  max|X| over all tokens, max|X| without the first position of each sample (a window start
  without BOS draws massive activations), the 99.99th percentile and the int8 MSE-optimal
  clip (methods/act_range.py), the group's FPTQ bucket at the paper's thresholds, and
  the relative output error ||X W^T - Q(X) W^T||^2 / ||X W^T||^2 (fp weights, so only the
  int8 activation quantizer differs) for static per-tensor scales from each estimator
  (narrow grid) and for dynamic per-token scales.

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
from methods.fptq import assign_bucket
from methods.layers import FakeQuantLinear
from methods.primitives import fake_quantize_activation

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
    """Per linear: |X| histogram, max|X|, and max|X| over positions >= 1."""

    def __init__(self) -> None:
        self.hist: dict[str, AbsHistogram] = {}
        self.rest_max: dict[str, float] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()                                   # [1, T, K]
        self.hist.setdefault(name, AbsHistogram()).add(x)
        rest = float(x[:, 1:].abs().max()) if x.shape[1] > 1 else 0.0
        self.rest_max[name] = max(self.rest_max.get(name, 0.0), rest)


class OutputError:
    """Accumulates ||X W^T - Q(X) W^T||^2 and ||X W^T||^2 per (linear, quantizer)."""

    def __init__(self, block, ranges: dict[str, dict[str, float]]):
        self.block, self.ranges = block, ranges
        self.err: dict[tuple[str, str], float] = {}
        self.ref: dict[str, float] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        W = self.block.get_submodule(name).weight.float()
        x = x.detach().float()
        y = x @ W.T
        self.ref[name] = self.ref.get(name, 0.0) + float(y.pow(2).sum())
        quantizers = {f"static_{k}": ("static_tensor", torch.tensor(
            FakeQuantLinear.static_scale_from_max(v, 8))) for k, v in self.ranges[name].items()}
        quantizers["dynamic_token"] = ("dynamic_token", None)
        for key, (mode, s) in quantizers.items():
            e = fake_quantize_activation(x, 8, mode, s) @ W.T - y
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
        errors = OutputError(block, ranges)
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
