"""Local lm-eval task definitions that read the ptqbench data directory.

The YAMLs beside this module follow lm-eval 0.4.13's standard task YAMLs (prompts, targets,
metrics); only `dataset_path` differs. The local files do not all share the hub datasets'
schema, so each task has a `prepare_*` function that rewrites the raw local file(s) into
the hub schema as jsonl in a scratch directory, and the YAML gets `data_files` pointing
there. This keeps the YAMLs identical in substance to lm-eval's and pins every input: the
sha256 of each prepared file goes into provenance.

Differences forced by the local formats (also in README.md):
- hellaswag: the local file holds already-preprocessed text (no ctx_a/ctx_b split), so
  lm-eval's `ctx_b.capitalize()` is approximated; see `prepare_hellaswag`.
- winogrande: the local file is the partial-scoring form; lm-eval builds exactly that form
  from sentence/option1/option2, so prompts are the same; the doc schema differs.
- piqa: labels come from the separate official labels file.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.inputs.data import require_file

TASK_DIR = Path(__file__).resolve().parent
COMMONSENSE_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande",
                     "lambada_openai", "commonsense_qa")
MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")
ALL_TASKS = (*COMMONSENSE_TASKS, "mmlu")
# What each task's converter reads under the data directory (a directory: every file in it);
# harness.run.data_identity fingerprints these into the job's identity.
TASK_SOURCES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "boolq": ("boolq/val.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/dev.mosaicml_partial.jsonl",),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "commonsense_qa": ("commonsense_qa/validation.hf_format.jsonl",),
    "mmlu": ("mmlu",),
}


@dataclass
class PreparedTask:
    """A task ready for lm-eval: a directory of YAMLs to index, plus provenance."""
    name: str
    include_dir: Path
    config_sha256: str                      # of the task config(s) without data paths
    data_sha256: dict[str, str] = field(default_factory=dict)   # prepared file -> sha256


# ---------------------------------------------------------------- converters
# Each converter reads raw local files and yields rows in the hub dataset's schema.

def _jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def piqa_rows(data_dir: Path) -> Iterable[dict]:
    docs = require_file(data_dir, "piqa/valid.jsonl", "piqa")
    labels_path = require_file(data_dir, "piqa/valid-labels.lst", "piqa labels")
    labels = [int(x) for x in labels_path.read_text().split()]
    rows = list(_jsonl(docs))
    if len(rows) != len(labels):
        raise ValueError(f"piqa: {len(rows)} docs in {docs} but {len(labels)} labels in "
                         f"{labels_path}")
    for row, label in zip(rows, labels, strict=True):
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": label}


def _arc_rows(path: Path) -> Iterable[dict]:
    # AI2 release nests choices under question; the hub schema flattens them.
    for row in _jsonl(path):
        choices = row["question"]["choices"]
        yield {"id": row["id"], "question": row["question"]["stem"],
               "choices": {"text": [c["text"] for c in choices],
                           "label": [c["label"] for c in choices]},
               "answerKey": row["answerKey"]}


def arc_easy_rows(data_dir: Path) -> Iterable[dict]:
    return _arc_rows(require_file(data_dir, "arc/ARC-Easy-Test.jsonl", "arc_easy"))


def arc_challenge_rows(data_dir: Path) -> Iterable[dict]:
    return _arc_rows(require_file(data_dir, "arc/ARC-Challenge-Test.jsonl", "arc_challenge"))


def boolq_rows(data_dir: Path) -> Iterable[dict]:
    # SuperGLUE jsonl stores the label as "true"/"false"; the hub schema uses 1/0.
    for row in _jsonl(require_file(data_dir, "boolq/val.jsonl", "boolq")):
        label = row["label"]
        if isinstance(label, str):
            label = {"true": 1, "false": 0}[label.lower()]
        yield {"question": row["question"], "passage": row["passage"], "idx": row["idx"],
               "label": int(label)}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag text cleanup (same rules, own code): WikiHow bracket artefacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


_LAST_FRAGMENT = re.compile(r"(?:[.!?]|:) ([a-z])(?=[^.!?]*$)")


def capitalise_last_fragment(query: str) -> str:
    """Approximate lm-eval's `ctx_b.capitalize()` on text where ctx_a/ctx_b are already joined.

    In HellaSwag ctx_b is the unfinished last fragment (e.g. "he", "the lady"); lm-eval
    upper-cases its first letter. Here we upper-case a lowercase letter that starts the
    text after the last sentence end. Unlike str.capitalize() the rest of the fragment is
    not lower-cased (that information is gone), so rare mixed-case fragments still differ.
    """
    matches = list(_LAST_FRAGMENT.finditer(query))
    if not matches:
        return query
    i = matches[-1].start(1)
    return query[:i] + query[i].upper() + query[i + 1:]


def hellaswag_rows(data_dir: Path) -> Iterable[dict]:
    path = require_file(data_dir, "hellaswag/hellaswag_val_full.txt.bz2", "hellaswag")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # 6 lines per item: "activity_label: ctx", gold label, 4 endings.
    for i in range(0, len(lines) - 5, 6):
        query, label, *endings = lines[i:i + 6]
        yield {"query": hellaswag_preprocess(capitalise_last_fragment(query)),
               "choices": [hellaswag_preprocess(e) for e in endings],
               "label": int(label)}


def winogrande_rows(data_dir: Path) -> Iterable[dict]:
    path = require_file(data_dir, "winogrande/dev.mosaicml_partial.jsonl", "winogrande")
    for row in _jsonl(path):
        # lm-eval: context = sentence[:idx] + option, target = sentence[idx+1:].strip()
        yield {"context_options": list(row["context_options"]),
               "continuation": row["continuation"].strip(), "gold": int(row["gold"])}


def lambada_openai_rows(data_dir: Path) -> Iterable[dict]:
    for row in _jsonl(require_file(data_dir, "lambada/lambada_test.jsonl", "lambada_openai")):
        yield {"text": row["text"]}


def commonsense_qa_rows(data_dir: Path) -> Iterable[dict]:
    path = require_file(data_dir, "commonsense_qa/validation.hf_format.jsonl", "commonsense_qa")
    yield from _jsonl(path)


def mmlu_rows(data_dir: Path, subject: str, split: str) -> Iterable[dict]:
    path = require_file(data_dir, f"mmlu/{split}/{subject}_{split}.csv", f"mmlu {subject}")
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield {"question": row["question"], "subject": subject,
                   "choices": [row[f"choice{i}"] for i in range(4)],
                   "answer": int(row["answer"])}


# task -> (split name in the YAML, converter)
SINGLE_FILE_TASKS: dict[str, tuple[str, Callable[[Path], Iterable[dict]]]] = {
    "piqa": ("validation", piqa_rows),
    "arc_easy": ("test", arc_easy_rows),
    "arc_challenge": ("test", arc_challenge_rows),
    "boolq": ("validation", boolq_rows),
    "hellaswag": ("validation", hellaswag_rows),
    "winogrande": ("validation", winogrande_rows),
    "lambada_openai": ("test", lambada_openai_rows),
    "commonsense_qa": ("validation", commonsense_qa_rows),
}


# ---------------------------------------------------------------- MMLU mapping

def lm_eval_mmlu_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks" / "mmlu" / "default"


def mmlu_subjects() -> dict[str, dict[str, str]]:
    """subject -> {category, description}, read from lm-eval's own MMLU subject YAMLs.

    Reading them (rather than keeping a copy) guarantees the standard subject->category
    mapping and the exact per-subject description lm-eval uses.
    """
    out = {}
    for path in sorted(lm_eval_mmlu_dir().glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        category = cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")
        out[cfg["dataset_name"]] = {"category": category, "description": cfg["description"]}
    if len(out) != 57 or set(c["category"] for c in out.values()) != set(MMLU_CATEGORIES):
        raise RuntimeError(f"unexpected MMLU layout in {lm_eval_mmlu_dir()}: {len(out)} subjects")
    return out


# ---------------------------------------------------------------- preparation

def _load_template(name: str) -> dict:
    return yaml.safe_load((TASK_DIR / name).read_text())


def _config_hash(configs: Iterable[dict]) -> str:
    """sha256 over the task configs as lm-eval sees them, minus the machine-specific paths."""
    blob = json.dumps(list(configs), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_jsonl(rows: Iterable[dict], path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            h.update(line.encode())
    return h.hexdigest()


def _with_data(cfg: dict, data_files: dict[str, Path], cache_dir: Path) -> dict:
    # A private datasets cache keeps scratch copies out of ~/.cache and dies with the run.
    return {**cfg, "dataset_kwargs": {"data_files": {k: str(v) for k, v in data_files.items()},
                                      "cache_dir": str(cache_dir)}}


def _dump(cfg: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def prepare_task(name: str, data_dir: Path | None, work_dir: Path) -> PreparedTask:
    """Convert the local data for `name` and write its lm-eval YAML(s) under work_dir/name.

    Raises harness.inputs.data.DataMissingError (naming the file) when an input is missing.
    """
    if name == "mmlu":
        return _prepare_mmlu(data_dir, work_dir)
    if name not in SINGLE_FILE_TASKS:
        raise ValueError(f"unknown local task {name!r}; available: {list(ALL_TASKS)}")
    split, rows = SINGLE_FILE_TASKS[name]
    out = work_dir / name
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / f"{name}.{split}.jsonl"
    digest = _write_jsonl(rows(data_dir), data_path)
    cfg = _load_template(f"{name}.yaml")
    _dump(_with_data(cfg, {split: data_path}, work_dir / "hf_cache"), out / f"{name}.yaml")
    return PreparedTask(name, out, _config_hash([cfg]), {data_path.name: digest})


def _prepare_mmlu(data_dir: Path | None, work_dir: Path) -> PreparedTask:
    out = work_dir / "mmlu"
    out.mkdir(parents=True, exist_ok=True)
    template = _load_template("mmlu_subject.yaml")
    configs, digests = [], {}
    for subject, info in mmlu_subjects().items():
        files = {}
        for split in ("test", "dev"):
            path = out / f"{subject}.{split}.jsonl"
            digests[path.name] = _write_jsonl(mmlu_rows(data_dir, subject, split), path)
            files[split] = path
        cfg = {**template, "task": f"mmlu_{subject}", "task_alias": subject,
               "tag": f"mmlu_{info['category']}_tasks", "description": info["description"]}
        configs.append(cfg)
        _dump(_with_data(cfg, files, work_dir / "hf_cache"), out / f"mmlu_{subject}.yaml")
    category_template = _load_template("mmlu_category.yaml")
    for category in MMLU_CATEGORIES:
        cfg = {"group": f"mmlu_{category}", "group_alias": category,
               "task": [f"mmlu_{category}_tasks"], **category_template}
        configs.append(cfg)
        _dump(cfg, out / f"_mmlu_{category}.yaml")
    top = _load_template("mmlu.yaml")
    configs.append(top)
    _dump(top, out / "_mmlu.yaml")
    # One digest over all 114 prepared files keeps provenance readable.
    combined = hashlib.sha256("".join(f"{k} {digests[k]}\n" for k in sorted(digests)).encode())
    return PreparedTask("mmlu", out, _config_hash(configs),
                        {f"mmlu/*.jsonl ({len(digests)} files)": combined.hexdigest()})
