"""The git state a record reports is the one of the code the process imported."""

from __future__ import annotations

import subprocess

import torch

from harness.run import provenance


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def test_read_git_state_sees_sha_and_dirty(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("a")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    first = provenance.read_git_state(tmp_path)
    assert first["git_dirty"] is False and len(first["git_sha"]) == 40
    (tmp_path / "f.txt").write_text("b")
    assert provenance.read_git_state(tmp_path)["git_dirty"] is True
    _git(tmp_path, "commit", "-q", "-am", "two")
    second = provenance.read_git_state(tmp_path)
    assert second["git_sha"] != first["git_sha"] and second["git_dirty"] is False
    assert provenance.read_git_state(tmp_path / "missing") == {"git_sha": None, "git_dirty": None}


def test_collect_reports_the_import_time_state(monkeypatch):
    at_import = provenance.code_git_state()
    # a later checkout (or edit) must not leak into the records of a running process
    monkeypatch.setattr(provenance, "_git", lambda *a, **k: "f" * 40)
    rec = provenance.collect(torch.device("cpu"), seed=0)
    assert {k: rec[k] for k in ("git_sha", "git_dirty")} == at_import
    assert provenance.read_git_state()["git_sha"] == "f" * 40      # a fresh read would differ
