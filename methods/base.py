"""The common method adapter: a frozen config dataclass + a Method class registered for it.

    config = RTNConfig(w_bits=4, a_bits=8, group_size=64)   # validates itself
    method = methods.catalog.build(config)                  # registry lookup by type
    reason = method.check(spec)                             # None, or why it is skipped
    model = method.quantize(model, spec, calib)             # simulated (fake-quant)
    model = method.to_runtime(model, spec)                  # packed weights, real kernels

No method is chosen by comparing strings outside this registry.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import hashlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from torch import Tensor, nn

from methods.act_range import ACT_RANGES, RangeEstimator
from methods.arch import ModelSpec
from methods.kvcache import KV_BITS, KV_GRANULARITIES
from methods.primitives import GRIDS

ActMode = Literal["static_tensor", "dynamic_token"]
ACT_MODES = ("static_tensor", "dynamic_token")
WScales = Literal["group", "two_level"]
W_SCALES = ("group", "two_level")


class ConfigError(ValueError):
    """An invalid method configuration; the message says how to fix it."""


BIT_KEYS = ("w_bits", "a_bits", "group_size", "kv_bits")   # also settable as bits.<key>


@dataclass(frozen=True)
class QuantConfig:
    """Settings every method shares. group_size None or -1: per output channel."""

    w_bits: int = 16
    a_bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    act_mode: ActMode = "static_tensor"
    keep_fp: tuple[str, ...] = ()          # linear name patterns kept in full precision
    keep_w8: tuple[str, ...] = ()          # linear name patterns kept at w8 per-channel
    quantize_lm_head: bool = False
    # Static per-tensor activation range from calibration (methods/act_range.py):
    # minmax (max|X|) | percentile (act_percentile of |X|) | mse (clip minimising ||Q(X)-X||^2)
    act_range: str = "minmax"
    act_percentile: float = 99.99
    # Symmetric integer grid (methods/primitives.py grid_divisor): narrow s = max|x|/(2^(b-1)-1)
    # (2^b - 1 levels) | full s = max|x|/(2^(b-1)-1/2) (all 2^b levels, llm-compressor's).
    # a_grid sets static per-tensor scales; dynamic per-token ones stay narrow (the kernels').
    w_grid: str = "narrow"
    a_grid: str = "narrow"
    kv_bits: int | None = None             # None: fp KV cache; 8 | 4: fake-quant K (after RoPE), V
    kv_granularity: str = "per_token"      # per_token (dynamic) | per_head (calibrated, static)
    # W4A8 weight scales: fp16 per group, or two-level (per-channel fp16 x integer per-group
    # scales, QServe): the int8 GEMM then runs over all of K (methods.primitives.round_weight_two_level)
    w_scales: WScales = "group"

    def __post_init__(self) -> None:
        for key in BIT_KEYS:
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{key}={v!r} (bits.{key} / method.{key}) must be an integer"
                                  + ("; group_size: a positive multiple of 8, or -1 for "
                                     "per-channel" if key == "group_size" else ""))
        if self.group_size == 0:
            raise ConfigError("group_size=0 (bits.group_size / method.group_size) is not a group "
                              "size: use a positive multiple of 8, or -1 for per-channel")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        for key in ("keep_fp", "keep_w8"):
            object.__setattr__(self, key, name_patterns(key, getattr(self, key)))
        if self.w_bits not in (2, 3, 4, 8, 16):
            raise ConfigError(f"w_bits={self.w_bits} is not supported; use 2, 3, 4, 8 or 16")
        if self.a_bits not in (4, 8, 16):
            raise ConfigError(f"a_bits={self.a_bits} is not supported; use 4, 8 or 16")
        if self.group_size is not None and (self.group_size < 8 or self.group_size % 8):
            raise ConfigError(f"group_size={self.group_size} must be a positive multiple of 8, "
                              "or -1 for per-channel")
        if self.act_mode not in ACT_MODES:
            raise ConfigError(f"act_mode={self.act_mode!r}; use one of {ACT_MODES}")
        if self.act_range not in ACT_RANGES:
            raise ConfigError(f"act_range={self.act_range!r}; use one of {ACT_RANGES}")
        if not 50.0 < float(self.act_percentile) <= 100.0:
            raise ConfigError(f"act_percentile={self.act_percentile} must be in (50, 100] "
                              "(e.g. 99.99: the static range ignores the top 0.01% of |X|)")
        for key, grid in (("w_grid", self.w_grid), ("a_grid", self.a_grid)):
            if grid not in GRIDS:
                raise ConfigError(f"{key}={grid!r}; use one of {GRIDS}")
        if self.w_grid != "narrow" and not self.symmetric and self.quantizes_weights:
            raise ConfigError(f"w_grid={self.w_grid!r} applies to symmetric weights only; "
                              "set symmetric=true or w_grid=narrow")
        if self.kv_bits == 16:
            object.__setattr__(self, "kv_bits", None)
        if self.kv_bits not in (None, *KV_BITS):
            raise ConfigError(f"kv_bits={self.kv_bits} is not supported; use null (fp cache), "
                              f"{' or '.join(map(str, KV_BITS))}")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise ConfigError(f"kv_granularity={self.kv_granularity!r}; use one of "
                              f"{KV_GRANULARITIES}")
        self._check_w_scales()

    def _check_w_scales(self) -> None:
        if self.w_scales not in W_SCALES:
            raise ConfigError(f"w_scales={self.w_scales!r}; use one of {W_SCALES}")
        if self.w_scales == "two_level" and (self.w_bits, self.a_bits) != (4, 8):
            raise ConfigError(f"w_scales=two_level is a W4A8 weight format (int8 GEMM over K), "
                              f"got w{self.w_bits}a{self.a_bits}; use bits=w4a8 or w_scales=group")
        if self.w_scales == "two_level" and self.group_size is None:
            raise ConfigError("w_scales=two_level needs per-group scales (group_size=null/-1 "
                              "given); set bits.group_size, e.g. 128")

    @classmethod
    def upgrade_settings(cls, node: dict[str, Any]) -> dict[str, Any]:
        """A stored settings node (an older record's config.method) in this class's current
        field names; a class that renames or nests fields maps the old spellings here."""
        return node

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < 16

    @property
    def range_estimator(self) -> RangeEstimator:
        """How static per-tensor activation ranges are estimated from calibration data."""
        return RangeEstimator(self.act_range, float(self.act_percentile), self.a_bits,
                              self.a_grid)

    @property
    def quantizes_kv_cache(self) -> bool:
        return self.kv_bits is not None

    @property
    def bits_label(self) -> str:
        g = f"-g{self.group_size}" if self.group_size and self.w_bits < 16 else ""
        kv = f"kv{self.kv_bits}" if self.kv_bits else ""
        two_level = "-2l" if self.w_scales == "two_level" else ""
        return f"w{self.w_bits}a{self.a_bits}{kv}{g}{two_level}"

    def keeps(self, full_name: str) -> bool:
        """full_name (e.g. model.layers.3.mlp.down_proj) is kept in full precision."""
        return matches_any(full_name, self.keep_fp)

    def keeps_w8(self, full_name: str) -> bool:
        """full_name is kept at 8-bit per-channel weights (keep_fp wins over keep_w8)."""
        return matches_any(full_name, self.keep_w8) and not self.keeps(full_name)


def name_patterns(key: str, value: Any) -> tuple[str, ...]:
    """A list of linear-name patterns (one string is one pattern, never its characters)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"method.{key}={value!r} must be a list of linear name patterns, "
                          f"e.g. method.{key}=[mlp.down_proj] or '[model.layers.0.*]'")
    return tuple(value)


