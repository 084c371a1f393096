"""A model larger than half of this machine's memory budget, quantized and evaluated with
one block in memory at a time (placement.mode=disk): peak RSS against its fp32 weights.

    python benchmarks/large_model.py --out results/bench/large_model_cpu.json

1. Writes a random LLaMA-architecture checkpoint (default 1.57 B parameters: hidden 2048,
   MLP 5632, 28 blocks, vocab 32000, untied head; N(0, 0.02) weights, seeded) as one
   safetensors shard per block, without ever holding the model in memory, plus the byte-level
   tokenizer the tests use.
2. Runs the real `ptqbench` pipeline on it once per method (rtn w4a16, gptq w4a16, fptq
   w4a8), each in its own process so its peak RSS (the kernel's ru_maxrss of that process)
   is its own: calibration 4 x 512 tokens of C4, perplexity on 2 windows of 512 tokens of
   WikiText-2 (a random model's perplexity means nothing; its time and memory do).
3. Prints peak RSS / fp32 weight bytes and seconds per phase; writes the JSON (+ the records).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = (("rtn", "w4a16"), ("gptq", "w4a16"), ("fptq", "w4a8"))


def llama_shapes(hidden: int, mlp: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a LLaMA checkpoint (MHA, untied head)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden),
                                          "model.norm.weight": (hidden,),
                                          "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.up_proj.weight"] = (mlp, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, mlp)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_checkpoint(path: Path, hidden: int, mlp: int, layers: int, vocab: int,
                     seed: int = 0) -> int:
    """Random checkpoint, one shard per block (and one for the rest); returns n params."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from harness.inputs.models import tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                torch_dtype="float32").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    shapes = llama_shapes(hidden, mlp, layers, vocab)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    weight_map, n_params = {}, 0
    for key, names in shards.items():
        file = f"model-{key}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=gen) * 0.02) for n in names}
        save_file(tensors, path / file)
        n_params += sum(t.numel() for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": n_params * 4}, "weight_map": weight_map}))
    return n_params


def run_method(ckpt: Path, method: str, bits: str, results: Path, group: int) -> dict:
    cmd = [sys.executable, "-m", "harness.run.cli", "model=local",
           f"model.source.path={ckpt}", "model.name=llama-random-1.6b", "model.dtype=float32",
           "model.device=cpu", f"model.group_size={group}", f"method={method}", f"bits={bits}",
           "placement.mode=disk", "calib=c4-32x512", "calib.n_samples=4", "eval=ppl",
           "eval.datasets=[wikitext2]", "eval.max_windows=2", "eval.seqlen=512", "cache=off",
           f"paths.results_dir={results}", "force=true"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    runs = sorted((results / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(runs[-1].read_text()) if runs else {}
    if os.waitstatus_to_exitcode(status) != 0 or record.get("method") != method:
        raise RuntimeError(f"{method} run failed (exit {status}); see the Hydra log")
    return {"method": method, "bits": bits, "status": record["status"],
            "error": record.get("error"), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(wall, 1), "timings_s": record.get("timings", {}),
            "phase_peak_mb": record.get("memory", {}),
            "ppl_wikitext2": record.get("metrics", {}).get("ppl_wikitext2"),
            "placement": record.get("provenance", {}).get("model_info", {}).get("placement"),
            "block_store": record.get("provenance", {}).get("block_store"),
            "record": record.get("run_id")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(m for m, _ in METHODS))
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoint + records (temp)")
    ap.add_argument("--out", type=Path, default=REPO / "results/bench/large_model_cpu.json")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptqbench-large-"))
    ckpt = work / "checkpoint"
    t0 = time.perf_counter()
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if (ckpt / "model.safetensors.index.json").is_file() and previous.get("n_params"):
        n_params, write_s = previous["n_params"], previous["checkpoint_write_s"]   # reused
    else:
        n_params = write_checkpoint(ckpt, args.hidden, args.mlp, args.layers, args.vocab)
        write_s = time.perf_counter() - t0
    fp32_bytes = n_params * 4
    print(f"random LLaMA checkpoint: {n_params / 1e9:.3f} B parameters, "
          f"{fp32_bytes / 2**30:.2f} GiB fp32, written in {write_s:.0f} s", flush=True)
    wanted = args.methods.split(",")
    # rows of methods not rerun now are kept (one JSON for the model, filled method by method)
    rows = [r for r in previous.get("runs", []) if r["method"] not in wanted]
    for method, bits in METHODS:
        if method not in wanted:
            continue
        row = run_method(ckpt, method, bits, work / "results", args.group_size)
        row["peak_rss_over_fp32_weights"] = round(row["peak_rss_bytes"] / fp32_bytes, 3)
        rows.append(row)
        print(f"{method:5s} {bits}: {row['status']}, peak RSS "
              f"{row['peak_rss_bytes'] / 2**30:.2f} GiB = {row['peak_rss_over_fp32_weights']:.2f}"
              f" x fp32 weights; " + ", ".join(f"{k} {v:.0f} s"
                                              for k, v in row["timings_s"].items()), flush=True)
        out = {"benchmark": "large_model", "host": platform.node(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "n_params": n_params,
               "fp32_weight_bytes": fp32_bytes,
               "shape": {"hidden": args.hidden, "mlp": args.mlp, "layers": args.layers,
                         "vocab": args.vocab, "group_size": args.group_size},
               "calibration": "C4 4 x 512 tokens", "eval": "WikiText-2, 2 windows of 512",
               "checkpoint_write_s": round(write_s, 1), "runs": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))   # after each method
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
