"""The ``slimquant`` command: argument parsing only; the work is in the API."""

from __future__ import annotations

import argparse
import logging
import sys

from slimquant.cli import demo_cmd, eval_cmd, quantize_cmd
from slimquant.errors import SlimquantError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimquant", description="Quantize PyTorch models.")
    parser.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)
    quantize_cmd.add_parser(sub)
    eval_cmd.add_parsers(sub)
    demo_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except SlimquantError as e:
        print(f"slimquant: error: {e}{_resume_note(args)}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"slimquant: error: {e.strerror or e}{where}; the output was not written{_resume_note(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slimquant: interrupted; the output was not written{_resume_note(args)}", file=sys.stderr)
        return 130


def _resume_note(args: argparse.Namespace) -> str:
    """Where a block-by-block quantize run left its finished blocks, if it did."""
    save = getattr(args, "save_directory", None)
    if not save:
        return ""
    from pathlib import Path

    work = Path(save).with_name(Path(save).name + ".partial")
    if (work / "state.json").is_file():
        return f" (finished blocks are kept in {work}: rerun the same command to resume, or remove it)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
