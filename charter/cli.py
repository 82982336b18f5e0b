"""The `charter` command line: one subcommand per stage, each in `charter/commands/<name>.py`.

    charter principles lint principles/harmless.yaml
    charter generate --prompts prompts.jsonl --out out.jsonl
    charter critique --constitution principles/harmless.yaml --prompts p.jsonl --out runs/crit
    charter run examples/quickstart.yaml

Each command module has `add_arguments(parser)` and `run(args) -> int` and imports heavy
libraries only inside `run`, so `charter --help` stays fast. Bad input raises `CharterError`,
printed here as one line (`FILE:LINE: field: what is wrong`) with exit status 1; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from charter.core.errors import CharterError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "principles": ("charter.commands.principles", "lint, show and render principle files"),
    "models": ("charter.commands.models", "where models live (the embedded default included)"),
    "generate": ("charter.commands.generate", "answer prompts with a model"),
    "critique": ("charter.commands.critique", "critique-and-revise loop: SL-CAI data"),
    "label": ("charter.commands.label", "AI preference labels from the constitution"),
    "train": ("charter.commands.train", "SFT and DPO training"),
    "eval": ("charter.commands.eval", "refusal rates and AI-judge win rate"),
    "export": ("charter.commands.export", "a run's data in TRL's formats, with a dataset card"),
    "run": ("charter.commands.run", "the whole pipeline from one YAML file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charter", description="Constitutional AI and RLAIF: principle files in, "
        "a more harmless assistant out.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--max-input-mb", type=float, default=None, metavar="MB",
                        help="largest input file read, in MB after decompression (default "
                        "1024, or CHARTER_MAX_INPUT_MB); a bigger one is refused, not read")
    parser.add_argument("--lean-memory", action="store_true",
                        help="return freed blocks of 64 KB or more to the system at once "
                        "(or CHARTER_LEAN_MEMORY=1): a lower peak resident size, slower "
                        "training (quickstart: benchmarks/README.md)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("charter.commands"):
                continue  # a command not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("CHARTER_DEBUG") == "1"
    if args.lean_memory or os.environ.get("CHARTER_LEAN_MEMORY") == "1":
        from charter.core import procmem

        procmem.return_large_frees()  # process-wide, for the rest of the process
    old_cap = os.environ.get("CHARTER_MAX_INPUT_MB")
    if args.max_input_mb is not None:
        os.environ["CHARTER_MAX_INPUT_MB"] = str(args.max_input_mb)
    try:
        return _run(args, debug)
    finally:
        from charter.core.runlock import release_all

        release_all()
        if old_cap is None:
            os.environ.pop("CHARTER_MAX_INPUT_MB", None)
        else:
            os.environ["CHARTER_MAX_INPUT_MB"] = old_cap


def _run(args: argparse.Namespace, debug: bool) -> int:
    """Run the command; every failure is one line on stderr and exit status 1."""
    try:
        return int(args._run(args) or 0)
    except CharterError as e:
        if debug:
            traceback.print_exc()
        print(f"charter: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("charter: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"charter: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line for the user, the traceback on request
        if debug:
            traceback.print_exc()
        from charter.core.writable import disk_error

        full = disk_error(e, getattr(args, "out", None) or ".")  # a library's disk-full error
        if full is not None:
            print(f"charter: error: {full}", file=sys.stderr)
            return 1
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"charter: internal error: {type(e).__name__}: {first} (a bug in charter; re-run "
              "with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
