"""Architecture knowledge, one declarative table per model family.

A method never asks `isinstance(model, LlamaForCausalLM)`: it asks the family table
where the decoder blocks are, which linears each block has, which of them share an
input, and which module produces that input (the op a smoothing scale s folds into).

Paths are dotted attribute paths: model-level ones from the CausalLM root, group
ones relative to one decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

FeederKind = Literal["norm", "linear", "none"]
NormKind = Literal["rmsnorm", "rmsnorm_plus_one", "layernorm"]


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input X [tokens, K].

    feeder: the module whose output is X, or None when X is not a plain module
    output (e.g. o_proj reads the attention context). feeder_kind says how a
    per-channel scale s folds into it: a norm scales its weight (and bias), a linear
    scales its output rows. A linear feeder under grouped-query attention (v_proj
    before o_proj) repeats each of its rows `kv_repeat` times, so s must be shared
    across those repeats for the fold to be exact.
    """

    role: str                      # "qkv", "o", "gate_up", "down", "fc1", "fc2"
    linears: tuple[str, ...]
    feeder: str | None = None
    feeder_kind: FeederKind = "none"
    optional_fold: bool = False    # True for linear->linear folds (v->o, up->down)


@dataclass(frozen=True)
class FamilyTable:
    family: str
    blocks: str                    # ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    norm_kind: NormKind
    groups: tuple[LinearGroup, ...]
    needs_bos: bool = False        # evaluation windows must start with BOS
    model_types: tuple[str, ...] = field(default=())
    kv_linears: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")  # cached K, V
    # Linears whose output is added to the residual stream (a rotation of the stream turns
    # their output rows; every norm-fed group reads it).
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")

    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.linears)

    def group_of(self, linear: str) -> LinearGroup:
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(f"{linear!r} is in no group of family {self.family!r}")


_LLAMA_GROUPS = (
    LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "input_layernorm", "norm"),
    LinearGroup("o", ("self_attn.o_proj",), "self_attn.v_proj", "linear", optional_fold=True),
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
    LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear", optional_fold=True),
)

LLAMA = FamilyTable(
    family="llama", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", norm_kind="rmsnorm", groups=_LLAMA_GROUPS,
    model_types=("llama", "mistral"),
)

QWEN2 = FamilyTable(
    family="qwen2", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", norm_kind="rmsnorm", groups=_LLAMA_GROUPS,
    model_types=("qwen2", "qwen3"),
)

# Gemma-3: RMSNorm computes x_hat * (1 + w); the MLP input comes from
# pre_feedforward_layernorm (post_attention_layernorm normalises o_proj's output).
GEMMA3 = FamilyTable(
    family="gemma3", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", norm_kind="rmsnorm_plus_one", needs_bos=True,
    groups=(
        LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "input_layernorm", "norm"),
        LinearGroup("o", ("self_attn.o_proj",), "self_attn.v_proj", "linear", optional_fold=True),
        LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm",
                    "norm"),
        LinearGroup("down", ("mlp.down_proj",), "mlp.up_proj", "linear", optional_fold=True),
    ),
    model_types=("gemma3_text", "gemma3"),
)

OPT = FamilyTable(
    family="opt", blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm", lm_head="lm_head", norm_kind="layernorm",
    needs_bos=True,
    groups=(
        LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn_layer_norm", "norm"),
        LinearGroup("o", ("self_attn.out_proj",), "self_attn.v_proj", "linear",
                    optional_fold=True),
        LinearGroup("fc1", ("fc1",), "final_layer_norm", "norm"),
        LinearGroup("fc2", ("fc2",)),
    ),
    model_types=("opt",), residual_writers=("self_attn.out_proj", "fc2"),
)

# BLOOM: LayerNorm with bias (also one after the embedding, outside the blocks), ALiBi
# position biases (block kwarg `alibi`), one fused query_key_value linear whose rows
# interleave q, k, v per head, a GELU MLP without a gate. The attention output `dense`
# reads the attention context of the fused qkv: no plain producer to fold a scale into,
# and no separate K / V linears for a KV-cache quantizer.
BLOOM = FamilyTable(
    family="bloom", blocks="transformer.h", embed="transformer.word_embeddings",
    final_norm="transformer.ln_f", lm_head="lm_head", norm_kind="layernorm",
    groups=(
        LinearGroup("qkv", ("self_attention.query_key_value",), "input_layernorm", "norm"),
        LinearGroup("o", ("self_attention.dense",)),
        LinearGroup("fc1", ("mlp.dense_h_to_4h",), "post_attention_layernorm", "norm"),
        LinearGroup("fc2", ("mlp.dense_4h_to_h",)),
    ),
    model_types=("bloom",), kv_linears=(),
    residual_writers=("self_attention.dense", "mlp.dense_4h_to_h"),
)

FAMILIES: dict[str, FamilyTable] = {t.family: t for t in (LLAMA, QWEN2, GEMMA3, OPT, BLOOM)}


def family_for(model_type: str) -> FamilyTable:
    for table in FAMILIES.values():
        if model_type in table.model_types:
            return table
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"no architecture table for model_type {model_type!r}; known: {known}. "
        "Add a FamilyTable in methods/arch.py."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


@dataclass(frozen=True)
class ModelSpec:
    """What a method may know about a model before touching it (for `check`)."""

    name: str
    table: FamilyTable
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    in_features: dict[str, int]    # linear name (block-relative) -> K

    @property
    def kv_repeat(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model(cls, model: nn.Module, name: str) -> ModelSpec:
        cfg = model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        table = family_for(cfg.model_type)
        blocks = get_module(model, table.blocks)
        block0 = blocks[0]
        in_features = {n: get_module(block0, n).in_features for n in table.linear_names()}
        num_heads = cfg.num_attention_heads
        hidden = cfg.hidden_size
        mlp_writer = next(n for n in table.residual_writers
                          if sublayer_of(table.group_of(n).role) == "mlp")
        return cls(
            name=name, table=table, hidden_size=hidden,
            intermediate_size=in_features[mlp_writer],
            num_layers=len(blocks), num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(cfg, "head_dim", None) or hidden // num_heads,
            in_features=in_features,
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.table.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {n: get_module(block, n) for n in self.table.linear_names()}


# Sub-layer of each linear role, for attention-vs-MLP diagnostics.
ATTENTION_ROLES = frozenset({"qkv", "o"})


def sublayer_of(role: str) -> Literal["attn", "mlp"]:
    return "attn" if role in ATTENTION_ROLES else "mlp"