def unmatched_patterns(patterns: Sequence[str], names: Sequence[str]) -> list[str]:
    return [p for p in patterns if not any(matches_any(n, (p,)) for n in names)]


def matches_any(full_name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a linear's full name by fnmatch (`model.layers.1[0-5].*`,
    `*.down_proj`; `*` also crosses dots) or as a dotted suffix (`mlp.down_proj` matches
    `model.layers.3.mlp.down_proj`, never `model.layers.3.mlp.xdown_proj`)."""
    return any(fnmatch.fnmatchcase(full_name, p) or full_name.endswith("." + p)
               for p in patterns)


C = TypeVar("C", bound=QuantConfig)
Calib = Sequence[Tensor]      # token-id tensors, each [1, seqlen]


class Method(ABC, Generic[C]):
    name: ClassVar[str]
    # (w_bits, a_bits) pairs this method is defined for; None: any valid pair.
    supported_bits: ClassVar[frozenset[tuple[int, int]] | None] = None

    def __init__(self, config: C):
        self.config = config
        self.artifacts: dict[str, Any] = {}     # per-run results (stats, policy tables)
        # where a method may keep expensive inputs between runs (LLM-QAT's generated data);
        # the pipeline sets it to the run's cache dir, None: nothing is kept
        self.cache_dir: Path | None = None

    @property
    def needs_calibration(self) -> bool:
        return False

    def check_bits(self) -> str | None:
        """Why this method cannot run at its bit widths on any model, or None (no model needed:
        the pipeline asks before loading one)."""
        c = self.config
        if not (c.quantizes_weights or c.quantizes_activations) and self.name != "fp16":
            return f"{self.name} at w16a16 quantizes nothing: that is the fp16 baseline"
        if self.supported_bits is not None and (c.w_bits, c.a_bits) not in self.supported_bits:
            pairs = ", ".join(f"w{w}a{a}" for w, a in sorted(self.supported_bits, reverse=True))
            return f"{self.name} does not support w{c.w_bits}a{c.a_bits} (supported: {pairs})"
        return None

    def check(self, spec: ModelSpec) -> str | None:
        reason = self.check_bits()
        if reason:
            return reason
        c = self.config
        if c.quantizes_weights and c.group_size:
            bad = sorted({k for k in spec.in_features.values() if k % c.group_size})
            if bad:
                return (f"group_size {c.group_size} does not divide input size(s) {bad} of "
                        f"{spec.name}; use a divisor (e.g. bits.group_size=64) or -1")
        names = block_linear_names(spec)
        for key in ("keep_fp", "keep_w8"):
            missed = unmatched_patterns(getattr(c, key), names)
            if missed:
                return (f"method.{key} pattern(s) {missed} match no block linear of {spec.name} "
                        f"(full names look like {names[-1]}; a pattern matches by fnmatch or "
                        "as a dotted suffix): fix the pattern")
        if c.quantizes_kv_cache and not spec.table.kv_linears:
            return (f"kv_bits={c.kv_bits}: the {spec.table.family} family table names no K / V "
                    "projections (fused query_key_value), so the KV cache cannot be quantized")
        return None

    @abstractmethod
    def quantize(self, model: nn.Module, spec: ModelSpec, calib: Calib | None) -> nn.Module:
        """Simulated quantization, in place; returns the model."""

    @property
    def needs_kv_calibration(self) -> bool:
        """Static per-head KV scales are calibrated on the quantized model."""
        c = self.config
        return c.quantizes_kv_cache and c.kv_granularity == "per_head"

    def quantize_kv_cache(self, model: nn.Module, spec: ModelSpec,
                          calib: Calib | None) -> nn.Module:
        """The shared KV-cache setting, applied after `quantize` (and after a quantized-model
        cache hit: the KV quantizers are not part of the cached linears). No-op without
        kv_bits."""
        c = self.config
        if c.quantizes_kv_cache:
            from methods.kvcache import quantize_kv_cache
            self.artifacts["kv_cache"] = quantize_kv_cache(model, spec, c.kv_bits,
                                                           c.kv_granularity, calib)
        return model

    def to_runtime(self, model: nn.Module, spec: ModelSpec) -> nn.Module:
        if self.config.quantizes_kv_cache:
            raise ValueError(
                f"kv_bits={self.config.kv_bits}: the KV cache is quantized in simulation only "
                "(fake-quant inside the attention function); the runtime kernels keep an fp16 "
                "cache, so latency would not measure it. Use runtime=false, or "
                "method.kv_bits=null for the runtime path")
        from methods.runtime import convert_to_runtime
        return convert_to_runtime(model, spec, self.artifacts.setdefault("runtime", {}))

    # ------------------------------------------------------------ optional hooks (defaults)
    @property
    def cacheable(self) -> bool:
        """Whether the quantized-model cache may store this method's result: True when
        everything quantize() changed lives in the model's state dict and its block linears
        are nn.Linear / FakeQuantLinear (the cache rebuilds only those)."""
        return True

    def write_artifacts(self, run_dir: str | Path) -> dict[str, str]:
        """Write plots / tables of `self.artifacts` into run_dir after quantize (or a cache
        hit); returns {artifact name: path} for the record. Default: nothing."""
        return {}

    def quantize_only(self, model: nn.Module, spec: ModelSpec, calib: Calib | None,
                      linears: Collection[str]) -> nn.Module:
        """Quantize only the block linears named in `linears` (full names), the others kept
        in full precision, as this method would with the same config: the re-quantization
        of one group the sensitivity evaluator runs on a copy of the fp model. Default: a
        method of this class with every other block linear added to keep_fp."""
        wanted = set(linears)
        outside = tuple(n for n in block_linear_names(spec) if n not in wanted)
        method = type(self)(dataclasses.replace(
            self.config, keep_fp=(*self.config.keep_fp, *outside)))
        return method.quantize(model, spec, calib if method.needs_calibration else None)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": type(self).__qualname__,
                **dataclasses.asdict(self.config)}

    # True when quantize rewrites the model outside its block linears (e.g. rotates the
    # residual stream): per-linear comparisons with the fp model are then in other bases.
    rewrites_model: ClassVar[bool] = False

    # Modules imported by a computed name (importlib), which the import scan of `code_files`
    # cannot see, whose code still shapes this method's quantized model.
    extra_code_modules: ClassVar[tuple[str, ...]] = ()

    def code_files(self) -> list[Path]:
        """Source files that determine this method's quantized model: the modules of the
        method class and its config, every `methods.*` module they import (at any depth,
        imports inside functions included) and `extra_code_modules`."""
        roots = {type(self).__module__, type(self.config).__module__, *self.extra_code_modules}
        return source_closure(roots)

    def code_version(self) -> str:
        """sha256 (16 hex) over `code_files`: any edit to them changes it (cache keys)."""
        h = hashlib.sha256()
        for path in self.code_files():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()[:16]


def block_linear_names(spec: ModelSpec) -> list[str]:
    """Full names of every quantizable block linear, block by block in table order."""
    return [f"{spec.table.blocks}.{i}.{rel}" for i in range(spec.num_layers)
            for rel in spec.table.linear_names()]


CODE_PACKAGES = ("methods",)


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):       # e.g. methods.gptq.GPTQSolver: not a module
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


def _imports(path: Path) -> set[str]:
    """Dotted module names (and `from m import x` -> m.x candidates) imported in `path`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in CODE_PACKAGES}


