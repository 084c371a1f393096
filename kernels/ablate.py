"""Where the W4A8 GEMM's time goes: the kernel timed with one stage left out.

    python -m kernels.ablate [--out results/bench/<device>/ablate.json]

Variants of `kernels.w4a8_gemm` (CUDA-graph replay over weight copies larger than L2, as in
`kernels.bench`), next to cuBLAS fp16 at the same shape:
  full          the kernel as shipped (32-bit nibble unpack)
  shift_unpack  per-byte arithmetic-shift unpack (the earlier code path; same results)
  no_unpack     packed bytes fed to the dots as int8 (no unpack; wrong results)
  no_rescale    one int32 accumulator over K, one rescale at the end (wrong results)
  neither       no unpack and no per-group rescale (wrong results)
  two_level     the two-level weight format (q8 = s2 * (q - z) in registers, one rescale; the
                real alternative to the per-group rescale, correct results)
  two_launch_reduce  decode split-K partials summed by a second launch (same results)
The difference to `full` is the cost of the stage left out. M covers decode (1, 16) and
prefill (1024, 2048, 4096). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

# variant -> constexpr flags of the W4A8 kernel (set here only; the production wrapper sets none)
VARIANTS = {
    "full": {},
    "shift_unpack": {"FAST_UNPACK": False},
    "no_unpack": {"SKIP_UNPACK": True},
    "no_rescale": {"SKIP_RESCALE": True},
    "neither": {"SKIP_UNPACK": True, "SKIP_RESCALE": True},
    "two_level": {},  # run with two-level weights (w_scale2)
    "two_launch_reduce": {"in_kernel_reduce": False},
}
SHAPES = [(4096, 4096), (11008, 4096)]
MS = [1, 16, 1024, 2048, 4096]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.ablate", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON path")
    ap.add_argument("--ms", type=int, nargs="+", default=MS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.ablate needs a CUDA GPU (none found); nothing measured.")
        return 0
    import torch.nn.functional as F

    from kernels.bench.env import environment
    from kernels.bench.gemm import GROUP_SIZE, make_problem
    from kernels.bench.timing import Rotation, gpu_timer, n_copies
    from kernels.quant_per_token import quant_per_token
    from kernels.w4a8_gemm import launch_w4a8, w4a8_two_level_gemm

    timer = gpu_timer(quick=True)
    env = environment()
    rows = []
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    for n, k in SHAPES:
        for m in args.ms:
            p = make_problem(m, n, k, "cuda", copies=n_copies(n, k, "cuda"))
            xq, xs = quant_per_token(p["x"])
            w16 = Rotation([c["w16"] for c in p["copies"]])
            w4 = Rotation([(c["w4"], c["w4_scale"]) for c in p["copies"]])
            x = p["x"]
            row = {"N": n, "K": k, "M": m, "ms": {"fp16": timer(lambda x=x, w16=w16: F.linear(x, w16()))}}
            w2l = Rotation([(c["w4"], c["w4_s1"], c["w4_s2"]) for c in p["copies"]])
            for name, flags in VARIANTS.items():
                if name == "two_level":
                    row["ms"][name] = timer(lambda xq=xq, xs=xs, w2l=w2l: w4a8_two_level_gemm(
                        xq, xs, *w2l(), None, GROUP_SIZE))
                    continue
                row["ms"][name] = timer(lambda flags=flags, xq=xq, xs=xs, w4=w4: launch_w4a8(
                    xq, xs, *w4(), GROUP_SIZE, None, torch.float16, None, flags))
            full = row["ms"]["full"]
            row["share_of_full"] = {name: 1.0 - t / full for name, t in row["ms"].items()
                                    if name not in ("fp16", "full")}  # fmt: skip
            rows.append(row)
            print(f"[{n}x{k} M={m}] " + " ".join(f"{k_}={v * 1e3:.1f}us" for k_, v in row["ms"].items()), flush=True)
            del p
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "variants": VARIANTS, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
