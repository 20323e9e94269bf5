"""``slimquant export``: write a quantized checkpoint in another format (msmodelslim, compressed-tensors, gguf,
transformers).

``--model`` is a slimquant checkpoint (any format slimquant writes) or a compressed-tensors checkpoint another
tool wrote (llm-compressor's); the output holds the same integer values, scales and zero points, so the model
the target runtime loads computes what slimquant's does. What the target format cannot hold is refused before
anything is written, naming the layer.

``--format gguf`` writes ``model.gguf`` for llama.cpp: from a checkpoint quantized with ``--gguf_type`` exactly
(each layer on its own GGUF grid), or with ``--gguf_type T`` to llama.cpp's tensor types for file type T
(layers on another grid are refused unless ``--requantize``); from a float model (embedded name, HF directory,
.gguf) as ``--gguf_type F16`` or ``F32``.

``--format transformers`` writes slimquant's own tensors with config.json's ``quantization_config``
(``quant_method: slimquant``): after ``slimquant.register_transformers()``, ``AutoModelForCausalLM.from_pretrained``
loads it with slimquant's quantized modules and ``save_pretrained`` writes it again.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimquant.cli.args import positive_float
from slimquant.errors import SlimquantError

log = logging.getLogger("slimquant.cli")

FORMATS = ("msmodelslim", "compressed-tensors", "gguf", "transformers")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint in another format (compressed-tensors, ...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a slimquant checkpoint or a compressed-tensors checkpoint directory "
                   "(--format gguf: also a float model, for --gguf_type F16 / F32)")  # fmt: skip
    p.add_argument("--format", required=True, choices=FORMATS, help="the output format")
    p.add_argument("--save_directory", required=True, help="output directory (written atomically)")
    p.add_argument("--gguf_type", help="--format gguf: the GGUF file type (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q6_K, Q4_K_M); "
                   "default: each layer's own grid (a checkpoint quantized with --gguf_type)")  # fmt: skip
    p.add_argument("--requantize", action="store_true",
                   help="--format gguf: round layers quantized on another grid onto the GGUF type's (dequantize, then "
                   "round-to-nearest with clipping search); the error each adds is in gguf_export.json")  # fmt: skip
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

    if args.format == "gguf":
        return _run_gguf(args)
    if args.gguf_type is not None or args.requantize:
        raise SlimquantError(f"--gguf_type / --requantize apply to --format gguf, not {args.format}: the other formats "
                             "hold slimquant's grids exactly")  # fmt: skip
    source = Path(args.model)
    if not source.is_dir():
        raise SlimquantError(f"--model {args.model}: not a directory (a slimquant or compressed-tensors checkpoint)")
    from slimquant.formats import transformers_layout as tl

    if not (is_checkpoint(source) or ct.is_compressed_tensors(source) or tl.is_layout(source)):
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


def _run_gguf(args: argparse.Namespace) -> int:
    from slimquant.formats import compressed_tensors as ct
    from slimquant.formats.atomic import check_target, target_lock
    from slimquant.formats.checkpoint import is_checkpoint
    from slimquant.formats.gguf import check_file_type, export_gguf
    from slimquant.models.loading import load_checkpoint, load_model

    if args.part_file_size is not None:
        raise SlimquantError("--part_file_size: a GGUF export is one file; remove it")
    ft = check_file_type(args.gguf_type) if args.gguf_type is not None else None
    source = Path(args.model)
    from slimquant.formats import transformers_layout as tl

    quantized = source.is_dir() and (is_checkpoint(source) or ct.is_compressed_tensors(source) or tl.is_layout(source))
    if not quantized and ft not in ("F16", "F32"):
        raise SlimquantError(f"--model {args.model} is a float model: export it as --gguf_type F16 or F32, or quantize it "
                             f"onto a GGUF grid first (slimquant quantize --model_path {args.model} --gguf_type "
                             f"{ft or 'Q4_K_M'} --save_format gguf ...)")  # fmt: skip
    protect = [source] if source.exists() else []
    target = check_target(args.save_directory, args.overwrite, protect, args.force_overwrite)
    with target_lock(target):
        lm = (load_checkpoint(source, trust_remote_code=args.trust_remote_code) if quantized
              else load_model(args.model, trust_remote_code=args.trust_remote_code))  # fmt: skip
        ex = export_gguf(lm.model, target, lm.tokenizer, ft, requantize=args.requantize, overwrite=args.overwrite,
                         force_overwrite=args.force_overwrite, protect=protect)  # fmt: skip
    kinds: dict[str, int] = {}
    for r in ex.tensors:
        kinds[r.type] = kinds.get(r.type, 0) + 1
    requant = [r for r in ex.tensors if r.how == "requantized"]
    print(f"exported {args.model} to GGUF {ex.file_type}: {ex.path} {ex.path.stat().st_size / 2**20:.1f} MiB; tensor "
          f"types: {', '.join(f'{k} x{v}' for k, v in sorted(kinds.items()))}")  # fmt: skip
    if requant:
        worst = max(requant, key=lambda r: r.added_rel_rmse or 0.0)
        print(f"  requantized {len(requant)} layer(s); largest added relative RMS error {worst.added_rel_rmse:.3g} "
              f"({worst.source}); per tensor: gguf_export.json")  # fmt: skip
    return 0


def _qmodules(model):  # noqa: ANN001, ANN202
    from slimquant.nn import QModule

    return (m for m in model.modules() if isinstance(m, QModule))
