"""Where FPTQ's static per-tensor activation ranges come from, per linear of the fp model on
the calibration set: max|X| over all tokens, max|X| without the first position of each
sample (a window start without BOS draws massive activations), the 99.99th percentile and
the int8 MSE-optimal clip (methods/act_range.py), plus the FPTQ bucket of the linear's group
at the paper's thresholds. One JSON per model under results/fptq/.

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
    pct, mse = RangeEstimator("percentile", 99.99), RangeEstimator("mse", bits=8)

    def on_block(i, block, inputs):
        probe = RangeProbe()
        run_block_hooked(block, inputs, {n: probe for n in spec.table.linear_names()})
        for g in spec.table.groups:
            v = max(probe.hist[n].max for n in g.linears)
            for n in g.linears:
                h = probe.hist[n]
                rows.append({"block": i, "linear": n, "role": g.role, "max": h.max,
                             "max_without_first": probe.rest_max[n],
                             "p99.99": pct.estimate(h), "mse_int8": mse.estimate(h),
                             "bucket_paper": assign_bucket(v, 15.0, 150.0)})

    with torch.no_grad():
        walk_blocks(lm.model, spec, calib, on_block, desc="static ranges")
    first_sets = [r for r in rows if r["max"] > 1.5 * r["max_without_first"]]
    out = {"model": cfg.model.name, "calibration": info, "n_linears": len(rows),
           "n_range_set_by_first_position": len(first_sets), "rows": rows}
    path = REPO / "results" / "fptq" / f"static_ranges_{cfg.model.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"{path}: {len(first_sets)} of {len(rows)} linears have max|X| > 1.5 x the max "
          "without the first position")


if __name__ == "__main__":
    main(sys.argv[1:])