def source_closure(modules: Iterable[str]) -> list[Path]:
    """Files of `modules` and of every CODE_PACKAGES module they import, transitively."""
    todo, seen = list(modules), set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None or path in files:
            continue
        files.add(path)
        todo.extend(_imports(path))
    return sorted(files)


_REGISTRY: dict[type[QuantConfig], type[Method]] = {}


def register(config_type: type[QuantConfig]):
    """Class decorator: `config_type` (and its subclasses) build this Method."""
    def deco(cls: type[Method]) -> type[Method]:
        if config_type in _REGISTRY:
            raise RuntimeError(f"{config_type.__name__} already registered to "
                               f"{_REGISTRY[config_type].__name__}")
        _REGISTRY[config_type] = cls
        return cls
    return deco


def config_class(target: Any) -> type[QuantConfig]:
    """The QuantConfig dataclass that a method config's `_target_` names.

    Only dataclasses defined in the `methods` package qualify: a config value (or a record
    read back by the report) never names other code to import or call (`os.system`)."""
    module, _, name = str(target).rpartition(".")
    parts = module.split(".")
    if parts[0] != "methods" or not all(p.isidentifier() for p in [*parts, name]):
        raise ConfigError(f"method._target_={target!r}: must name a config class of the "
                          "methods package (e.g. methods.rtn.RTNConfig); other code is never "
                          "imported or called")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as e:
        raise ConfigError(f"method._target_={target!r}: module {module} not found") from e
    if not (isinstance(cls, type) and issubclass(cls, QuantConfig)
            and dataclasses.is_dataclass(cls) and cls.__module__.startswith("methods")):
        raise ConfigError(f"method._target_={target!r} is not a QuantConfig dataclass of the "
                          "methods package")
    return cls


