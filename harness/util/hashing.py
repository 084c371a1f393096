"""Content checksums shared by the caches (quantized models, converted GGUF copies,
calibration batches)."""

from __future__ import annotations

import hashlib

from methods.checkpoint import sha256_file  # noqa: F401 - one file checksum for all


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
