"""Block-wise calibration engine, shared by every calibrated method.

    inputs = capture_block_inputs(model, spec, calib)      # X_0 for each sample + kwargs per block
    for i, block in blocks:                                 # only block i on the compute device
        on_block(i, block, inputs)                          # stats / Hessians, then quantize
        inputs.advance(block)                               # X_{i+1} = quantized block_i(X_i)

Capture runs the model once per sample with every decoder block replaced by a recorder
that keeps the block's keyword arguments (masks and rotary embeddings differ per block
type in e.g. Gemma-3) and passes hidden states through; the last recorder stops the
forward before the final norm and lm_head.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from methods.act_range import AbsHistogram, RangeEstimator
from methods.arch import LinearGroup, ModelSpec, get_module
from methods.base import LinearStats

log = logging.getLogger(__name__)


# The device blocks compute on when the weights live elsewhere (model.placement=offload):
# set by the orchestration around quantize / eval, read wherever a device is defaulted.
_COMPUTE_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "compute_device", default=None)


class BlockStore:
    """Where a decoder block's weights wait while other blocks compute. This one keeps them
    in memory on their home device and moves a block to the compute device for its turn;
    a store can instead keep them on disk (harness.inputs.lazy.DiskBlocks)."""

    def onload(self, index: int, block: nn.Module, device: torch.device) -> None:
        self._home = next(block.parameters()).device
        block.to(device)

    def offload(self, index: int, block: nn.Module, changed: bool) -> None:
        """changed: the block was rewritten (quantized) and its new state must be kept."""
        block.to(self._home)


_BLOCK_STORE: contextvars.ContextVar[BlockStore | None] = contextvars.ContextVar(
    "block_store", default=None)


@contextmanager
def compute_on(device: torch.device | None, store: BlockStore | None = None):
    """Within the block, blocks (and the embeddings for capture) run on `device`, taken
    from and returned to `store` (default: moved in memory)."""
    token = _COMPUTE_DEVICE.set(None if device is None else torch.device(device))
    store_token = _BLOCK_STORE.set(store)
    try:
        yield
    finally:
        _COMPUTE_DEVICE.reset(token)
        _BLOCK_STORE.reset(store_token)


def block_store() -> BlockStore:
    return _BLOCK_STORE.get() or BlockStore()


@torch.no_grad()
def for_each_block(model: nn.Module, spec: ModelSpec, fn: Callable[[int, nn.Module], None],
                   device: torch.device | None = None, desc: str = "blocks") -> None:
    """fn(i, block) for each block in turn on the compute device, without calibration data
    (e.g. data-free RTN); with a disk store only one block's weights are in memory."""
    device = device or compute_device(model)
    store = block_store()
    blocks = spec.blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, leave=False):
        store.onload(i, blocks[i], device)
        fn(i, blocks[i])
        store.offload(i, blocks[i], changed=True)


