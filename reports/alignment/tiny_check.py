"""Native vs llm-compressor on tiny-llama with injected outliers: mean squared logit error
vs the fp32 model. Run from the repo root:  python reports/alignment/tiny_check.py
Writes reports/alignment/tiny_check.json (the source of the README's tiny-model table)."""

import copy
import json
from pathlib import Path

import torch

from harness.inputs.models import tiny_llama
from methods.arch import ModelSpec
from methods.awq import AWQConfig
from methods.baselines import LLMCompressorAWQConfig, LLMCompressorGPTQConfig
from methods.catalog import build
from methods.gptq import GPTQConfig

torch.set_num_threads(1)
model = tiny_llama(outliers={"0.post_attention_layernorm": 50.0, "1.input_layernorm": 30.0})
model.eval()
spec = ModelSpec.from_model(model, "tiny")
gen = torch.Generator().manual_seed(1)
calib = [torch.randint(0, 320, (1, 64), generator=gen) for _ in range(4)]
test = torch.randint(0, 320, (2, 64), generator=gen)
with torch.no_grad():
    ref = model(test).logits
g = dict(w_bits=4, group_size=32)
rows = []
for cfg in [GPTQConfig(**g), LLMCompressorGPTQConfig(**g),
            GPTQConfig(**g, symmetric=False, true_sequential=False),
            GPTQConfig(**g, symmetric=False), LLMCompressorGPTQConfig(**g, symmetric=False),
            AWQConfig(**g, clip=False), LLMCompressorAWQConfig(**g)]:
    q = build(cfg).quantize(copy.deepcopy(model), spec, calib)
    with torch.no_grad():
        mse = float((q(test).logits - ref).pow(2).mean())
    print(f"{type(cfg).__name__:28s} sym={cfg.symmetric!s:5s} "
          f"seq={getattr(cfg, 'true_sequential', '-')!s:5s} mse={mse:.5f}")
    rows.append({"config": type(cfg).__name__, "symmetric": cfg.symmetric,
                 "true_sequential": getattr(cfg, "true_sequential", None),
                 "act_order": getattr(cfg, "act_order", None), "mse": mse})
out = Path(__file__).with_suffix(".json")
out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
print(f"wrote {out}")