def make_config(node: dict[str, Any]) -> QuantConfig:
    """A method config node ({_target_, field: value}) -> its validated QuantConfig,
    without Hydra's instantiate (which calls whatever `_target_`, `_args_` or a nested
    `_target_` names)."""
    cls = config_class(node.get("_target_"))
    special = sorted(k for k in node if str(k).startswith("_") and k != "_target_")
    if special:
        raise ConfigError(f"method.{special[0]}: Hydra instantiation keys are not accepted in "
                          "a method config; give the config's fields only")
    _reject_nested_targets(node, "method")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - fields - {"_target_"})
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not a setting of {cls.__name__}; its "
                          f"settings: {', '.join(sorted(fields))}")
    values = {k: v for k, v in node.items() if k != "_target_"}
    check_field_types(cls, values)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    """(value fits the annotation, what the annotation allows); unknown kinds pass."""
    import types
    import typing
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if typing.get_origin(hint) is typing.Literal:
        args = typing.get_args(hint)
        return value in args, "one of " + ", ".join(map(str, args))
    if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
        if value is None:
            return True, ""
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        ok, what = _type_ok(value, inner[0]) if len(inner) == 1 else (True, "")
        return ok, f"{what} or null"
    return True, ""


def check_field_types(cls: type, values: dict[str, Any]) -> None:
    """ConfigError naming `method.<key>` for a value of the wrong type (`method.damp=abc`
    raised a bare TypeError from a comparison in __post_init__, without the key)."""
    import typing
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in BIT_KEYS:          # __post_init__ names both keys (bits.* / method.*)
            continue
        ok, what = _type_ok(value, hints.get(key))
        if not ok:
            raise ConfigError(f"method.{key}={value!r} ({cls.__name__}) must be {what}; "
                              f"e.g. method.{key}={_example(cls, key)}")


