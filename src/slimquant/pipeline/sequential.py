"""The sequential (block by block) pipeline, for recipes whose steps need each block's inputs (GPTQ, AWQ).

One explicit loop over the model's repeated blocks, no graph tracing:

1. run the calibration items through the model until the first block, and keep that block's inputs
   (positional and keyword arguments: hidden states, rotary embeddings, masks) per item;
2. for each block: for every ``block``-stage step (AWQ), run the block on the kept inputs with the collectors
   its implementation asks for (one per layer input it wants), and let it transform the block; then hook the
   planned linear layers to accumulate their input Hessians, run the block, solve every layer with the
   recipe's weight step (GPTQ, RTN), swap the quantized modules in, then run the *quantized* block again so the
   next block calibrates on what the deployed model will feed it (not after the last block). A weight step
   that solves whole blocks (AutoRound) gets the block's items instead of Hessians and, when it needs
   ``block_targets``, the float block's outputs on the *float* model's inputs: the pipeline then carries a second
   stream of hidden states, advanced through each block before anything changes it. A recipe whose steps need
   no data (RTN, only when streaming) skips the passes.

With a work directory (:class:`slimquant.pipeline.workdir.WorkDir`) every finished block, its report rows and
the next block's input hidden states are persisted, and a rerun restores finished blocks instead of
recomputing them. With a :class:`slimquant.models.streaming.StreamingModel` the blocks stay on disk: each is
read just before it is processed and put back on meta once written to the work directory (the final save
reads it from there). The hidden states of one block boundary (one tensor per calibration item) stay in memory
unless they pass ``activation_budget`` bytes; then each lives in its own file and is read back when its item
runs (:class:`BlockInputs`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.adapters import block_list, is_causal_lm
from slimquant.algorithms import (BlockTransform, BlockWeightAlgorithm, block_output, implementation, method_record,
                                  prune_weight, solve_weight)  # fmt: skip
from slimquant.algorithms.gptq import HessianAccumulator
from slimquant.errors import SlimquantError
from slimquant.formats.checkpoint import build_qmodule
from slimquant.formats.safetensors_io import TensorSource
from slimquant.math.metrics import sqnr_db
from slimquant.math.weights import dequantize_weight
from slimquant.nn.modules import QLinear, QModule
from slimquant.pipeline.calibrate import model_inputs
from slimquant.pipeline.workdir import WorkDir
from slimquant.surgery import set_module
from slimquant.types.report import LayerRow, StepRow
from slimquant.types.spec import Recipe
from slimquant.types.steps import BLOCK_TARGETS, BLOCKWISE_NEEDS, HESSIAN

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def capture_block_inputs(model: nn.Module, block: nn.Module, calib_data: Any) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of ``block``'s forward for every calibration item (the model stops there)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    hf = is_causal_lm(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for item in model_inputs(calib_data):
                # no KV cache: a transformers model would otherwise hand each block a cache that grows with every
                # item run through it (later items attending to earlier ones' keys)
                extra = {"use_cache": False} if hf else {}
                try:
                    if isinstance(item, dict):
                        model(**{**{k: _to(v, device) for k, v in item.items()}, **extra})
                    elif isinstance(item, (tuple, list)):
                        model(*[_to(v, device) for v in item], **extra)
                    else:
                        model(_to(item, device), **extra)
                except _Stop:
                    continue
                raise SlimquantError(f"calibration item ran through the model without reaching {type(block).__name__}")
    finally:
        handle.remove()
    return captured


def _next_inputs(hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The next block's arguments: this block's, with the hidden states replaced (positional or keyword)."""
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise SlimquantError("cannot tell which block argument holds the hidden states (no positional argument, "
                         "no hidden_states keyword)")  # fmt: skip


def _strip(args: tuple, kwargs: dict) -> tuple[tuple[tuple, dict], torch.Tensor]:
    """``((args, kwargs) with the hidden states replaced by None, the hidden states)``."""
    if args:
        return ((None, *args[1:]), kwargs), args[0]
    if "hidden_states" in kwargs:
        return (args, {**kwargs, "hidden_states": None}), kwargs["hidden_states"]
    raise SlimquantError("cannot tell which block argument holds the hidden states (no positional argument, "
                         "no hidden_states keyword)")  # fmt: skip