def compute_device(model: nn.Module) -> torch.device:
    """The device set by compute_on, else where the model's weights are."""
    return _COMPUTE_DEVICE.get() or next(model.parameters()).device


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, last: bool, sink: BlockInputs):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise RuntimeError("decoder blocks are expected to take keyword arguments only")
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in ("past_key_values", "past_key_value", "layer_past", "use_cache")}
        if self.index == 0:
            self.sink.hidden.append(hidden_states.to(self.sink.store_device))
        self.sink.kwargs[self.index].append(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockInputs:
    """X_i for each calibration sample ([1, T, H] each) and each block's kwargs."""

    hidden: list[Tensor] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    block_index: int = 0
    compute_device: torch.device = torch.device("cpu")
    store_device: torch.device = torch.device("cpu")
    tuple_output: bool = False     # blocks return (hidden, ...) rather than hidden

    def __len__(self) -> int:
        return len(self.hidden)

    def samples(self) -> Iterable[tuple[Tensor, dict[str, Any]]]:
        for x, kw in zip(self.hidden, self.kwargs[self.block_index], strict=True):
            yield x.to(self.compute_device), _to_device(kw, self.compute_device)

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[Tensor]:
        """block(X_i) for every sample, kept on the store device."""
        outs = []
        for x, kw in self.samples():
            out = block(x, **kw)
            self.tuple_output = isinstance(out, (tuple, list))   # the family's block returns
            outs.append(_block_output(out).to(self.store_device))
        return outs

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        hidden = self.run(block)
        for j, h in enumerate(hidden):   # a NaN here would poison every later block's stats
            if not torch.isfinite(h).all():
                raise FloatingPointError(f"non-finite output of block {self.block_index} on "
                                         f"calibration sample {j}")
        self.hidden = hidden
        self.block_index += 1


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


to_device = _to_device


def _non_block_modules(model: nn.Module, spec: ModelSpec) -> list[nn.Module]:
    """Modules outside the decoder blocks that the capture forward runs (embeddings, rotary)."""
    parent_path, _, blocks_attr = spec.table.blocks.rpartition(".")
    parent = get_module(model, parent_path)
    return [m for name, m in parent.named_children() if name != blocks_attr]


@contextmanager
def _blocks_replaced(model: nn.Module, spec: ModelSpec, stand_ins: Sequence[nn.Module],
                     on_device: Sequence[nn.Module], device: torch.device):
    """Within the block, decoder block i is stand_ins[i] and the `on_device` modules
    (embeddings, norms, head) sit on `device`; both are put back afterwards."""
    blocks = spec.blocks(model)
    originals = list(blocks)
    homes = [(m, next(m.parameters(), torch.empty(0)).device) for m in on_device]
    try:
        for m, _ in homes:
            m.to(device)
        for i, stand_in in enumerate(stand_ins):
            blocks[i] = stand_in
        yield
    finally:
        for i, orig in enumerate(originals):
            blocks[i] = orig
        for m, dev in homes:
            if dev.type != "meta":
                m.to(dev)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ModelSpec, calib: Sequence[Tensor],
                         device: torch.device | None = None,
                         store_device: torch.device | None = None) -> BlockInputs:
    device = device or compute_device(model)
    sink = BlockInputs(compute_device=device, store_device=store_device or device)
    blocks = spec.blocks(model)
    sink.kwargs = [[] for _ in blocks]
    stand_ins = [_Recorder(i, i == len(blocks) - 1, sink) for i in range(len(blocks))]
    with _blocks_replaced(model, spec, stand_ins, _non_block_modules(model, spec), device):
        for ids in tqdm(calib, desc="capture block inputs", leave=False):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    return sink


BlockFn = Callable[[int, nn.Module, BlockInputs], None]


@torch.no_grad()
def walk_blocks(model: nn.Module, spec: ModelSpec, calib: Sequence[Tensor], on_block: BlockFn,
                device: torch.device | None = None, desc: str = "quantize blocks",
                store_device: torch.device | None = None, advance: bool = True) -> None:
    """Call on_block(i, block, inputs) for each block in order on quantized predecessors'
    outputs. Each block is moved to `device` for its turn and back afterwards.
    store_device (e.g. cpu): where X_i of all samples waits between blocks, so a large
    model calibrates with one block and one sample's activations on the accelerator.
    advance=False: on_block calls inputs.advance(block) itself (e.g. before quantizing, to
    feed the next block full-precision outputs as llm-awq does)."""
    device = device or compute_device(model)
    inputs = capture_block_inputs(model, spec, calib, device, store_device)
    blocks = spec.blocks(model)
    store = block_store()
    for i in tqdm(range(len(blocks)), desc=desc):
        block = blocks[i]
        store.onload(i, block, device)
        _check_finite_weights(block, i)
        on_block(i, block, inputs)
        if advance and i + 1 < len(blocks):
            inputs.advance(block)
        store.offload(i, block, changed=True)
    log.info("walked %d blocks on %s with %d calibration samples", len(blocks), device, len(inputs))


class _Replay(nn.Module):
    """Stands in for decoder block 0 in the head pass: returns the precomputed final hidden
    state of the current window instead of running block 0 on its input."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.hidden: Tensor | None = None
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        assert self.hidden is not None
        h = self.hidden.to(hidden_states.device, hidden_states.dtype)
        return (h,) if self.as_tuple else h


class _PassThrough(nn.Module):
    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def blockwise_logits(model: nn.Module, spec: ModelSpec, samples: Sequence[Tensor],
                     device: torch.device, desc: str = "blocks"
                     ) -> Iterable[tuple[int, Tensor]]:
    """(j, logits [1, T, V]) of each sample [1, T], computed block by block: every sample
    through block i, then block i+1, with one block's weights on `device` at a time and the
    hidden states [1, T, H] of all samples waiting on the CPU (the way the GPTQ reference
    scripts evaluated LLaMA-65B on one GPU). The head (final norm, lm_head, any logit
    post-processing of the family) runs through the model's own forward with the blocks
    replaced, so the logits equal model(ids).logits."""
    cpu = torch.device("cpu")
    inputs = capture_block_inputs(model, spec, samples, device, store_device=cpu)
    blocks = spec.blocks(model)
    store = block_store()
    for i in tqdm(range(len(blocks)), desc=f"{desc} (block-wise)", leave=False):
        block = blocks[i]
        store.onload(i, block, device)
        inputs.advance(block)
        store.offload(i, block, changed=False)
    replay = _Replay(inputs.tuple_output)
    stand_ins = [replay] + [_PassThrough(inputs.tuple_output) for _ in blocks[1:]]
    head = [get_module(model, spec.table.lm_head), *_non_block_modules(model, spec)]
    with _blocks_replaced(model, spec, stand_ins, head, device):
        for j, ids in enumerate(samples):
            replay.hidden = inputs.hidden[j]
            yield j, model(input_ids=ids.to(device), use_cache=False).logits

def _check_finite_weights(block: nn.Module, index: int) -> None:
    for name, p in block.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"non-finite weights in {name} (block {index})")


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]):
    """Call fn(name, X) with each module's input X [..., K] during forwards in the block."""
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0]))
               for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _InputsSeen(Exception):
    """Raised once every hooked module of the block has seen its input for this sample."""


