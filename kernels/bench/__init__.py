"""Kernel benchmark (`python -m kernels.bench`, see __main__.py): torch + triton only.

env: device, driver, versions, peaks; timing: CUDA-graph / eager / CPU timers and the L2
weight rotation; gemm: shapes, the fp16 / W4A8 / W8A8 variants, bytes and speedups; decoder:
the end-to-end LLaMA-shaped model; report: markdown table, plot, JSON.
"""

from kernels.bench.gemm import GROUP_SIZE, SHAPES, traffic_bytes

__all__ = ["GROUP_SIZE", "SHAPES", "traffic_bytes"]
