"""lm-eval evaluator: local tasks load and score, scoring direction, missing data, naming.

Real-data tests read the data directory (PTQBENCH_DATA_DIR or ../shared/data) and skip
when it is absent. The direction test uses a hand-built model whose preference is known.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Before lm_eval/datasets import: nothing here may touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.evals import EvalContext, EvalResult, get_evaluator, metric_info  # noqa: E402
from harness.evals.lm_eval import Options, evaluate  # noqa: E402
from harness.evals.tasks import (  # noqa: E402
    COMMONSENSE_TASKS,
    capitalise_last_fragment,
    mmlu_subjects,
    prepare_task,
)
from harness.inputs.data import DataMissingError, resolve_data_dir  # noqa: E402
from harness.inputs.models import tiny_llama, tiny_tokenizer  # noqa: E402

DATA_DIR = resolve_data_dir()
needs_data = pytest.mark.skipif(
    DATA_DIR is None, reason="data directory not found: set PTQBENCH_DATA_DIR=/path/to/data")

# metric names each task must produce (acc_norm only where lm-eval's YAML defines it)
EXPECTED = {
    "piqa": ["acc_piqa", "acc_norm_piqa"],
    "arc_easy": ["acc_arc_easy", "acc_norm_arc_easy"],
    "arc_challenge": ["acc_arc_challenge", "acc_norm_arc_challenge"],
    "boolq": ["acc_boolq"],
    "hellaswag": ["acc_hellaswag", "acc_norm_hellaswag"],
    "winogrande": ["acc_winogrande"],
    "lambada_openai": ["acc_lambada_openai", "ppl_lambada_openai"],
    "commonsense_qa": ["acc_commonsense_qa"],
}


def make_ctx(model, tokenizer, data_dir, run_dir) -> EvalContext:
    return EvalContext(model=model, tokenizer=tokenizer, spec=None, data_dir=data_dir,
                       run_dir=run_dir, device=torch.device("cpu"))


def run(ctx: EvalContext, tasks, **kw) -> EvalResult:
    cfg = {"tasks": list(tasks), "num_fewshot": None, "limit": 3, "batch_size": 8,
           "fewshot_seed": 1234, "source": "local", **kw}
    return evaluate(ctx, cfg)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0), tiny_tokenizer()


# ---------------------------------------------------------------- real data, tiny model

@needs_data
def test_commonsense_tasks_load_and_score(tiny, tmp_path):
    model, tok = tiny
    res = run(make_ctx(model, tok, DATA_DIR, tmp_path), COMMONSENSE_TASKS)
    assert not {t for t in COMMONSENSE_TASKS if t in res.errors}, res.errors
    for task, names in EXPECTED.items():
        for name in names:
            assert 0.0 <= res.metrics[name] <= 1.0 or name.startswith("ppl"), name
        assert res.provenance["tasks"][task]["n_docs"] == 3
        assert len(res.provenance["tasks"][task]["config_sha256"]) == 64
    assert res.metrics["ppl_lambada_openai"] > 1.0
    # commonsense_avg is the plain mean of the per-task acc values that ran
    accs = [res.metrics[f"acc_{t}"] for t in COMMONSENSE_TASKS]
    assert res.metrics["acc_commonsense_avg"] == pytest.approx(sum(accs) / len(accs))
    assert res.provenance["lm_eval_version"] == "0.4.13"
    assert res.provenance["num_fewshot"]["piqa"] == 0
    assert Path(res.artifacts["lm_eval_raw"]).is_file()
    assert all(math.isfinite(v) for v in res.metrics.values())
    for name in res.metrics:      # every metric (stderrs aside) is described by lm_eval
        info = metric_info(name)
        assert info is not None or name.endswith("_stderr"), name
        assert info is None or (info.evaluator == "lm_eval"
                                and (info.stderr is None or info.stderr in {*res.metrics, *res.errors})), name


@needs_data
def test_mmlu_groups_and_categories(tiny, tmp_path):
    model, tok = tiny
    res = run(make_ctx(model, tok, DATA_DIR, tmp_path), ["mmlu"], limit=2)
    assert "mmlu" not in res.errors, res.errors
    for name in ("mmlu_avg", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences",
                 "mmlu_other"):
        assert 0.0 <= res.metrics[name] <= 1.0
        assert f"{name}_stderr" in res.metrics
    assert res.provenance["num_fewshot"]["mmlu"] == 5       # task default
    assert res.provenance["tasks"]["mmlu"]["n_docs"] == 114  # limit 2 per subject
    subjects = res.artifacts["mmlu_subjects"]
    assert len(subjects) == 57
    # each category = size-weighted mean of its subjects (2 docs each: the plain mean)
    info = mmlu_subjects()
    for cat in ("stem", "humanities", "social_sciences", "other"):
        accs = [a for s, a in subjects.items() if info[s]["category"] == cat]
        assert res.metrics[f"mmlu_{cat}"] == pytest.approx(sum(accs) / len(accs))
    # overall = size-weighted mean of subjects; with 2 docs each, the plain mean
    assert res.metrics["mmlu_avg"] == pytest.approx(sum(subjects.values()) / 57)


def test_mmlu_mapping_is_lm_evals():
    subjects = mmlu_subjects()
    counts = {}
    for info in subjects.values():
        counts[info["category"]] = counts.get(info["category"], 0) + 1
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    assert subjects["anatomy"]["description"].startswith(
        "The following are multiple choice questions (with answers) about anatomy.")


# ---------------------------------------------------------------- scoring direction

def y_lover(tok, strength: float = 8.0, liked: str = "y"):
    """A Llama whose next-token distribution is fixed: it puts extra logit on byte 'y'
    (or on each byte of `liked`).

    Layers are silenced (o_proj, down_proj = 0) and every embedding is the same vector, so
    the final hidden state is constant and lm_head alone sets the logits.
    """
    model = tiny_llama(seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for ch in liked:
            model.lm_head.weight[tok.convert_tokens_to_ids(ch)].fill_(
                strength / model.config.hidden_size)
    return model


def write_piqa(root: Path, gold_is_y: bool) -> Path:
    """PIQA-format data where one solution is all 'y' and the other all 'z' (same length)."""
    (root / "piqa").mkdir(parents=True)
    labels = [0, 1, 1, 0, 1, 0]
    with open(root / "piqa" / "valid.jsonl", "w") as f:
        for i, label in enumerate(labels):
            y_idx = label if gold_is_y else 1 - label
            sols = ["zzzz zzzz", "zzzz zzzz"]
            sols[y_idx] = "yyyy yyyy"
            f.write(json.dumps({"goal": f"goal {i}", "sol1": sols[0], "sol2": sols[1]}) + "\n")
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{x}\n" for x in labels))
    return root


@pytest.mark.parametrize("gold_is_y, expected", [(True, 1.0), (False, 0.0)])
def test_scoring_direction(tmp_path, gold_is_y, expected):
    tok = tiny_tokenizer()
    data = write_piqa(tmp_path / "data", gold_is_y)
    res = run(make_ctx(y_lover(tok), tok, data, tmp_path / "run"), ["piqa"], limit=None)
    assert res.metrics["acc_piqa"] == expected
    assert res.metrics["acc_norm_piqa"] == expected
    assert res.provenance["tasks"]["piqa"]["n_docs"] == 6


# ---------------------------------------------------------------- failures and naming

def test_missing_file_names_it_and_others_still_run(tmp_path):
    tok = tiny_tokenizer()
    data = write_piqa(tmp_path / "data", True)
    res = run(make_ctx(y_lover(tok), tok, data, tmp_path / "run"), ["arc_easy", "piqa"])
    assert "ARC-Easy-Test.jsonl" in res.errors["arc_easy"]
    assert res.metrics["acc_piqa"] == 1.0
    assert "acc_arc_easy" not in res.metrics
    assert "acc_commonsense_avg" not in res.metrics     # only one task ran


def test_no_data_dir_raises_naming_the_task(tmp_path):
    with pytest.raises(DataMissingError, match="piqa"):
        prepare_task("piqa", None, tmp_path)


def test_nan_is_never_stored():
    import harness.evals.lm_eval as mod

    res = EvalResult()
    mod._collect("boolq", {"acc,none": float("nan"), "acc_stderr,none": "N/A"}, res)
    assert res.metrics == {}
    assert "acc_boolq" in res.errors and "acc_boolq_stderr" in res.provenance["not_stored"]


def test_config_validation():
    with pytest.raises(ValueError, match="not supported"):
        Options.from_cfg({"tasks": ["piqa", "nope"]})
    with pytest.raises(ValueError, match="source"):
        Options.from_cfg({"tasks": ["piqa"], "source": "ftp"})
    opts = Options.from_cfg({"tasks": ["piqa", "mmlu"], "num_fewshot": None})
    assert (opts.fewshot_for("piqa"), opts.fewshot_for("mmlu")) == (0, 5)


def test_registry_and_hydra_configs():
    from omegaconf import OmegaConf

    assert get_evaluator("lm_eval") is evaluate
    root = Path(__file__).resolve().parent.parent / "conf" / "eval"
    for name in ("commonsense", "mmlu"):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert cfg.evaluators == ["lm_eval"]
        Options.from_cfg(cfg)      # validates task names and source


def test_hellaswag_capitalisation_heuristic():
    text = "Roof shingle removal: A man is sitting on a roof. he"
    assert capitalise_last_fragment(text) == "Roof shingle removal: A man is sitting on a roof. He"
    assert capitalise_last_fragment("Label: Done. Next step.") == "Label: Done. Next step."


@needs_data
def test_config_hash_is_stable_and_path_free(tmp_path):
    a = prepare_task("boolq", DATA_DIR, tmp_path / "a")
    b = prepare_task("boolq", DATA_DIR, tmp_path / "b")
    assert a.config_sha256 == b.config_sha256
    assert a.data_sha256 == b.data_sha256


# Every converter, same idea as PIQA: the gold answer sits at varied positions and is the one
# a "yes"-loving model picks (its bytes y, e, s get the logit), so a converter that maps
# labels wrongly (inverted BoolQ map, ARC answerKey off by one, winogrande gold flipped)
# changes the accuracy. BoolQ's choices are fixed ("no", "yes"): acc = share of true labels.
# Winogrande scores one shared continuation after each context, CommonsenseQA scores the
# answer letters: this model has no preference there, so lm-eval's argmax takes the first
# option: acc = share of gold 0.

def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


GOLD = [2, 0, 3, 1]          # gold position per doc (4 docs)


def _write_arc(root: Path, name: str) -> None:
    rows = []
    for i, g in enumerate(GOLD):
        labels = ["1", "2", "3", "4"] if i == 3 else ["A", "B", "C", "D"]   # ARC has both
        rows.append({"id": f"q{i}", "question": {"stem": f"question {i}", "choices": [
            {"text": "yyyy yyyy" if j == g else "zzzz zzzz", "label": lab}
            for j, lab in enumerate(labels)]}, "answerKey": labels[g]})
    _write_jsonl(root / "arc" / name, rows)


def _write_hellaswag(root: Path) -> None:
    import bz2
    lines = []
    for i, g in enumerate(GOLD):
        lines += [f"Activity: context {i} and then", str(g),
                  *["yyyy yyyy" if j == g else "zzzz zzzz" for j in range(4)]]
    (root / "hellaswag").mkdir(parents=True)
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("\n".join(lines) + "\n")


def _write_csqa(root: Path) -> None:
    labels = ["A", "B", "C", "D", "E"]
    _write_jsonl(root / "commonsense_qa" / "validation.hf_format.jsonl", [
        {"id": f"q{i}", "question": f"question {i}?", "question_concept": "x",
         "choices": {"label": labels, "text": ["yyyy yyyy" if j == g else "zzzz zzzz"
                                               for j in range(5)]},
         "answerKey": labels[g]} for i, g in enumerate(GOLD)])


def _write_boolq(root: Path) -> None:
    labels = ["true", "false", "true", "true"]      # share of true labels: 0.75
    _write_jsonl(root / "boolq" / "val.jsonl", [
        {"question": f"is it {i}", "passage": "a passage", "idx": i, "label": lab}
        for i, lab in enumerate(labels)])


def _write_winogrande(root: Path) -> None:
    golds = [0, 1, 0, 0]                             # share of gold 0: 0.75
    _write_jsonl(root / "winogrande" / "dev.mosaicml_partial.jsonl", [
        {"context_options": [f"context {i} with A", f"context {i} with B"],
         "continuation": "went home.", "gold": g} for i, g in enumerate(golds)])


@pytest.mark.parametrize("task, write, expected", [
    ("arc_easy", lambda r: _write_arc(r, "ARC-Easy-Test.jsonl"), 1.0),
    ("arc_challenge", lambda r: _write_arc(r, "ARC-Challenge-Test.jsonl"), 1.0),
    ("hellaswag", _write_hellaswag, 1.0),
    ("commonsense_qa", _write_csqa, 0.25),   # lettered choices: ties pick "A"; GOLD[i]==0 once
    ("boolq", _write_boolq, 0.75),
    ("winogrande", _write_winogrande, 0.75),
])
def test_scoring_direction_every_task(tmp_path, task, write, expected):
    tok = tiny_tokenizer()
    data = tmp_path / "data"
    write(data)
    res = run(make_ctx(y_lover(tok, liked="yes"), tok, data, tmp_path / "run"), [task],
              limit=None)
    assert not {k: v for k, v in res.errors.items() if not k.endswith("_stderr")}, res.errors
    assert res.metrics[f"acc_{task}"] == pytest.approx(expected)
    assert res.provenance["tasks"][task]["n_docs"] == 4
