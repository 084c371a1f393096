"""`ptqbench-export`: a saved ptqbench checkpoint -> a serving checkpoint directory.

    ptqbench-export results/artifacts/<run_id>/checkpoint out/smollm2-fptq-w4a8 \\
        --tokenizer results/artifacts/<run_id>/export-compressed_tensors

The checkpoint is the one `save_checkpoint=true runtime=false` writes (FakeQuantLinear
modules, methods/checkpoint.py). A run can also export directly: `export=compressed_tensors`
writes <artifacts>/<run_id>/export-compressed_tensors beside the record (with tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from methods.arch import ModelSpec
from methods.checkpoint import CheckpointError, load_runtime_checkpoint, read_checkpoint_config
from methods.export import FORMATS, ExportError, check_export_target, export_model

log = logging.getLogger("ptqbench-export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ptqbench-export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="ptqbench checkpoint dir (runtime=false)")
    p.add_argument("out", type=Path, help="output directory: new, empty, or a previous export "
                   "(replaced); never the checkpoint or a directory holding it")
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS)
    p.add_argument("--tokenizer", default=None,
                   help="a local directory with the model's tokenizer files to copy along")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        check_export_target(args.out, args.checkpoint)
        if args.tokenizer and not Path(args.tokenizer).is_dir():
            raise ExportError(f"--tokenizer {args.tokenizer} is not a directory (give a local "
                              "directory with the model's tokenizer files)")
    except ExportError as e:        # before loading anything
        print(f"ptqbench-export: {e}", file=sys.stderr)
        return 2
    try:
        meta = read_checkpoint_config(args.checkpoint).get("meta", {})
        model = load_runtime_checkpoint(args.checkpoint)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"ptqbench-export: cannot read {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:
            print(f"ptqbench-export: cannot load a tokenizer from --tokenizer "
                  f"{args.tokenizer}: {e}", file=sys.stderr)
            return 2
    spec = ModelSpec.from_model(model, str(meta.get("model", args.checkpoint.name)))
    try:
        report = export_model(model, spec, args.format, args.out, source=args.checkpoint,
                              tokenizer=tokenizer,
                              meta={**meta, "source": str(args.checkpoint)},
                              kv_bits=(meta.get("method") or {}).get("kv_bits"))
    except ExportError as e:
        print(f"ptqbench-export: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ptqbench-export: cannot write {args.out}: {e.strerror or e}; give a writable "
              "directory", file=sys.stderr)
        return 2
    print(json.dumps({k: report.get(k) for k in ("path", "format", "ct_format", "size_bytes",
                                                 "deviations")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
