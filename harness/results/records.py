"""Run records -> the store DataFrame that tables and plots read: the latest record per
config hash, filters, and the config fields tables match on (evaluators, group size, windows,
calibration, method variants, FPTQ policy rows)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from harness.evals import metric_info

ID_COLS = ("model", "method", "bits", "eval")
# One table row per combination (tables add their own: calibration, docs per task, batch).
ROW_KEYS = ("model", "method", "variant", "bits")
BASELINE_METHOD = "fp16"
# A bits label like w4a8 -> (4, 8); papers order columns from wide to narrow.
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


def bits_key(bits: str) -> tuple[int, int, str]:
    m = _BITS_RE.match(str(bits))
    return (-int(m.group(1)), -int(m.group(2)), "") if m else (0, 0, str(bits))


def method_key(method: str) -> tuple[int, str]:
    return (0 if method == BASELINE_METHOD else 1, str(method))


def table_metrics(df: pd.DataFrame, table: str) -> list[str]:
    """Metric columns of `df` that their evaluator places in report `table`
    (harness.evals.MetricInfo.table) and that hold a value, in the table's column order."""
    found = [c for c in df.columns if isinstance(c, str) and (info := metric_info(c)) is not None
             and info.table == table and df[c].notna().any()]
    return sorted(found, key=lambda c: (metric_info(c).order, c))


def method_label(method: Any, variant: Any) -> str:
    """What tables and plots print: "fptq (v0=5.0)"; the bare method for its common setting."""
    return f"{method} ({variant})" if isinstance(variant, str) and variant else str(method)


def with_method_label(df: pd.DataFrame) -> pd.DataFrame:
    """`df` plus a `method_label` column from `method` and (when present) `variant`."""
    if df.empty:
        return df.assign(method_label=pd.Series(dtype=object))
    variants = df["variant"] if "variant" in df.columns else [""] * len(df)
    return df.assign(method_label=[method_label(m, v)
                                   for m, v in zip(df["method"], variants, strict=True)])


def latest_per_config(df: pd.DataFrame) -> pd.DataFrame:
    """The newest record per config hash (older ones stay in the store)."""
    if df.empty:
        return df
    return df.sort_values("finished_at", kind="stable").groupby("config_hash").tail(1)


def superseded(df: pd.DataFrame) -> pd.DataFrame:
    """Records a newer record with the same config hash replaces, with the replacing run id."""
    if df.empty:
        return df
    df = df.sort_values("finished_at", kind="stable")
    latest = df.groupby("config_hash")["run_id"].transform("last")
    old = df[df["run_id"] != latest].copy()
    old["superseded_by"] = latest[old.index]
    return old


def filter_runs(df: pd.DataFrame, model: Sequence[str] | None = None,
                method: Sequence[str] | None = None, bits: Sequence[str] | None = None,
                eval: Sequence[str] | None = None, sweep: Sequence[str] | None = None,
                since: str | pd.Timestamp | None = None,
                until: str | pd.Timestamp | None = None) -> pd.DataFrame:
    """Keep records matching every given filter; since/until bound finished_at (UTC)."""
    if df.empty:
        return df
    for col, keep in (("model", model), ("method", method), ("bits", bits), ("eval", eval),
                      ("sweep", sweep)):
        if keep:
            hit = df[col].astype(str).isin(list(keep))
            if col == "method":   # "fptq" selects all its variants, "fptq (v0=5.0)" one
                hit |= with_method_label(df)["method_label"].isin(list(keep))
            df = df[hit]
    for bound, op in ((since, "ge"), (until, "le")):
        if bound is not None:
            ts = pd.Timestamp(bound)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            df = df[getattr(df["finished_at"], op)(ts)]
    return df


