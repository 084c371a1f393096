"""Where and with what a run ran: git state, versions, host, device; peak memory."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path = REPO_ROOT) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def read_git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """git sha and dirty flag (tracked files) of the checkout at `root`, read now; None
    values when git or the repository is unavailable."""
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return {"git_sha": _git("rev-parse", "HEAD", cwd=root),
            "git_dirty": bool(status) if status is not None else None}


# Read once, when this module is first imported: the code the process runs. A long
# (multirun) process must not report a commit checked out after it started.
_IMPORT_GIT_STATE = read_git_state()


def code_git_state() -> dict[str, Any]:
    """The git state captured at import (a copy)."""
    return dict(_IMPORT_GIT_STATE)


def collect(device: torch.device, seed: int | None) -> dict[str, Any]:
    return {
        **code_git_state(),
        "python": sys.version.split()[0],
        "versions": {d: _version(d) for d in ("ptqbench", "torch", "transformers", "triton",
                                               "lm_eval", "hydra-core", "llmcompressor")},
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated on GPU; sampled RSS on CPU (20 ms)."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