@torch.no_grad()
def run_block_inputs_only(block: nn.Module, inputs: BlockInputs,
                          hooks: dict[str, Callable[[str, Tensor], None]]) -> None:
    """hooks[name](name, X) with the input X of each named submodule for every sample, the
    forward of each sample stopped once all of them have been called: what runs after the
    last hooked linear (the MLP's down_proj GEMM, the residual add) is not needed when the
    block's output is not. The same inputs reach the hooks as in a full forward."""
    seen: set[str] = set()

    def call(name: str, x: Tensor) -> None:
        hooks[name](name, x)
        seen.add(name)
        if len(seen) == len(hooks):
            raise _InputsSeen

    modules = {n: block.get_submodule(n) for n in hooks}
    with input_hooks(modules, call):
        for x, kw in inputs.samples():
            seen.clear()
            try:
                block(x, **kw)
            except _InputsSeen:
                pass


class StatsAccumulator:
    """Per-linear input statistics: per-channel max|X_j|, v = max|X|, optional percentiles
    of |X| (mean over samples of each sample's percentile; a cheap, stable estimate) and,
    for an estimator other than minmax, its static range from a fixed-size |X| histogram."""

    def __init__(self, percentiles: Sequence[float] = (),
                 estimator: RangeEstimator | None = None):
        self.percentiles = tuple(percentiles)
        self.estimator = estimator if estimator and estimator.needs_histogram else None
        self.channel_max: dict[str, Tensor] = {}
        self.n_tokens: dict[str, int] = {}
        self.pct_sum: dict[str, dict[str, float]] = {}
        self.n_batches: dict[str, int] = {}
        self.hist: dict[str, AbsHistogram] = {}

    def __call__(self, name: str, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.estimator:
            self.hist.setdefault(name, AbsHistogram()).add(x)
        cmax = x.abs().amax(dim=0)
        prev = self.channel_max.get(name)
        self.channel_max[name] = cmax if prev is None else torch.maximum(prev, cmax)
        self.n_tokens[name] = self.n_tokens.get(name, 0) + x.shape[0]
        self.n_batches[name] = self.n_batches.get(name, 0) + 1
        if self.percentiles:
            flat = x.abs().flatten()
            if flat.numel() > 1 << 22:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[: 1 << 22]]
            q = torch.quantile(flat, torch.tensor([p / 100 for p in self.percentiles],
                                                  device=flat.device))
            acc = self.pct_sum.setdefault(name, {})
            for p, v in zip(self.percentiles, q.tolist(), strict=True):
                acc[f"p{p:g}"] = acc.get(f"p{p:g}", 0.0) + v

    def result(self) -> dict[str, LinearStats]:
        out = {}
        for name, cmax in self.channel_max.items():
            pct = {k: v / self.n_batches[name] for k, v in self.pct_sum.get(name, {}).items()}
            est = self.estimator.estimate(self.hist[name]) if self.estimator else None
            out[name] = LinearStats(cmax.cpu(), float(cmax.max()), self.n_tokens[name], pct,
                                    est)
        return out


@torch.no_grad()
def collect_block_stats(block: nn.Module, inputs: BlockInputs, linear_names: Sequence[str],
                        percentiles: Sequence[float] = (),
                        estimator: RangeEstimator | None = None,
                        advance: bool = False) -> dict[str, LinearStats]:
    """Run the block on every sample with input hooks on the named linears. advance: the
    same forward's outputs become the next block's inputs (`BlockInputs.advance`), one
    block forward instead of two."""
    acc = StatsAccumulator(percentiles, estimator)
    modules = {n: block.get_submodule(n) for n in linear_names}
    index = inputs.block_index
    if advance:
        with input_hooks(modules, acc):
            inputs.advance(block)
    else:
        run_block_inputs_only(block, inputs, dict.fromkeys(modules, acc))
    stats = acc.result()
    for name, s in stats.items():
        if not torch.isfinite(s.channel_max).all():
            raise FloatingPointError(f"non-finite calibration statistics at {name} "
                                     f"(block {index})")
    return stats