def records_frame(store) -> pd.DataFrame:
    """`store.load()` plus the config fields tables match on: evaluators, group size, eval
    seqlen and window cap, calibration, the method variant (method_variants), the FPTQ
    policy rows and the export report (export=...) from the artifacts."""
    df = store.load()
    if df.empty:
        return df
    extra = {}
    for r in store.records():
        cfg = r.get("config") or {}
        ev, meth, calib = cfg.get("eval") or {}, cfg.get("method") or {}, cfg.get("calib") or {}
        gs = meth.get("group_size", (cfg.get("bits") or {}).get("group_size"))
        extra[r["run_id"]] = {
            "evaluators": tuple(ev.get("evaluators") or ()),
            "tasks": tuple([ev["tasks"]] if isinstance(ev.get("tasks"), str)
                           else ev.get("tasks") or ()),
            "group_size": None if gs in (None, -1, 0) else int(gs),
            "seqlen": ev.get("seqlen"),
            "max_windows": ev.get("max_windows"),
            "docs_per_task": "all" if ev.get("limit") in (None, 0) else str(ev.get("limit")),
            "calib": calib_label(calib),
            "method_cfg": meth,
            "fptq_policy": policy_rows((r.get("artifacts") or {}).get("fptq_policy")),
            "export": (r.get("artifacts") or {}).get("export"),
            "settings": record_settings(r),
            "eval_errors": (r.get("provenance") or {}).get("eval_errors"),
        }
    cols = pd.DataFrame.from_dict(extra, orient="index")
    df = df.join(cols, on="run_id")
    df["variant"] = method_variants(df)
    return df


# Flattened config keys that name or select what a record measures, not how it is measured:
# they never split a table row (the metrics themselves say which dataset / task ran).
LABEL_KEYS = frozenset({"model.name", "method.name", "bits.name", "eval.name", "eval.evaluators",
                        "eval.datasets", "eval.tasks", "eval.needs_reference_model",
                        "eval.allow_hub", "calib_allow_hub", "runtime_note"})


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def record_settings(r: dict[str, Any]) -> dict[str, str]:
    """Every setting of a record that can change one of its numbers, flattened to
    {"eval.seqlen": "2048", "data.c4/...": "<digest>", ...} (values as JSON text). Method
    hyper-parameters are left to `method_variants` (they label the method) except the group
    size; calibration settings count only for records that calibrated."""
    from harness.results.store import identity_config
    cfg = r.get("config") if isinstance(r.get("config"), dict) else {}
    flat = flatten(identity_config(cfg))
    prov = r.get("provenance") if isinstance(r.get("provenance"), dict) else {}
    calibrated = "calibration" in prov or (r.get("status") != "ok"
                                           and r.get("method") != BASELINE_METHOD)
    out = {}
    for k, v in flat.items():
        if (k in LABEL_KEYS or k.startswith("bits.")
                or (k.startswith("method.") and k != "method.group_size")
                or (k.startswith("calib.") and not calibrated)
                or k.startswith("data.")):
            continue
        if k == "method.group_size" and v in (None, 0):
            v = -1
        out[k] = json.dumps(numeric(v), sort_keys=True, default=str)
    fp = prov.get("data_fingerprint")
    if isinstance(fp, dict):
        out.update({f"data:{src}": str(d) for src, d in fp.items()})
    return out


def conflicts(a: dict[str, str], b: dict[str, str], ignore: tuple[str, ...] = ()) -> list[str]:
    """Settings both records have with different values (keys starting with `ignore` skipped)."""
    return sorted(k for k in a.keys() & b.keys()
                  if a[k] != b[k] and not k.startswith(ignore))


def setting_clusters(settings: Sequence[dict[str, str]]) -> tuple[list[int], list[str]]:
    """Split records (newest first) into groups whose shared settings agree; per record its
    group index, per group a label of the settings that tell the groups apart ("" when
    there is one group)."""
    groups: list[list[int]] = []
    of = [0] * len(settings)
    for i, s in enumerate(settings):
        for g, members in enumerate(groups):
            if not any(conflicts(s, settings[j]) for j in members):
                members.append(i)
                of[i] = g
                break
        else:
            of[i] = len(groups)
            groups.append([i])
    if len(groups) < 2:
        return of, [""] * len(groups)
    merged = [{k: v for j in m for k, v in settings[j].items()} for m in groups]
    differ = sorted({k for x in merged for y in merged for k in conflicts(x, y)})
    labels = [", ".join(f"{_short_key(k)}={_short_value(m[k])}" for k in differ if k in m)
              for m in merged]
    return of, labels


def _short_key(k: str) -> str:
    return k.removeprefix("data:")


def _short_value(v: str) -> str:
    try:
        x = json.loads(v)
    except ValueError:
        return v[:8]      # a data digest
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def calib_label(calib: dict) -> str | None:
    """"c4-128x2048"; a seed other than the default 0 is appended ("c4-32x512-seed1") so
    runs on different calibration draws are never paired or merged as the same setting."""
    if not calib:
        return None
    label = f"{calib.get('dataset')}-{calib.get('n_samples')}x{calib.get('seqlen')}"
    seed = calib.get("seed", 0)
    return label if seed in (0, None) else f"{label}-seed{seed}"


