"""``tfcompat-ema``: look into TF checkpoints and convert them to PyTorch state dicts.

    tfcompat-ema inspect CKPT [--ema-name NAME]
    tfcompat-ema convert CKPT --map RULES.toml --out FILE.safetensors [--averaged | --raw]
                         [--non-strict]

Bad input ends with one line on stderr and exit status 2; a checkpoint that does not fit
the rules prints the mapping report and exits with 1, writing nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional

from .name_map import DEFAULT_EMA_NAME, MappingError, NameMap, _ema_state_key


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tfcompat-ema", description="TF checkpoints and their moving averages, for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="list a checkpoint's variables and averages")
    inspect.add_argument("checkpoint", help="checkpoint prefix, its .index file or directory")
    inspect.add_argument("--ema-name", default=DEFAULT_EMA_NAME,
                         help="the EMA's name, last part of its averages' names (default: "
                              "%(default)s; _1, _2 ... variants are found too)")
    convert = commands.add_parser("convert", help="write a PyTorch state dict (safetensors)")
    convert.add_argument("checkpoint", help="checkpoint prefix, its .index file or directory")
    convert.add_argument("--map", required=True, metavar="RULES", help="TOML rules file")
    convert.add_argument("--out", required=True, help="output .safetensors file")
    which = convert.add_mutually_exclusive_group()
    which.add_argument("--averaged", dest="averaged", action="store_true", default=True,
                       help="the moving averages, as TF's variables_to_restore (default)")
    which.add_argument("--raw", dest="averaged", action="store_false",
                       help="the raw (trained) values")
    convert.add_argument("--non-strict", action="store_true",
                         help="write what maps and print the problems instead of failing")
    args = parser.parse_args(argv)
    # TF's start-up messages on stderr (oneDNN's among them; it plays no part in reading
    # or writing checkpoints) would bury the one line that matters.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _convert(args)
    except MappingError as error:
        print(f"tfcompat-ema: error: {args.checkpoint} does not fit {args.map}; nothing written",
              file=sys.stderr)
        print(error.report, file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"tfcompat-ema: error: {message}", file=sys.stderr)
        return 2


def _inspect(args) -> int:
    from .tf_checkpoint import read_checkpoint
    ckpt = read_checkpoint(args.checkpoint)
    tensors = ckpt.tensors
    variables, averages, debiased = [], {}, set()
    for key in sorted(tensors):
        found = _ema_state_key(key, args.ema_name)
        if found is None:
            variables.append(key)
        elif found[2]:
            debiased.add(found[0])
        else:
            averages.setdefault(found[0], []).append(found[1])
    # A fed tensor (a loss) is not saved itself: its row shows its average's shape and dtype.
    fed = [name for name in sorted(averages) if name not in tensors]
    shown = [(name, name, tensors[name]) for name in variables] + \
        [(f"{name} (tensor)", name, tensors[f"{name}/{averages[name][0]}"]) for name in fed]
    rows = [(label, _shape(tensor), _dtype(tensor),
             ", ".join(sorted(averages.get(name, []))) or "-", "yes" if name in debiased else "-")
            for label, name, tensor in shown]
    print(f"{ckpt.prefix}: {ckpt.format} checkpoint ({'object' if ckpt.format == 'TF2' else 'name'}"
          f"-based), {len(variables)} variables, {sum(map(len, averages.values()))} averages")
    header = ("name", "shape", "dtype", "averages", "debias")
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for name, dtype in ckpt.skipped.items():
        print(f"(left out: {name}, {dtype})")
    return 0


def _convert(args) -> int:
    from .tf_checkpoint import read_checkpoint
    names = NameMap.from_file(args.map)       # before the (slow) checkpoint read
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: the output is a .safetensors file")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("convert writes safetensors: pip install 'tfcompat-ema[checkpoint]'"
                          ) from None
    ckpt = read_checkpoint(args.checkpoint)
    state, report = names.to_torch(ckpt.tensors, averaged=args.averaged,
                                   strict=not args.non_strict)
    directory = os.path.dirname(os.path.abspath(args.out))
    descriptor, temporary = tempfile.mkstemp(suffix=".safetensors", dir=directory)
    os.close(descriptor)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, temporary,
                  metadata={"source": ckpt.prefix, "format": ckpt.format,
                            "values": "averaged" if args.averaged else "raw"})
        os.replace(temporary, args.out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    print(report)
    print(f"wrote {len(state)} tensors ({'averaged' if args.averaged else 'raw'}) to {args.out}")
    return 0


def _shape(tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def _dtype(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


if __name__ == "__main__":
    sys.exit(main())