@torch.no_grad()
def estimated_input_ranges(block: nn.Module, inputs: BlockInputs, linear_names: Sequence[str],
                           cfg) -> dict[str, float]:
    """{linear: static range of its input by cfg.range_estimator} as the block computes it
    now (after any folding), one extra pass over the calibration samples; {} for minmax,
    whose range the methods derive exactly from the statistics they already have."""
    estimator = cfg.range_estimator
    if not estimator.needs_histogram:
        return {}
    stats = collect_block_stats(block, inputs, linear_names, estimator=estimator)
    return {n: st.static_range for n, st in stats.items()}


@torch.no_grad()
def run_block_hooked(block: nn.Module, inputs: BlockInputs,
                     hooks: dict[str, Callable[[str, Tensor], None]],
                     keep_outputs: bool = False) -> list[Tensor]:
    """Run the block on every sample, calling hooks[name](name, X) with the input X of each
    named submodule; the block outputs are returned (on the store device) if asked."""
    if not keep_outputs:
        run_block_inputs_only(block, inputs, hooks)
        return []
    outs = []
    modules = {n: block.get_submodule(n) for n in hooks}
    with input_hooks(modules, lambda n, x: hooks[n](n, x)):
        for x, kw in inputs.samples():
            outs.append(_block_output(block(x, **kw)).to(inputs.store_device))
    return outs


def add_to_hessian(H: Tensor, n: int, X: Tensor) -> int:
    """H [K, K] fp32, the running mean 2/n sum_t x_t x_t^T over n tokens, updated in place
    with the tokens of X [.., K]; returns the new token count."""
    X = X.detach().reshape(-1, H.shape[0]).float().to(H.device)   # [t, K]
    t = X.shape[0]
    H.mul_(n / (n + t))
    n += t
    X = X * math.sqrt(2.0 / n)
    H.addmm_(X.T, X)
    return n


class HessianAccumulator:
    """`add_to_hessian` for each hooked linear's input, keyed by name; lifecycle: accumulate
    (call as a hook) -> pop(name) hands H and n over and frees them.

    shared: {linear: the linear whose input it reads} (`shared_input_sources`): only the
    source is hooked and its H is handed to each of them, one X^T X per distinct input
    (q/k/v, gate/up) instead of one per linear. The H handed out is the same tensor, so
    consumers must not modify it in place (GPTQSolver.solve works on a copy)."""

    def __init__(self, shared: dict[str, str] | None = None) -> None:
        self.H: dict[str, Tensor] = {}
        self.n: dict[str, int] = {}
        self.source = dict(shared or {})
        self._extra_pops = Counter(self.source.values())   # pops before H is freed

    def __call__(self, name: str, x: Tensor) -> None:
        if name not in self.H:
            K = x.shape[-1]
            self.H[name] = torch.zeros(K, K, dtype=torch.float32, device=x.device)
        self.n[name] = add_to_hessian(self.H[name], self.n.get(name, 0), x)

    def pop(self, name: str) -> tuple[Tensor, int]:
        key = self.source.get(name, name)
        if self._extra_pops[key]:          # another linear still needs this H
            self._extra_pops[key] -= 1
            return self.H[key], self.n[key]
        return self.H.pop(key), self.n.pop(key)


def shared_input_sources(groups: Sequence[LinearGroup], names: Sequence[str]) -> dict[str, str]:
    """{linear: the first of `names` in its LinearGroup} for every other linear of `names`
    whose group reads one input X (q/k/v, gate/up): their X^T X and max|X_j| are equal."""
    sources = {}
    for g in groups:
        members = [n for n in g.linears if n in names]
        sources.update({n: members[0] for n in members[1:]})
    return sources


def chain_hooks(*fns: Callable[[str, Tensor], None]) -> Callable[[str, Tensor], None]:
    def call(name: str, x: Tensor) -> None:
        for fn in fns:
            fn(name, x)
    return call


def stats_table(stats: dict[str, dict[str, LinearStats]]) -> list[dict[str, Any]]:
    """Flatten {full name: LinearStats} into JSON-able rows for the run record."""
    return [{"linear": name, "max_abs": s.tensor_max, "n_tokens": s.n_tokens,
             "channel_max_mean": float(s.channel_max.mean()),
             "channel_max_median": float(s.channel_max.median()), **s.percentiles,
             **({} if s.estimated_range is None else {"static_range": s.estimated_range})}
            for name, s in stats.items()]
