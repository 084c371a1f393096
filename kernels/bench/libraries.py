"""Other W4A8 / W4A16 kernel libraries at the same shapes, where importable (gemlite,
torchao); each one absent or failing is listed with the reason instead of a number."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.bench.gemm import GROUP_SIZE
from kernels.bench.timing import Timer


def _torchao(config_name: str) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    def build(lin: torch.nn.Linear) -> torch.nn.Module:
        import torchao.quantization as tq

        cfg = getattr(tq, config_name)
        mod = copy.deepcopy(lin)
        tq.quantize_(mod, cfg(group_size=GROUP_SIZE))
        return mod

    return build


def _gemlite(helper_name: str) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    def build(lin: torch.nn.Linear) -> torch.nn.Module:
        import gemlite.helper as gh

        return getattr(gh, helper_name)(device=str(lin.weight.device)).from_linear(copy.deepcopy(lin))

    return build


LIBRARIES: dict[str, Callable[[torch.nn.Linear], torch.nn.Module]] = {
    "torchao_int4_weight_only": _torchao("Int4WeightOnlyConfig"),
    "torchao_int8dyn_int4": _torchao("Int8DynamicActivationInt4WeightConfig"),
    "gemlite_a16w4": _gemlite("A16W4"),
    "gemlite_a8w4": _gemlite("A8W4_int8_dynamic"),
}


def bench_libraries(shapes: list[tuple[int, int]], ms: list[int], timer: Timer,
                    device: str = "cuda") -> dict:
    """{"rows": [{N, K, M, ms: {fp16, lib...}, speedup_vs_fp16}], "skipped": {lib: why}}."""
    rows, skipped = [], {}
    for n, k in shapes:
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.float16)
        mods = {}
        for name, build in LIBRARIES.items():
            if name in skipped:
                continue
            try:
                mods[name] = build(lin)
            except Exception as e:  # noqa: BLE001 - absent, or an API that moved: say which
                skipped[name] = f"{type(e).__name__}: {e}"[:200]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            row = {"N": n, "K": k, "M": m, "ms": {"fp16": timer(lambda x=x, w=lin.weight: F.linear(x, w))}}
            for name, mod in mods.items():
                try:
                    row["ms"][name] = timer(lambda x=x, mod=mod: mod(x))
                except Exception as e:  # noqa: BLE001
                    skipped.setdefault(name, f"{type(e).__name__}: {e}"[:200])
            row["speedup_vs_fp16"] = {k_: row["ms"]["fp16"] / v for k_, v in row["ms"].items() if k_ != "fp16"}
            rows.append(row)
    return {"rows": rows, "skipped": skipped}


def library_table(res: dict) -> str:
    names = sorted({k for r in res["rows"] for k in r["speedup_vs_fp16"]})
    lines = ["| N x K | M | fp16 us | " + " | ".join(f"{n} (x)" for n in names) + " |",
             "|" + "---|" * (3 + len(names))]
    for r in res["rows"]:
        cells = [f"{r['N']}x{r['K']}", str(r["M"]), f"{r['ms']['fp16'] * 1e3:.1f}"]
        cells += [f"{r['speedup_vs_fp16'][n]:.2f}" if n in r["speedup_vs_fp16"] else "-" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {name}: skipped ({why})" for name, why in sorted(res["skipped"].items())]
    return "\n".join(lines)
