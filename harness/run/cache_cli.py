"""`ptqbench-cache list | clear | verify`: the caches under paths.cache_dir.

    quantized/<key>/    quantized models (harness/run/cache.py)
    converted/<entry>/  dequantized copies of GGUF files (harness/inputs/gguf.py)
    calib/<key>.*       calibration batches (harness/inputs/calib.py)

    ptqbench-cache list                      # kind, entry, size, last used, what it holds
    ptqbench-cache verify [--fix]            # every checksum; --fix discards bad entries
    ptqbench-cache clear --all | ENTRY ...   # remove entries (names as `list` shows them)

The cache directory: --dir, else $PTQBENCH_CACHE, else .cache (as conf/paths/default.yaml).
Exit status: 0, or 1 when verify found bad entries (and --fix was not given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.inputs.calib import verify_cached
from harness.inputs.gguf import ConvertedEntryError, verify_converted
from harness.run.cache import MANIFEST, CacheEntryError, QuantizedModelCache


@dataclass
class Entry:
    kind: str          # quantized | converted | calib
    name: str
    paths: list[Path]
    what: str

    @property
    def bytes(self) -> int:
        total = 0
        for p in self.paths:
            files = p.rglob("*") if p.is_dir() else [p]
            total += sum(f.stat().st_size for f in files if f.is_file())
        return total

    @property
    def last_used(self) -> float:
        return max((p.stat().st_mtime for p in self.paths if p.exists()), default=0.0)


def _describe_quantized(entry: Path) -> str:
    try:
        parts = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))["key_parts"]
        return (f"{parts['model'].get('name')} {parts['method'].get('name')} "
                f"w{parts['method'].get('w_bits')}a{parts['method'].get('a_bits')}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "(no readable manifest)"


def entries(root: Path) -> Iterator[Entry]:
    q = root / "quantized"
    if q.is_dir():
        for d in QuantizedModelCache(q).entries():
            yield Entry("quantized", d.name, [d], _describe_quantized(d))
    c = root / "converted"
    if c.is_dir():
        for d in sorted(c.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                yield Entry("converted", d.name, [d], "dequantized GGUF copy")
    k = root / "calib"
    if k.is_dir():
        for f in sorted(k.glob("*.safetensors")):
            yield Entry("calib", f.stem, [f, f.with_suffix(".json"), f.with_suffix(".txt")],
                        "calibration token ids")


def check(entry: Entry) -> str | None:
    """None if the entry verifies, else the reason."""
    try:
        if entry.kind == "quantized":
            QuantizedModelCache(entry.paths[0].parent, verify=True).read_manifest(entry.name)
        elif entry.kind == "converted":
            verify_converted(entry.paths[0])
        else:
            verify_cached(entry.paths[0])
    except (CacheEntryError, ConvertedEntryError, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def remove(entry: Entry) -> None:
    for p in entry.paths:
        if p.is_dir():
            trash = p.parent / f".trash-{p.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(p, trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ptqbench-cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path,
                    default=Path(os.environ.get("PTQBENCH_CACHE", ".cache")),
                    help="the cache directory (paths.cache_dir)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="entries with size and last use")
    v = sub.add_parser("verify", help="check every entry's checksums")
    v.add_argument("--fix", action="store_true", help="discard entries that fail")
    c = sub.add_parser("clear", help="remove entries")
    c.add_argument("names", nargs="*", help="entry names as `list` shows them")
    c.add_argument("--all", action="store_true", help="remove every entry")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():     # a typo must not read as "the cache is empty"
        ap.error(f"--dir {args.dir} is not a directory (the cache directory: paths.cache_dir, "
                 "PTQBENCH_CACHE, default .cache)")
    found = list(entries(args.dir))

    if args.cmd == "list":
        print(f"{'kind':<10} {'size MB':>9}  {'last used (UTC)':<19}  entry  ({args.dir})")
        for e in found:
            used = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.last_used))
            print(f"{e.kind:<10} {e.bytes / 2**20:>9.1f}  {used}  {e.name}  {e.what}")
        print(f"{len(found)} entries, {sum(e.bytes for e in found) / 2**20:.1f} MB")
        return 0
    if args.cmd == "verify":
        bad = 0
        for e in found:
            reason = check(e)
            print(f"{'ok ' if reason is None else 'BAD'} {e.kind:<10} {e.name}"
                  + (f"  {reason}" if reason else ""))
            if reason is not None:
                bad += 1
                if args.fix:
                    remove(e)
        print(f"{len(found) - bad} ok, {bad} bad" + (" (discarded)" if bad and args.fix else ""))
        return 1 if bad and not args.fix else 0
    if not args.all and not args.names:
        ap.error("clear: give entry names or --all")
    names = set(args.names)
    unknown = names - {e.name for e in found}
    if unknown:
        ap.error(f"clear: no entry named {', '.join(sorted(unknown))} (see ptqbench-cache list)")
    for e in found:
        if args.all or e.name in names:
            remove(e)
            print(f"removed {e.kind} {e.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
