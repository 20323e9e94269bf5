"""``slimquant compress``: a W8A8S checkpoint -> W8A8SC (msModelSlim's ``sparse_compressor``, seed 002).

Every W8A8S linear is first split for tensor parallelism into ``--tp_size`` parts (q/k/v/gate/up by output
channels, o/down by input channels, as a tensor-parallel runtime shards them), then each part's int8 weight is
compressed: ``weight`` becomes a 1-D int8 stream, ``index`` locates each tile of it, ``info`` holds the tiling, the
shape and CRC-32 checksums. One ``partI-of-N`` directory per part, ``config.json`` with ``"quantize": "w8a8sc"``.
``slimquant.load`` (and ``slimquant eval``) read the directory back, every part checked, and run the model exactly
as the W8A8S checkpoint does. The codec is open: docs/format.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from slimquant.cli.args import positive_int

log = logging.getLogger("slimquant.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slimquant.formats.w8a8sc import TILING

    p = sub.add_parser("compress", help="W8A8S checkpoint -> W8A8SC (tensor-parallel parts, compressed weights)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model_path", required=True, help="a W8A8S checkpoint (slimquant quantize --co_sparse True / "
                   "--is_lowbit True)")  # fmt: skip
    p.add_argument("--save_directory", required=True, help="output directory (written atomically)")
    p.add_argument("--tp_size", type=positive_int, default=1,
                   help="tensor-parallel parts (default 1); must divide the head counts and every split width")  # fmt: skip
    p.add_argument("--tiling_n", type=positive_int, default=TILING[0],
                   help=f"tile height in units of 16 rows (tilingN, default {TILING[0]})")  # fmt: skip
    p.add_argument("--tiling_k", type=positive_int, default=TILING[1],
                   help=f"tile width in units of 32 columns (tilingK, default {TILING[1]})")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing slimquant checkpoint in --save_directory (never another directory)")  # fmt: skip
    p.add_argument("--force_overwrite", action="store_true",
                   help="replace --save_directory whatever it holds: everything in it is deleted")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slimquant.errors import SlimquantError
    from slimquant.formats.checkpoint import is_checkpoint
    from slimquant.formats.w8a8sc import compress

    source = Path(args.model_path)
    if not source.is_dir() or not is_checkpoint(source):
        raise SlimquantError(f"--model_path {args.model_path}: not a slimquant checkpoint directory; quantize first "
                             "(slimquant quantize ... --co_sparse True)")  # fmt: skip
    t0 = time.perf_counter()
    out = compress(source, args.save_directory, tp_size=args.tp_size, tiling=(args.tiling_n, args.tiling_k),
                   overwrite=args.overwrite, force_overwrite=args.force_overwrite)  # fmt: skip
    before = sum(f.stat().st_size for f in source.glob("quant_model_weight_*.safetensors*"))
    after = sum(f.stat().st_size for f in out.glob("part*-of-*/*.safetensors"))
    print(f"w8a8sc: {args.tp_size} part(s) in {out}; weight files {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return 0
