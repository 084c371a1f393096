"""Benchmark environment: device, driver, library versions and the device's peak numbers."""

from __future__ import annotations

import platform
import shutil
import subprocess
import time

import torch

# dense peaks (no sparsity): HBM GB/s, int8 TOPS, fp16 TFLOPS
PEAKS = {
    "H200": {"hbm_gbs": 4800.0, "int8_tops": 1979.0, "fp16_tflops": 989.0},
    "H100 PCIe": {"hbm_gbs": 2000.0, "int8_tops": 1513.0, "fp16_tflops": 756.0},
    "H100 NVL": {"hbm_gbs": 3900.0, "int8_tops": 1671.0, "fp16_tflops": 835.0},
    "H100": {"hbm_gbs": 3350.0, "int8_tops": 1979.0, "fp16_tflops": 989.0},  # SXM
}


def device_peaks(name: str) -> dict | None:
    """Peak numbers from the device name (H100 SXM / PCIe / NVL, H200); None if unknown."""
    for key in ("H200", "H100 PCIe", "H100 NVL", "H100"):
        if all(part in name for part in key.split()):
            return {"model": key, **PEAKS[key]}
    return None


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "hostname": platform.node(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(),
            peaks=device_peaks(props.name),
        )
    else:
        info.update(device="cpu", peaks=None)
    return info

