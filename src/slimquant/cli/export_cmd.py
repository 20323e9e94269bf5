"""``slimquant export``: write a quantized checkpoint in another format (msmodelslim, compressed-tensors).

``--model`` is a slimquant checkpoint (any format slimquant writes) or a compressed-tensors checkpoint another
tool wrote (llm-compressor's); the output holds the same integer values, scales and zero points, so the model
the target runtime loads computes what slimquant's does. What the target format cannot hold is refused before
anything is written, naming the layer.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimquant.cli.args import positive_float
from slimquant.errors import NotSupportedYet, SlimquantError

log = logging.getLogger("slimquant.cli")

FORMATS = ("msmodelslim", "compressed-tensors", "gguf")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint in another format (compressed-tensors, ...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a slimquant checkpoint or a compressed-tensors checkpoint directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="the output format")
    p.add_argument("--save_directory", required=True, help="output directory (written atomically)")
    p.add_argument("--gguf_type", help="GGUF tensor type (F16, Q8_0, Q4_K_M, ...): not built yet")
    p.add_argument("--requantize", action="store_true", help="re-solve onto another grid: not built yet")
    p.add_argument("--part_file_size", type=positive_float, default=None, help="shard size in GB (default: one file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing slimquant checkpoint in --save_directory (never another directory)")  # fmt: skip
    p.add_argument("--force_overwrite", action="store_true",
                   help="replace --save_directory whatever it holds: everything in it is deleted")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run custom modeling code in the model directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slimquant import api
    from slimquant.eval.size import checkpoint_bytes
    from slimquant.formats import compressed_tensors as ct
    from slimquant.formats.atomic import check_target, target_lock
    from slimquant.formats.checkpoint import is_checkpoint
    from slimquant.models.loading import load_checkpoint

    if args.format == "gguf" or args.gguf_type is not None:
        raise NotSupportedYet("--format gguf / --gguf_type: the GGUF export is not built yet; use --format "
                              "msmodelslim or compressed-tensors")  # fmt: skip
    if args.requantize:
        raise NotSupportedYet("--requantize is not built yet: the formats built so far hold slimquant's grids exactly")
    source = Path(args.model)
    if not source.is_dir():
        raise SlimquantError(f"--model {args.model}: not a directory (a slimquant or compressed-tensors checkpoint)")
    if not (is_checkpoint(source) or ct.is_compressed_tensors(source)):
        raise SlimquantError(f"--model {args.model} is neither a slimquant checkpoint (no slimquant_manifest.json) nor a "
                             "compressed-tensors one: quantize a float model first (slimquant quantize ... "
                             "--save_format ...)")  # fmt: skip
    target = check_target(args.save_directory, args.overwrite, [source], args.force_overwrite)
    with target_lock(target):
        loaded = load_checkpoint(source, trust_remote_code=args.trust_remote_code)
        api.save(loaded, target, format=args.format, part_file_size=args.part_file_size, overwrite=args.overwrite,
                 force_overwrite=args.force_overwrite, protect=[source])  # fmt: skip
    layers = sum(1 for _ in _qmodules(loaded.model))
    print(f"exported {layers} quantized layer(s) of {args.model} to {args.format}: {args.save_directory} "
          f"{checkpoint_bytes(target) / 2**20:.1f} MiB")  # fmt: skip
    return 0


def _qmodules(model):  # noqa: ANN001, ANN202
    from slimquant.nn import QModule

    return (m for m in model.modules() if isinstance(m, QModule))