def policy_rows(policy: Any) -> list[dict] | None:
    """FPTQ's policy artifact: {"rows": [...], "counts": ...} (or a bare row list)."""
    if isinstance(policy, dict):
        policy = policy.get("rows")
    return policy if isinstance(policy, list) else None


_BITS_KEYS = {"w_bits", "a_bits", "group_size", "name", "_target_"}


def numeric(v: Any) -> Any:
    """15 and 15.0 are the same setting (CLI overrides give ints, YAML floats)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _config_fields(target: Any) -> dict[str, Any] | None:
    # imported here: methods.catalog pulls in torch, which tables of plain records never need
    from methods.catalog import config_field_defaults
    return config_field_defaults(target) if target else None


def with_defaults(cfg: dict) -> dict:
    """A record made before an option existed ran with its default: fill the missing
    fields from the config dataclass named by `_target_` (when it still imports), after
    renaming the fields the class has renamed since (methods.catalog.upgrade_settings)."""
    from methods.catalog import upgrade_settings
    cfg = upgrade_settings(cfg) if cfg.get("_target_") else cfg
    fields = _config_fields(cfg.get("_target_"))
    if not fields:
        return cfg
    return {**{k: v for k, v in fields.items() if v is not dataclasses.MISSING}, **cfg}


@functools.cache
def _yaml_overrides(method: str) -> dict[str, Any]:
    """The plain values conf/method/<method>.yaml sets over its config class's defaults
    (interpolations such as ${bits.w_bits} are left out: the bits group fills those)."""
    from omegaconf import OmegaConf

    from harness.run.overrides import CONF_DIR
    path = CONF_DIR / "method" / f"{method}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(method)) or not path.is_file():
        return {}
    node = OmegaConf.load(path)
    plain = OmegaConf.to_container(node)
    return {k: plain[k] for k in plain if k not in ("defaults", "_target_", "name")
            and not OmegaConf.is_interpolation(node, k)}


def shipped_settings(method: Any, target: Any) -> dict[str, Any]:
    """What `method=<method>` runs: its config class's defaults under its YAML's overrides
    (the bits group's interpolated fields left out)."""
    fields = {k: v for k, v in (_config_fields(target) or {}).items()
              if v is not dataclasses.MISSING}
    return {**fields, **_yaml_overrides(str(method))}


def _default_of(method: Any, target: Any, key: str) -> str | None:
    """json text of the value `method=<method>` ships for `key` (None: unknown)."""
    shipped = shipped_settings(method, target)
    return (json.dumps(numeric(shipped[key]), sort_keys=True, default=str)
            if key in shipped else None)


def method_variants(df: pd.DataFrame) -> list[str]:
    """Per row, the method hyper-parameters that differ from the method's shipped setting
    (what `method=<name>` runs: its YAML over its config class's defaults) when some record
    has it, else from the most common value among the records of the same method (e.g.
    "act_mode=dynamic_token"), so ablation runs of one method get distinct labels and the
    bare method name is what the method ships. A record without the key (made before the
    option existed) counts with the config class's default, or, when that class no longer
    imports, is not labelled by it."""
    out = [""] * len(df)
    cfgs = [with_defaults(c) if isinstance(c, dict) else {} for c in df["method_cfg"]]
    for method in set(df["method"]):
        idx = [i for i, m in enumerate(df["method"]) if m == method]
        keys = sorted({k for i in idx for k in cfgs[i]} - _BITS_KEYS)
        for k in keys:
            have = [i for i in idx if k in cfgs[i]]
            vals = [json.dumps(numeric(cfgs[i][k]), sort_keys=True, default=str)
                    for i in have]
            if len(set(vals)) < 2:
                continue
            default = _default_of(method, cfgs[have[0]].get("_target_"), k)
            common = default if default in vals else max(sorted(set(vals)), key=vals.count)
            for i, v in zip(have, vals, strict=True):
                if v != common:
                    out[i] = ", ".join(filter(None, [out[i], f"{k}={json.loads(v)}"]))
    return out


# ---------------------------------------------------------------------------------------
# table model
