"""Argument types and flag groups shared by the subcommands (types defined with the recipe flags, in
:mod:`slimquant.types.flags`)."""

from __future__ import annotations

import argparse

from slimquant.types.flags import positive_float, positive_int, str2bool

__all__ = ["add_calibration_args", "positive_float", "positive_int", "str2bool"]


def add_calibration_args(p: argparse.ArgumentParser, windows: int, windows_help: str) -> None:
    """``--calib_texts``, ``--calib_file``, ``--calib_size`` / ``--nsamples`` (default ``windows``) and
    ``--calib_seq_len`` / ``--seqlen``."""
    p.add_argument("--calib_texts", nargs="*", default=None, help="calibration texts")
    p.add_argument("--calib_file", default=None,
                   help="calibration file: .jsonl/.json (a 'text' field per line) or plain text (default: slimquant's "
                   "own general-purpose set, shipped with the package; an empty value means the same)")  # fmt: skip
    p.add_argument("--calib_size", "--nsamples", type=positive_int, default=windows,
                   help=f"calibration windows ({windows_help}); --nsamples is AutoRound's name for it")  # fmt: skip
    p.add_argument("--calib_seq_len", "--seqlen", type=positive_int, default=256,
                   help="tokens per calibration window (default 256); --seqlen is AutoRound's name for it")  # fmt: skip