class _BlockData:
    """A block solver's view of the block's calibration items (:class:`slimquant.algorithms.BlockData`)."""

    def __init__(self, inputs: "BlockInputs", targets: "BlockInputs | None", prefix: str = "",
                 input_quant: Any = None, carry: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.inputs, self.targets, self.prefix = inputs, targets, prefix
        self.carry: dict[str, torch.Tensor] = {} if carry is None else carry
        self.tokens = sum(math.prod(shape[:-1]) for shape, _ in inputs.shapes)
        self._input_quant = input_quant
        self.ahead: list[tuple[str, nn.Module, dict[str, tuple[nn.Module, Any]]]] = []

    def __len__(self) -> int:
        return len(self.inputs)

    def item(self, j: int) -> tuple[tuple, dict]:
        args, kwargs = self.inputs.templates[j]
        return _next_inputs(self.inputs.hidden(j), args, kwargs)

    def target(self, j: int) -> torch.Tensor:
        if self.targets is None:
            raise SlimquantError("this weight step did not declare the block_targets need; the float block outputs "
                                 "were not kept")  # fmt: skip
        return self.targets.hidden(j)

    def float_item(self, j: int) -> tuple[tuple, dict]:
        if self.targets is None:
            raise SlimquantError("this weight step did not declare the block_targets need; the float model's inputs "
                                 "were not kept")  # fmt: skip
        args, kwargs = self.targets.templates[j]
        return _next_inputs(self.targets.hidden(j), args, kwargs)

    def with_hidden(self, j: int, hidden: torch.Tensor) -> tuple[tuple, dict]:
        args, kwargs = self.inputs.templates[j]
        return _next_inputs(hidden, args, kwargs)

    def input_quant(self, name: str) -> Any:
        return None if self._input_quant is None else self._input_quant(name)


class BlockInputs:
    """The calibration items' arguments for the current block. The per-item arguments every block shares (masks,
    rotary tables) stay in memory; the hidden states too, unless together they pass ``budget_bytes``: then each
    is written to its own file under ``spill_dir`` and read back when its item runs (one at a time)."""

    def __init__(self, captured: list[tuple[tuple, dict]], budget_bytes: int | None, spill_dir: Path | None,
                 hidden: Any = None) -> None:  # fmt: skip
        stripped = [_strip(a, k) for a, k in captured]
        self.templates = [t for t, _ in stripped]
        self.budget, self.spill_dir, self.gen = budget_bytes, spill_dir, 0
        self._mem: list[torch.Tensor] | None = None
        self._files: list[Path] | None = None
        self.shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._store(hidden if hidden is not None else (h for _, h in stripped))
        del stripped

    @property
    def spilled(self) -> bool:
        return self._files is not None

    def __len__(self) -> int:
        return len(self.templates)

    def hidden(self, j: int) -> torch.Tensor:
        if self._files is not None:
            from safetensors.torch import load_file

            return load_file(str(self._files[j]))["hidden"]
        return self._mem[j]  # type: ignore[index]

    def __iter__(self):  # noqa: ANN204
        for j, (args, kwargs) in enumerate(self.templates):
            yield _next_inputs(self.hidden(j), args, kwargs)

    def advance(self, fn: Any) -> None:
        """Replace every item's hidden states by ``fn(args, kwargs)`` of the current item (the block's output)."""
        old_files = self._files
        self.gen += 1
        self._store(fn(a, k) for a, k in self)
        for f in old_files or []:
            f.unlink(missing_ok=True)

    def entries(self) -> list:
        """``write_safetensors`` entries of the hidden states (item_000000, ...), read as they are written."""
        return [(f"item_{j:06d}", shape, dtype, (lambda j=j: self.hidden(j))) for j, (shape, dtype) in enumerate(self.shapes)]

    def _store(self, hiddens: Any) -> None:
        from safetensors.torch import save_file

        mem: list[torch.Tensor] | None = []
        files: list[Path] | None = None
        shapes, total = [], 0
        for j, h in enumerate(hiddens):
            h = h.detach()
            shapes.append((tuple(h.shape), h.dtype))
            total += h.numel() * h.element_size()
            if files is None and self.budget is not None and total > self.budget:
                if self.spill_dir is None:
                    raise SlimquantError("calibration activations exceed the memory budget and there is no directory to spill to")
                files = []
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                log.info("calibration activations pass %.2f GB: keeping them in %s", self.budget / 1e9, self.spill_dir)
                for i, m in enumerate(mem or []):
                    files.append(self._write(save_file, i, m))
                mem = None
            if files is not None:
                files.append(self._write(save_file, j, h))
            else:
                mem.append(h)  # type: ignore[union-attr]
        self._mem, self._files, self.shapes = mem, files, shapes

    def _write(self, save_file: Any, j: int, h: torch.Tensor) -> Path:
        path = self.spill_dir / f"g{self.gen}_{j:06d}.safetensors"  # type: ignore[operator]
        save_file({"hidden": h.contiguous()}, str(path))
        return path


def quantize_sequential(model: nn.Module, recipe: Recipe, plans: list[Any], calib_data: Any,
                        show_progress: bool = True, stream: Any = None, work: WorkDir | None = None,
                        make_module: Any = None, activation_budget: int | None = None,
                        spill_dir: Path | None = None, input_ranges: dict[str, dict[str, Any]] | None = None,
                        ) -> tuple[list[LayerRow], set[str], list[StepRow], TensorSource | None]:  # fmt: skip
    """Quantize every planned linear layer that lies inside the model's repeated blocks, block by block: the
    recipe's ``block``-stage steps (AWQ) transform each block, then its weight step (GPTQ, RTN) solves it.

    ``stream`` (:class:`slimquant.models.streaming.StreamingModel`): the blocks are on meta and are read from
    disk one at a time, then written to ``work`` and put back on meta (the final save reads them from there).
    ``work`` (:class:`WorkDir`): every finished block is persisted there; blocks it already holds are restored
    instead of recomputed (resume). ``make_module(layer_plan, float_module, quantized_weight, report_row,
    method_record, input_range)``: the quantized module to swap in (default :class:`QLinear`; W8A8 layers get
    their int8-input modules; ``input_range`` a block solver's tuned static input range, else None).
    ``input_ranges``: the calibrated static input ranges of the W8A8 layers (``{name: {"rmin", "rmax", ...}}``),
    which block solvers see through ``data.input_quant``.
    ``activation_budget`` (bytes): past it the hidden states between blocks live in files under ``spill_dir``.

    Returns the per-layer report rows, the names it quantized (the caller handles the rest with RTN), the block
    steps' rows (AWQ: one per smoothing group) and, when blocks were streamed, the source of their tensors (the
    work directory's files, read when the model is saved; else None).
    """
    block_steps = recipe.steps_of("block")
    weight_steps = sorted({lp.step for lp in plans}, key=lambda s: s.TYPE)
    needs_data = any(s.NEEDS & BLOCKWISE_NEEDS for s in (*block_steps, *weight_steps))
    if needs_data and calib_data is None:
        what = next(s.TYPE for s in (*block_steps, *weight_steps) if s.needs_calibration)
        raise SlimquantError(f"{what} needs calibration data (calib_data)")
    if stream is not None and work is None:
        raise SlimquantError("streaming blocks from disk needs a work directory to write them to")
    path = block_list(model)
    blocks = model.get_submodule(path)
    by_block: dict[int, list[Any]] = {}
    for lp in plans:
        if lp.kind != "linear" or not lp.name.startswith(path + "."):
            continue
        by_block.setdefault(int(lp.name[len(path) + 1 :].split(".")[0]), []).append(lp)
    plan_of = {lp.name: lp for lp in plans}
    # what a windowed block solver hands from one block to the next (data.carry: name -> tensor), persisted with
    # each finished block so a resumed run continues exactly
    carry: dict[str, torch.Tensor] = work.carry() if work is not None and 0 < work.done < len(blocks) else {}

    def input_quant(name: str) -> Any:
        lp = plan_of.get(name)
        if lp is None or lp.input is None:
            return None
        if lp.input.dynamic:
            return lp.input, None, None
        rng = (input_ranges or {}).get(name)
        if rng is None:
            raise SlimquantError(f"layer {name}: no calibrated static input range for the block solver")
        return lp.input, float(rng["rmin"]), float(rng["rmax"])
    inputs = BlockInputs([], None, None)
    # the float model's hidden states, for steps fitting each block to the float block's outputs
    float_inputs: BlockInputs | None = None
    wants_targets = any(BLOCK_TARGETS in s.NEEDS for s in (*block_steps, *weight_steps))
    if needs_data:
        captured = capture_block_inputs(model, blocks[0], calib_data)
        resuming = work is not None and 0 < work.done < len(blocks)
        saved = work.inputs(len(captured)) if resuming else None  # type: ignore[union-attr]
        if wants_targets and activation_budget is not None:
            activation_budget //= 2  # two streams of hidden states share the budget
        inputs = BlockInputs(captured, activation_budget, spill_dir, hidden=saved)
        if wants_targets:
            saved = work.inputs(len(captured), float_model=True) if resuming else None  # type: ignore[union-attr]
            float_inputs = BlockInputs(captured, activation_budget, None if spill_dir is None else spill_dir / "float",
                                       hidden=saved)  # fmt: skip
        del captured, saved
    what = " + ".join([s.TYPE for s in block_steps] + ["/".join(s.TYPE for s in weight_steps)])
    log.info("%s: %d block(s) under %s, %d calibration item(s)", what, len(blocks), path, len(inputs))
    rows: list[LayerRow] = []
    step_rows: list[StepRow] = []
    done: set[str] = set()
    on_disk: dict[str, Path] = {}  # tensors of streamed blocks: name -> work file
    bar = tqdm(range(len(blocks)), desc=f"{what} blocks", disable=not show_progress, unit="block")
    for bi in bar:
        layer_plans = by_block.get(bi, [])
        if work is not None and bi < work.done:  # finished in an earlier run
            info = _restore_block(model, path, bi, work, stream, on_disk)
            rows += [LayerRow.from_dict(r) for r in info["layers"]]
            step_rows += [StepRow.from_dict(r) for r in info["block_steps"]]
            done.update(lp.name for lp in layer_plans)
            continue
        block = stream.load_block(bi) if stream is not None else blocks[bi]
        block_rows: list[LayerRow] = []
        block_step_rows: list[StepRow] = []
        if float_inputs is not None:  # the float block on the float inputs, before any step changes it
            with torch.no_grad():
                float_inputs.advance(lambda args, kwargs: block_output(block(*args, **kwargs)))
        for step in block_steps:
            block_step_rows += [StepRow.from_dict(r, step.TYPE)
                                for r in _block_step(model, block, inputs, step, recipe, f"{path}.{bi}.",
                                                     {lp.name: lp for lp in layer_plans})]  # fmt: skip
        accs: dict[str, HessianAccumulator] = {}  # created on first use: layers sharing an input share one
        # Layers fed the very same tensor (q/k/v, gate/up) share one Hessian: accumulated once, by the
        # first of them to see it in each forward.
        owner: dict[str, str] = {}
        seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # holding the tensor keeps its memory from reuse
        handles = []
        block_solved = [lp for lp in layer_plans if isinstance(implementation(lp.step), BlockWeightAlgorithm)]
        for lp in layer_plans if needs_data else []:
            if lp in block_solved:
                continue

            def hook(_m: nn.Module, args: tuple, name: str = lp.name) -> None:
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                first = seen.setdefault(key, (name, x))[0]
                if first == name:
                    if name not in accs:
                        accs[name] = HessianAccumulator(x.shape[-1])
                    accs[name].add(x)
                else:
                    owner[name] = first

            handles.append(model.get_submodule(lp.name).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                for args, kwargs in inputs if handles else ():
                    seen.clear()
                    block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        def ahead(step: Any, n: int, bi: int = bi) -> list[tuple[str, nn.Module, dict[str, tuple[nn.Module, Any]]]]:
            out = []
            for bj in range(bi + 1, min(bi + 1 + n, len(blocks))):
                nxt = stream.load_block(bj) if stream is not None else blocks[bj]  # still float: solved later
                pre = f"{path}.{bj}."
                out.append((pre, nxt, {lp.name[len(pre) :]: (nxt.get_submodule(lp.name[len(pre) :]), lp.spec)
                                       for lp in by_block.get(bj, []) if lp.step == step and lp.spec is not None}))  # fmt: skip
            return out

        data = _BlockData(inputs, float_inputs, f"{path}.{bi}.", input_quant, carry)
        solved = _solve_block(block, f"{path}.{bi}.", block_solved, data, show_progress, ahead)
        errors = []
        for lp in layer_plans:
            # (block-solved layers have no Hessian: an empty accumulator, not a [k, k] of zeros)
            acc = accs.get(owner.get(lp.name, lp.name)) or HessianAccumulator(
                0 if lp.name in solved else model.get_submodule(lp.name).in_features)
            row = _solve_layer(model, lp, acc, recipe, make_module, solved.get(lp.name))
            if lp.name in owner:
                row.details["hessian_shared_with"] = owner[lp.name]
            if row.output_error is not None:
                errors.append(row.output_error)
            block_rows.append(row)
            done.add(lp.name)
        last = bi == len(blocks) - 1
        if not last and len(inputs):
            with torch.no_grad():  # the quantized block's outputs feed the next block
                inputs.advance(lambda args, kwargs: block_output(block(*args, **kwargs)))
        if work is not None:
            prefix = f"{path}.{bi}."
            info = {"layers": [r.to_dict() for r in block_rows], "block_steps": [r.to_dict() for r in block_step_rows],
                    "modules": {n: m.manifest_entry() for n, m in model.named_modules()
                                if n.startswith(prefix) and isinstance(m, QModule)}}  # fmt: skip
            tensors = {prefix + n: t for n, t in block.state_dict().items()}
            work.save_block(bi, tensors, info, None if last or not len(inputs) else inputs.entries(),
                            None if last or float_inputs is None else float_inputs.entries(),
                            None if last else carry)  # fmt: skip
            if stream is not None:
                stream.release_block(bi)
                on_disk.update({n: work.block_file(bi) for n in tensors})
            del tensors
        del accs, seen, block
        if stream is not None:
            _trim_heap()
        rows += block_rows
        step_rows += block_step_rows
        if errors:
            bar.set_postfix(rel_output_error=f"{max(errors):.2e}")
    return rows, done, step_rows, TensorSource(on_disk) if on_disk else None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps medium-sized frees in its arenas, so a long streamed
    run's RSS would creep up block after block). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _restore_block(model: nn.Module, path: str, bi: int, work: WorkDir, stream: Any, on_disk: dict[str, Path]) -> dict:
    """Put finished block ``bi`` back from the work directory: its quantized modules (on meta when streaming,
    their tensors then read at save time; else loaded) and its report rows."""
    info = work.block_info(bi)
    for name, entry in info["modules"].items():
        set_module(model, name, build_qmodule(name, entry))
    prefix = f"{path}.{bi}."
    block = model.get_submodule(f"{path}.{bi}")
    names = work.block_tensor_names(bi)
    if stream is not None:
        block.to("meta")
        on_disk.update({n: work.block_file(bi) for n in names})
    else:
        src = TensorSource({n: work.block_file(bi) for n in names})
        block.load_state_dict({n[len(prefix) :]: src.get(n) for n in names}, assign=True, strict=True)
    return info


def _block_step(model: nn.Module, block: nn.Module, inputs: Any, step: Any, recipe: Recipe, prefix: str,
                plans: dict[str, Any]) -> list[dict]:  # fmt: skip
    """One ``block``-stage step on one block: one pass over the block's calibration inputs feeds the collectors
    its implementation asks for (each sees its layer's input), then the step transforms the block."""
    impl = implementation(step)
    assert isinstance(impl, BlockTransform)
    collectors = impl.collectors(model, step, recipe, prefix, plans)  # type: ignore[misc]
    if not collectors:
        return []
    handles = []
    for name, collector in collectors.items():

        def hook(_m: nn.Module, args: tuple, c: Any = collector) -> None:
            c.add(args[0])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return impl.apply(model, step, recipe, prefix, plans, collectors)  # type: ignore[misc]


def _solve_block(block: nn.Module, prefix: str, plans: list[Any], data: _BlockData, show_progress: bool,
                 ahead: Any = None) -> dict[str, tuple[Any, dict[str, Any], int, dict[str, Any] | None]]:  # fmt: skip
    """The layers of ``plans`` (all solved by block solvers) solved together per step: full name ->
    ``(QuantizedWeight, report fields, calibration rows, tuned static input range or None)``. ``ahead(step, n)``:
    the next ``n`` blocks, for algorithms whose ``lookahead`` asks for them."""
    out: dict[str, tuple[Any, dict[str, Any], int, dict[str, Any] | None]] = {}
    for step in sorted({lp.step for lp in plans}, key=lambda s: s.TYPE):
        impl = implementation(step)
        assert isinstance(impl, BlockWeightAlgorithm)
        mine = [lp for lp in plans if lp.step == step]
        layers = {lp.name[len(prefix) :]: (block.get_submodule(lp.name[len(prefix) :]), lp.spec) for lp in mine}
        n_ahead = impl.lookahead(step)
        data.ahead = ahead(step, n_ahead) if n_ahead > 0 and ahead is not None else []
        log.debug("%s solves %d layer(s) of %s together", step.TYPE, len(layers), prefix.rstrip("."))
        solved = impl.solve_block(block, layers, data, step, show_progress)  # type: ignore[misc]
        missing = sorted(set(layers) - set(solved))
        if missing:
            raise SlimquantError(f"step {step.TYPE!r} did not solve {prefix}{missing[0]} (of {len(missing)} layer(s))")
        for name, res in solved.items():
            if not isinstance(res, tuple) or len(res) not in (2, 3):
                raise SlimquantError(f"step {step.TYPE!r} solved {prefix}{name} as {type(res).__name__}; expected "
                                     "(QuantizedWeight, report fields[, input range])")  # fmt: skip
            qw, info, rng = (*res, None) if len(res) == 2 else res
            if rng is not None and not (isinstance(rng, dict) and {"rmin", "rmax"} <= set(rng)):
                raise SlimquantError(f"step {step.TYPE!r}: the input range of {prefix}{name} must be a dict with rmin "
                                     f"and rmax, got {rng!r}")  # fmt: skip
            out[prefix + name] = (qw, {"algorithm": step.TYPE, **info}, data.tokens, rng)
    return out


def _solve_layer(model: nn.Module, lp: Any, acc: HessianAccumulator, recipe: Recipe,
                 make_module: Any = None, solved: tuple[Any, dict[str, Any], int, Any] | None = None) -> LayerRow:  # fmt: skip
    """Solve one layer with its weight step (or take the block solver's ``solved`` result) and swap the quantized
    module in; the report row measures the output error on the Hessian's rows when there is one."""
    module = model.get_submodule(lp.name)
    w = module.weight.detach().float()
    h = acc.hessian(copy=False)  # read only here and in gptq (which copies before changing it)
    row: dict[str, Any] = {"name": lp.name, "kind": lp.kind, "spec": "float" if lp.spec is None else lp.spec.describe(),
                           "samples": acc.n if solved is None else solved[2]}  # fmt: skip
    step = lp.step
    needs_hessian = HESSIAN in step.NEEDS
    if lp.spec is None:  # a float layer a pruning step prunes in place
        pruned, info = prune_weight(lp.name, w, h if needs_hessian else None, step)
        row.update(info)
        d = pruned - w
        if acc.n:
            ref = float(torch.einsum("ij,jk,ik->", w, h, w))
            row["output_error"] = float(torch.einsum("ij,jk,ik->", d, h, d)) / max(ref, 1e-30)
        row["sqnr_db"] = round(sqnr_db(w, pruned), 2)  # before the copy: w shares the module's storage
        with torch.no_grad():
            module.weight.copy_(pruned.reshape(module.weight.shape).to(module.weight.dtype))
        return LayerRow.from_dict(row)
    if acc.n < w.shape[1] and needs_hessian:
        log.warning("%s: %d calibration rows for %d input channels; the Hessian is rank-deficient (dampened)",
                    lp.name, acc.n, w.shape[1])  # fmt: skip
    if solved is not None:
        qw, info = solved[0], solved[1]
    else:
        qw, info = solve_weight(lp.name, w, h if needs_hessian else None, lp.spec, step)
    row.update(info)
    w_hat = dequantize_weight(qw, lp.spec)
    row["sqnr_db"] = round(sqnr_db(w, w_hat), 2)
    d = w_hat - w
    if acc.n:
        ref = float(torch.einsum("ij,jk,ik->", w, h, w))  # tr(W H W^T): the output energy on the calibration rows
        row["output_error"] = float(torch.einsum("ij,jk,ik->", d, h, d)) / max(ref, 1e-30)
    else:  # data-free (RTN streamed from disk): no calibration rows to measure on
        row["output_error"] = None
    method = method_record(recipe, info, step)
    if make_module is not None:
        qmod = make_module(lp, module, qw, row, method, None if solved is None else solved[3])
    else:
        qmod = QLinear.from_float(module, qw, lp.spec, method=method)
    set_module(model, lp.name, qmod)
    return LayerRow.from_dict(row)
