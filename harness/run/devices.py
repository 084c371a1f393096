"""One GPU per job: a sweep on a node with N GPUs runs N jobs at once, each on its own GPU.

Every job (whatever the launcher: local, joblib workers, submitit_local processes) leases
a GPU index through an exclusive lock file per GPU under one node-wide directory; it holds
the lease for its whole run and the lock is released when the job ends, or when its
process dies (flock). Jobs beyond the number of GPUs wait for a free one, so `n_jobs`
larger than the GPU count never puts two models on one device.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_LOCK_DIR = Path(os.environ.get("PTQBENCH_GPU_LOCKS", "/tmp/ptqbench-gpu-locks"))


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


@contextmanager
def lease_gpu(gpus: list[str], lock_dir: Path = DEFAULT_LOCK_DIR, poll_s: float = 2.0,
              timeout_s: float | None = None) -> Iterator[str | None]:
    """Hold one of `gpus` (ids as the driver names them) exclusively; None when there are none.

    The lock files are keyed by the physical id, so jobs of different sweeps on one node
    share the pool too."""
    if not gpus:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    waited = False
    while True:
        for gpu in gpus:
            fh = open(lock_dir / f"gpu{gpu}.lock", "a+")  # noqa: SIM115 - held for the job
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                log.info("job holds GPU %s (lock %s)", gpu, fh.name)
                yield gpu
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"no free GPU among {gpus} after {timeout_s:.0f} s "
                               f"(locks in {lock_dir})")
        if not waited:
            log.info("all %d GPUs are held by other jobs; waiting for one", len(gpus))
            waited = True
        time.sleep(poll_s)


@contextmanager
def job_gpu(enabled: bool = True) -> Iterator[str | None]:
    """The GPU this job runs on: leased among the visible ones and made the current CUDA
    device (torch.cuda.set_device), so `cuda` / `auto` mean that GPU within the job."""
    gpus = visible_gpus() if enabled else []
    with lease_gpu(gpus) as gpu:
        if gpu is not None:
            import torch
            torch.cuda.set_device(gpus.index(gpu))   # index among the visible devices
        yield gpu
