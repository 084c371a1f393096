"""Quantize time of every native method next to its reference library, in one run.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quantize_speed.py \
        --model smollm2-135m --layers 4 --n-samples 16 --seqlen 512 \
        --out results/bench/quantize_speed_smollm2_cpu.json

One process loads the model once (optionally cut to its first `--layers` decoder blocks:
SmolLM2's real weights and exact layer shapes, fewer blocks), draws one set of calibration
token tensors (C4, seed 0) and quantizes a fresh copy of the model with each variant of each
pair, native first, with the settings of the alignment runs (conf/experiment/alignment.yaml,
reports/alignment/README.md):

    gptq         gptq (asymmetric, true_sequential=false)   llmc_gptq, gptqmodel_gptq   w4a16
    awq          awq_noclip (inputs_from=fp, ratio_grid=closed)  llmc_awq               w4a16
    smoothquant  smoothquant (act_mode=dynamic_token)       llmc_smoothquant            w8a8
    rtn          rtn (w_grid=full)                          llmc_rtn                    w4a16

Per variant: wall and CPU seconds of `method.quantize`; for the native methods a per-stage
profile (exclusive seconds of the functions that make up the method: block-input capture,
calibration forwards, Hessian accumulation, GPTQ solve, AWQ grid search forwards and weight
rounding, ...); and the result: perplexity and relative logit error against the
full-precision model on held-out WikiText-2 windows, and per pair the fraction of integer
weight codes equal between native and library. Ratios native / library are printed and
written. Single-threaded (--threads 1, the default): both sides run the same way.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# pair -> (bits, [(variant, method, overrides)]): the native variant first
PAIRS: dict[str, tuple[str, list[tuple[str, str, list[str]]]]] = {
    "gptq": ("w4a16", [
        ("gptq", "gptq", ["method.symmetric=false", "method.true_sequential=false"]),
        ("llmc_gptq", "llmc_gptq", ["method.symmetric=false"]),
        ("gptqmodel_gptq", "gptqmodel_gptq",
         ["method.symmetric=false", "method.true_sequential=false"])]),
    "awq": ("w4a16", [
        ("awq", "awq_noclip", ["method.inputs_from=fp", "method.ratio_grid=closed"]),
        ("llmc_awq", "llmc_awq", [])]),
    "smoothquant": ("w8a8", [
        ("smoothquant", "smoothquant", ["method.act_mode=dynamic_token"]),
        ("llmc_smoothquant", "llmc_smoothquant", [])]),
    "rtn": ("w4a16", [
        ("rtn", "rtn", ["method.w_grid=full"]),
        ("llmc_rtn", "llmc_rtn", [])]),
}


class StageProfile:
    """Exclusive seconds per stage, wall and CPU (process_time: on a shared machine the CPU
    seconds of a single-threaded run are the steadier measure): each patched function's
    time minus the time of the patched functions it calls (a stack of open stages);
    `other` is the rest of the run."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []      # [wall start, cpu start, child wall, child cpu]

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append([time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                w0, c0, child_w, child_c = self._stack.pop()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                self.wall[stage] += wall - child_w
                self.cpu[stage] += cpu - child_c
                self.calls[stage] += 1
                if self._stack:
                    self._stack[-1][2] += wall
                    self._stack[-1][3] += cpu
        return timed

    @contextmanager
    def patched(self, targets: list[tuple[Any, str, str]]):
        """targets: (owner module or class, attribute, stage name)."""
        saved = []
        try:
            for owner, attr, stage in targets:
                original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
                saved.append((owner, attr, original))
                setattr(owner, attr, self.wrap(stage, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)

    def table(self, wall: float, cpu: float) -> dict[str, dict[str, float]]:
        rows = {k: {"cpu_s": round(self.cpu[k], 2), "cpu_share": round(self.cpu[k] / cpu, 3),
                    "wall_s": round(self.wall[k], 2), "calls": self.calls[k]}
                for k in sorted(self.cpu, key=lambda k: -self.cpu[k])}
        rest_c, rest_w = cpu - sum(self.cpu.values()), wall - sum(self.wall.values())
        rows["other"] = {"cpu_s": round(rest_c, 2), "cpu_share": round(rest_c / cpu, 3),
                         "wall_s": round(rest_w, 2), "calls": 0}
        return rows


def stage_targets(method: str) -> list[tuple[Any, str, str]]:
    """The functions that make up a native method, by stage name (exclusive timing)."""
    import methods.awq as awq
    import methods.blockwise as bw
    import methods.gptq as gptq
    import methods.rtn as rtn
    import methods.smoothquant as sq

    common = [(bw, "capture_block_inputs", "capture block inputs (embeddings)"),
              (bw.BlockInputs, "advance", "next block inputs (block forward)"),
              (bw.BlockStore, "onload", "onload/offload"),
              (bw.BlockStore, "offload", "onload/offload")]
    per_method = {
        "gptq": [(gptq, "run_block_hooked", "calibration forward"),
                 (bw.HessianAccumulator, "__call__", "Hessian accumulation"),
                 (bw.StatsAccumulator, "__call__", "activation stats"),
                 (gptq.GPTQSolver, "solve", "GPTQ solve"),
                 (gptq, "round_and_wrap", "write-back (round + wrap)")],
        "awq": [(awq.AWQ, "_capture", "capture X / fp outputs (block forward)"),
                (awq, "_call", "grid search: module forwards"),
                (awq, "fake_quantize_weight", "grid search: Q(W s) / s"),
                (awq.AWQ, "_search_and_apply_scale", "grid search: loss, rest"),
                (awq.AWQ, "_apply_scale", "fold scales"),
                (awq, "collect_block_stats", "activation stats (block forward)"),
                (awq.AWQ, "_clip_group", "clip search"),
                (awq, "round_and_wrap", "write-back (round + wrap)")],
        "smoothquant": [(sq, "collect_block_stats", "activation stats (block forward)"),
                        (sq.SmoothQuant, "_smooth", "smoothing scales + fold"),
                        (sq, "round_and_wrap", "write-back (round + wrap)")],
        "rtn": [(rtn, "round_and_wrap", "write-back (round + wrap)"),
                (rtn, "collect_block_stats", "activation stats (block forward)")],
    }
    return common + per_method[method]


def cpu_seconds() -> float:
    """CPU seconds of this process, all threads (a library's own worker threads count)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def truncate(model, spec_name: str, layers: int | None):
    """The model cut to its first `layers` decoder blocks (config updated), and its spec."""
    from methods.arch import ModelSpec
    spec = ModelSpec.from_model(model, spec_name)
    blocks = spec.blocks(model)
    if layers and layers < len(blocks):
        del blocks[layers:]
        cfg = getattr(model.config, "text_config", None) or model.config
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
        spec = ModelSpec.from_model(model, spec_name)
    return model, spec


def codes_of(model) -> dict[str, Any]:
    """{linear name: integer codes (int16, CPU)} of every weight-quantized FakeQuantLinear."""
    import torch

    from methods.layers import FakeQuantLinear
    return {n: m.codes().to(torch.int16) for n, m in model.named_modules()
            if isinstance(m, FakeQuantLinear) and m.w_scale is not None}


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float] | None:
    if not a or a.keys() != b.keys():
        return None
    equal = sum(int((a[n] == b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    worst = min(a, key=lambda n: float((a[n] == b[n]).float().mean()))
    return {"equal_codes": round(equal / total, 5),
            "worst_linear": worst,
            "worst_linear_equal": round(float((a[worst] == b[worst]).float().mean()), 5)}


def evaluate(model, windows, fp_logits, ref_logits=None, keep: bool = False, ppl: bool = True
             ) -> tuple[dict[str, float], list | None]:
    """Perplexity on the held-out windows (whole models only: a cut model's is meaningless),
    ||logits - fp logits|| / ||fp logits|| and, given the logits of the pair's native run,
    ||logits - native logits|| / ||fp logits|| (native and library agree when it is small
    next to their own errors). keep: also return the logits."""
    import torch

    from harness.evals.ppl import _batch_nll, perplexity
    nlls, kept, err, diff, den = [], [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for j, w in enumerate(windows):
            logits = model(input_ids=w[None], use_cache=False).logits
            nlls.append(_batch_nll(logits, w[None], j, "heldout"))
            if fp_logits is not None:
                err += float((logits - fp_logits[j]).double().pow(2).sum())
                den += float(fp_logits[j].double().pow(2).sum())
            if ref_logits is not None:
                diff += float((logits - ref_logits[j]).double().pow(2).sum())
            if keep:
                kept.append(logits)
    out = {"ppl_heldout": round(perplexity(torch.cat(nlls)), 4)} if ppl else {}
    if fp_logits is not None:
        out["rel_logit_err"] = round((err / den) ** 0.5, 6)
    if ref_logits is not None:
        out["rel_logit_diff_to_native"] = round((diff / den) ** 0.5, 6)
    return out, (kept if keep else None)


def markdown_table(result: dict[str, Any]) -> str:
    """The docs' table of a written JSON: per pair CPU seconds, ratio and agreement."""
    lines = ["| native / library | native CPU s | library CPU s | native / library CPU time | "
             "rel. logit error native / library | native vs library logits | equal codes |",
             "|:--|--:|--:|--:|--:|--:|--:|"]
    runs = result["runs"]
    for key, r in result["ratios"].items():
        nat, lib = key.split("/")
        lines.append(f"| {nat} / {lib} | {runs[nat]['cpu_s']:.1f} | {runs[lib]['cpu_s']:.1f} | "
                     f"**{r['cpu_time']:.2f}** | {r['rel_logit_err'][0]:.4f} / "
                     f"{r['rel_logit_err'][1]:.4f} | {r['rel_logit_diff']:.4f} | "
                     f"{100 * r['equal_codes']:.1f}% |")
    return "\n".join(lines)


def profile_table(result: dict[str, Any], variant: str, top: int = 6) -> str:
    """One native run's stages by CPU share (the `top` largest and the rest)."""
    prof = result["runs"][variant]["profile"]
    rows = [(k, v) for k, v in prof.items() if k != "other"][:top]
    rest = sum(v["cpu_s"] for k, v in prof.items() if (k, v) not in rows)
    cpu = result["runs"][variant]["cpu_s"]
    cells = [f"{k} {v['cpu_s']:.1f} s ({100 * v['cpu_share']:.0f}%)" for k, v in rows]
    return "; ".join(cells + [f"rest {rest:.1f} s ({100 * rest / cpu:.0f}%)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a conf/model name")
    ap.add_argument("--layers", type=int, default=4, help="keep the first N decoder blocks "
                    "(0: all)")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4, help="held-out WikiText-2 windows")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"subset of {','.join(PAIRS)}")
    ap.add_argument("--skip", default="", help="variants not to run, e.g. gptqmodel_gptq")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="time native methods unpatched")
    ap.add_argument("--out", type=Path,
                    default=REPO / "results/bench/quantize_speed_smollm2_cpu.json")
    ap.add_argument("--table", type=Path, help="print the docs' tables of a written JSON")
    args = ap.parse_args()
    if args.table:
        result = json.loads(args.table.read_text())
        print(markdown_table(result))
        for variant, run in result["runs"].items():
            if run.get("profile"):
                print(f"\n{variant}: {profile_table(result, variant)}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from hydra import compose, initialize_config_dir

    from harness.evals.ppl import make_windows, tokenize_text
    from harness.inputs.calib import CalibSpec, load_calibration
    from harness.inputs.data import eval_text, resolve_data_dir
    from harness.inputs.models import load_model
    from harness.run.config_defaults import register_method_defaults
    from harness.run.pipeline import build_method
    from methods.arch import ModelSpec

    torch.set_num_threads(args.threads)
    register_method_defaults()
    pairs = [p for p in args.pairs.split(",") if p]
    skip = set(filter(None, args.skip.split(",")))
    cfgs = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose("run", overrides=[f"model={args.model}"])
        for pair in pairs:
            bits, variants = PAIRS[pair]
            for variant, method, overrides in variants:
                if variant not in skip:
                    cfgs[variant] = (pair, compose("run", overrides=[
                        f"model={args.model}", f"method={method}", f"bits={bits}", *overrides]))
    t0 = time.perf_counter()
    lm = load_model(base.model, Path(base.paths.cache_dir))
    load_s = time.perf_counter() - t0
    n_blocks = len(ModelSpec.from_model(lm.model, args.model).blocks(lm.model))
    model, spec = truncate(lm.model, args.model, args.layers)
    cut = len(spec.blocks(model)) < n_blocks
    data_dir = resolve_data_dir(base.paths.get("data_dir"))
    calib, calib_info = load_calibration(
        lm.tokenizer, CalibSpec("c4", args.n_samples, args.seqlen, 0), data_dir,
        Path(base.paths.cache_dir), False, model.config.vocab_size)
    windows = make_windows(tokenize_text(lm.tokenizer, eval_text("wikitext2", data_dir)),
                           args.seqlen, max_tokens=args.eval_windows * args.seqlen)
    with torch.no_grad():
        fp_logits = [model(input_ids=w[None], use_cache=False).logits for w in windows]
    fp = evaluate(model, windows, None, ppl=not cut)[0]
    print(f"model {args.model} ({len(spec.blocks(model))} blocks), calibration "
          f"{args.n_samples}x{args.seqlen}, {len(windows)} held-out windows: fp {fp}", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    codes: dict[str, dict[str, Any]] = {}
    native_logits = None

    def write() -> dict[str, dict[str, Any]]:
        """The JSON so far (rewritten after every variant: a stopped run keeps its rows)."""
        ratios: dict[str, dict[str, Any]] = {}
        for pair in pairs:
            nat = PAIRS[pair][1][0][0]
            for variant, _, _ in PAIRS[pair][1][1:]:
                a, b = runs.get(nat, {}), runs.get(variant, {})
                if a.get("status") == "ok" and b.get("status") == "ok":
                    ratios[f"{nat}/{variant}"] = {
                        "cpu_time": round(a["cpu_s"] / b["cpu_s"], 3),
                        "wall_time": round(a["quantize_s"] / b["quantize_s"], 3),
                        "rel_logit_err": [a["rel_logit_err"], b["rel_logit_err"]],
                        "rel_logit_diff": b["rel_logit_diff_to_native"],
                        **({"ppl_rel_diff": round(a["ppl_heldout"] / b["ppl_heldout"] - 1, 5)}
                           if "ppl_heldout" in a else {}),
                        **(agreement(codes[nat], codes[variant]) or {})}
        result = {"benchmark": "quantize_speed",
                  "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "model": args.model, "blocks": len(spec.blocks(model)),
                  "calibration": f"c4 {args.n_samples}x{args.seqlen} seed 0",
                  "calibration_info": calib_info,
                  "heldout": f"wikitext2 first {len(windows)} windows of {args.seqlen}",
                  "fp": fp, "threads": torch.get_num_threads(),
                  "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "model_load_s": round(load_s, 1), "runs": runs, "ratios": ratios,
                  "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "loadavg_at_end": os.getloadavg(), "torch": torch.__version__},
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.out)
        return ratios

    for variant, (pair, cfg) in cfgs.items():
        native = variant == PAIRS[pair][1][0][0]
        method = build_method(cfg.method)
        reason = method.check(spec)
        if reason:
            runs[variant] = {"pair": pair, "status": "skipped", "reason": reason}
            print(f"{variant}: skipped ({reason})", flush=True)
            continue
        q = copy.deepcopy(model)
        gc.collect()
        prof = StageProfile()
        targets = stage_targets(pair) if native and not args.no_profile else []
        try:
            with prof.patched(targets):
                c0, t0 = cpu_seconds(), time.perf_counter()
                q = method.quantize(q, spec, calib)
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            runs[variant] = {"pair": pair, "status": "failed",
                             "error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{variant}: failed: {e}", flush=True)
            continue
        row = {"pair": pair, "status": "ok", "native": native,
               "method": cfg.method.name, "bits": cfg.bits.name,
               "settings": {k: v for k, v in method.config.__dict__.items()
                            if not k.startswith("_")},
               "quantize_s": round(seconds, 2), "cpu_s": round(cpu, 2)}
        metrics, logits = evaluate(q, windows, fp_logits, None if native else native_logits,
                                   keep=native, ppl=not cut)
        row.update(metrics)
        if native:
            native_logits = logits
        if targets:
            row["profile"] = prof.table(seconds, cpu)
        codes[variant] = codes_of(q)
        runs[variant] = row
        del q
        print(f"{variant:18s} {seconds:8.1f} s (cpu {cpu:7.1f} s)  " + "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        write()

    ratios = write()
    for k, r in ratios.items():
        print(f"{k:32s} cpu x{r['cpu_time']:.3f}  wall x{r['wall_time']:.3f}  "
              f"logit err native/lib {r['rel_logit_err']}  diff {r['rel_logit_diff']:.4f}  "
              f"codes equal {r.get('equal_codes', float('nan')):.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
