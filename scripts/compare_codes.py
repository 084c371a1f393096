"""Per-block agreement of two quantized-model cache entries (same model, grid and bits):
fraction of equal integer codes, scales and zero points per linear type and block.

    python scripts/compare_codes.py .cache/quantized/<key-a> .cache/quantized/<key-b>
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file

from methods.primitives import recover_codes


def agreement(dir_a: Path, dir_b: Path) -> dict[int, dict[str, float]]:
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    bits = json.loads((dir_a / "manifest.json").read_text())["method"]["w_bits"]
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for name in sorted(k[: -len(".w_scale")] for k in a if k.endswith(".w_scale")):
        block = int(name.split(".layers.")[1].split(".")[0])
        qa, qb = (recover_codes(t[f"{name}.weight"], t[f"{name}.w_scale"],
                                t.get(f"{name}.w_zero"), bits) for t in (a, b))
        out[block][name.rsplit(".", 1)[1]] = float((qa == qb).float().mean())
        out[block]["scales_equal"] = min(out[block].get("scales_equal", 1.0), float(
            (a[f"{name}.w_scale"] == b[f"{name}.w_scale"]).float().mean()))
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    for dir_ in (args.a, args.b):
        print(dir_, json.loads((dir_ / "manifest.json").read_text())["method"]["name"])
    rows = agreement(args.a, args.b)
    cols = sorted({k for r in rows.values() for k in r})
    print("| block | " + " | ".join(cols) + " |")
    print("|--:|" + "--:|" * len(cols))
    for block, r in sorted(rows.items()):
        print(f"| {block} | " + " | ".join(f"{r.get(c, float('nan')):.4f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