def _example(cls: type, key: str) -> Any:
    default = next((f.default for f in dataclasses.fields(cls) if f.name == key), None)
    return "null" if default is None else str(default).lower() if isinstance(default, bool) \
        else default


def _reject_nested_targets(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "_target_" or where != "method":
                if str(k) in ("_target_", "_args_", "_partial_", "_recursive_", "_convert_"):
                    raise ConfigError(f"{where}.{k}: nested instantiation is not accepted")
                _reject_nested_targets(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_nested_targets(v, f"{where}[{i}]")


def method_for(config_type: type[QuantConfig]) -> type[Method] | None:
    """The Method registered for config_type or its nearest registered base class."""
    for klass in config_type.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


def registered_methods() -> list[type[Method]]:
    return list(_REGISTRY.values())


def registered_configs() -> list[type[QuantConfig]]:
    return list(_REGISTRY)


@dataclass
class LinearStats:
    """Calibration statistics of one linear's input X [tokens, K]."""
    channel_max: Tensor            # [K] max |X_j|
    tensor_max: float              # v = max |X|
    n_tokens: int = 0
    percentiles: dict[str, float] = field(default_factory=dict)
    estimated_range: float | None = None   # by a RangeEstimator other than minmax

    @property
    def static_range(self) -> float:
        """The range a static per-tensor activation scale is computed from."""
        return self.tensor_max if self.estimated_range is None else self.estimated_range
