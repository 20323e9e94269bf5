"""The ``slimquant`` command: argument parsing only; the work is in the API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from slimquant.cli import (compress_cmd, demo_cmd, eval_cmd, export_cmd, quantize_cmd, search_cmd, sensitivity_cmd,
                           tune_cmd)  # fmt: skip
from slimquant.errors import SlimquantError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimquant", description="Quantize PyTorch models.")
    parser.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)
    quantize_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    compress_cmd.add_parser(sub)
    eval_cmd.add_parsers(sub)
    demo_cmd.add_parser(sub)
    sensitivity_cmd.add_parser(sub)
    tune_cmd.add_parser(sub)
    search_cmd.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: every ``finally`` and cleanup runs, the partial output is removed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"slimquant: terminated (SIGTERM); the output was not written{_resume_note(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM
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
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _resume_note(args: argparse.Namespace) -> str:
    """Where a block-by-block quantize run left its finished blocks, if it did."""
    save = getattr(args, "save_directory", None)
    if not save or getattr(args, "command", None) != "quantize":
        return ""
    import json

    from slimquant.cli.quantize_cmd import work_dir_of

    work = work_dir_of(save)
    try:
        done = json.loads((work / "state.json").read_text(encoding="utf-8")).get("done", 0)
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(done, int) and done > 0:
        return f" ({done} finished block(s) are kept in {work}: rerun the same command to resume, or remove it)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
