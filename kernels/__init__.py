"""ptqbench kernels: W4A8 / W8A8 Triton kernels with exact PyTorch references.

Importable with torch alone; the Triton kernels need `triton` (extra `kernels`).
This package is *not* Hugging Face's `kernels` hub client: it defines no
`get_kernel` and carries no `kernels` distribution metadata, so
`transformers.utils.is_kernels_available()` stays False (tested).
"""
