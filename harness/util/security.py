"""Security basics shared by the pipeline, store and cache.

- `scrub_secrets`: config values under secret-looking keys never reach a record;
  `scrub_tree` / `install_log_redaction` keep command-line secrets out of Hydra's files
  and logs too.
- `safe_name`: config values used as file or directory names are single, plain path
  components (no `..`, no separators, not absolute, not hidden).
- `within_root`: a derived path stays inside its configured root (symlinks resolved).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REDACTED = "***redacted***"
# Whole words of a key (split on _ - . and camelCase): api_key, HF_TOKEN, wandbApiKey,
# db_password. Not "tokenizer" or "max_tokens", which are not secrets.
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential",
                          "credentials"})
_WORD_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]*$")


class UnsafePathError(ValueError):
    """A config value would place a file outside its configured root."""


def is_secret_key(key: str) -> bool:
    words = {w.lower() for w in _WORD_SPLIT.split(str(key)) if w}
    return bool(words & SECRET_WORDS)


def scrub_secrets(obj: Any) -> Any:
    """A copy of a resolved config with the values of secret-looking keys redacted."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else scrub_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    return obj


def safe_name(value: Any, what: str) -> str:
    """`value` as a single safe path component, or UnsafePathError naming the config key."""
    name = str(value)
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
            or os.path.isabs(name) or not _SAFE_NAME.match(name)):
        raise UnsafePathError(
            f"{what}={name!r} is used as a file name and must be one plain path component "
            "(letters, digits, . _ - + = @ ,; no '..', '/', or leading '.')")
    return name


def within_root(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """`path` resolved, checked to lie inside `root` (resolved); UnsafePathError otherwise."""
    root_r = Path(root).resolve()
    path_r = Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise UnsafePathError(f"{what} {path} resolves to {path_r}, outside {root_r}")
    return path_r


def override_secrets(overrides: Iterable[str]) -> list[str]:
    """Values given on the command line to secret-looking keys (`+tracking.api_key=V`,
    `hf_token=V`), longest first; values shorter than 4 characters are not treated as
    secrets (they would redact unrelated text)."""
    values = set()
    for arg in overrides:
        key, eq, value = str(arg).partition("=")
        value = value.strip().strip("'\"")
        if eq and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]) and len(value) >= 4:
            values.add(value)
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def scrub_tree(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """scrub_secrets, and every occurrence of a known secret value in any string (an override
    list, Hydra's override_dirname, an interpolation that copied it) redacted."""
    secrets = list(secrets)
    obj = scrub_secrets(obj)
    if isinstance(obj, Mapping):
        return {k: scrub_tree(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_tree(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def install_log_redaction(secrets: Iterable[str]) -> None:
    """Every log record (Hydra's launcher prints each job's overrides) has the secret values
    redacted, whatever handlers are configured later."""
    secrets = list(secrets)
    if not secrets:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        message = record.getMessage()
        clean = redact_text(message, secrets)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    logging.setLogRecordFactory(factory)
