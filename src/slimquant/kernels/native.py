"""Native CPU kernels (``csrc/cpu_linear.cpp``), compiled on first use and cached.

Exposes the fused int8 linears of :mod:`slimquant.kernels.int8` as C++ (one call per layer instead of ~20
aten ops; a VNNI int8 GEMV for one to four rows; an int8-weight x float32 GEMV that reads the weight once) and the
4-bit-weight x float32 GEMV and tiled GEMM (and a gated MLP's ``silu(gate) * up`` from two 4-bit weights in one
tiled GEMM). Vector loops for AVX512 and for AVX2 + FMA are chosen at run time.
The first call builds the library with ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed;
~30 s on two cores) into ``$SLIMQUANT_CACHE_DIR`` (default ``~/.cache/slimquant``)/``torch_extensions``; later
processes load the cached build. When the build fails (no compiler, no ninja, unsupported platform) a warning
says why, once per process, and callers use the pure-torch kernels instead. ``SLIMQUANT_NATIVE=0`` skips the
native kernels altogether.

The functions here take activations ``[..., k]`` of any float dtype (computed in float32, returned in the input's
dtype) and int8 weights ``[n, k]``; CPU tensors only. :mod:`slimquant.kernels.int8` and :class:`slimquant.nn.QLinear`
decide when to call them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_linear.cpp"
# W8A8: up to this many rows use the VNNI GEMV, more go through one int8 GEMM (torch._int_mm); measured
# crossover on smollm2's shapes (576 x {192, 576, 1536}, 1536 x 576), 2 threads: 4-8 rows
W8A8_GEMV_MAX_ROWS = 4
# W8A16: up to this many rows use the fused GEMV; more dequantize once and run a float GEMM (crossover 16-32)
W8A16_GEMV_MAX_ROWS = 16
# W4A16: up to this many rows use the nibble GEMV, more the tiled GEMM (float tiles of the weight, at::mm each);
# measured crossover on smollm2's shapes, 2 threads, AVX2: 12-16 rows
W4A16_GEMV_MAX_ROWS = 12
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # no fused multiply-add: W8A8 must match the reference bits

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": ModuleType | None once tried, "error": str


def _enabled() -> bool:
    return os.environ.get("SLIMQUANT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("SLIMQUANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "slimquant"
    )
    return Path(root) / "torch_extensions"


CODEC_SOURCE = Path(__file__).resolve().parent / "csrc" / "w8a8sc.cpp"
CODEC_CFLAGS = ["-O3", "-fopenmp"]


def _build_name(source: Path | None = None, prefix: str = "slimquant_cpu", cflags: list[str] | None = None) -> str:
    """Library name: changes with the source, the flags, torch and python, so stale builds are never loaded
    (defaults: the CPU kernels' ``SOURCE`` and ``CFLAGS``)."""
    source, cflags = source or SOURCE, CFLAGS if cflags is None else cflags
    h = hashlib.sha256(source.read_bytes())
    h.update(" ".join(cflags).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    return f"{prefix}_{h.hexdigest()[:12]}"


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:  # the pip "ninja" package puts its binary beside the module, not on PATH unless the venv is active
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _build(source: Path | None = None, prefix: str = "slimquant_cpu", cflags: list[str] | None = None) -> ModuleType:
    from torch.utils.cpp_extension import load

    source, cflags = source or SOURCE, CFLAGS if cflags is None else cflags
    _ensure_ninja_on_path()
    name = _build_name(source, prefix, cflags)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{name}*.so")):
        log.info("building slimquant's native %s into %s (once; ~30 s)", source.name, build_dir)
    return load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir), verbose=False)  # fmt: skip


def _load(state: dict[str, object], what: str, build) -> ModuleType | None:
    if "module" in state:
        return state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" in state:
            return state["module"]  # type: ignore[return-value]
        module: ModuleType | None = None
        if not _enabled():
            state["error"] = "disabled by SLIMQUANT_NATIVE=0"
        elif platform.machine().lower() not in ("x86_64", "amd64"):
            state["error"] = f"the native kernels are written for x86-64, not {platform.machine()}"
        else:
            try:
                module = build()
            except Exception as e:  # compiler, ninja or linker missing or failing: fall back, say why
                state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                log.warning("native %s unavailable (%s); using the reference implementation", what, state["error"])
        state["module"] = module
        return module


def library() -> ModuleType | None:
    """The compiled library, building it on first use; None when disabled or the build failed (logged once)."""
    return _load(_state, "CPU kernels", _build)


_codec_state: dict[str, object] = {}


def codec_library() -> ModuleType | None:
    """The compiled W8A8SC codec (``csrc/w8a8sc.cpp``), built on first use like :func:`library`; None when
    disabled or the build failed (logged once)."""
    return _load(_codec_state, "W8A8SC codec", lambda: _build(CODEC_SOURCE, "slimquant_w8a8sc", CODEC_CFLAGS))


def codec_unavailable_reason() -> str | None:
    """Why :func:`codec_library` is None (None when it is not, or has not been asked yet)."""
    return _codec_state.get("error")  # type: ignore[return-value]


def available() -> bool:
    """Whether the native kernels can run in this process (builds them on first call)."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or has not been asked yet)."""
    return _state.get("error")  # type: ignore[return-value]


def cpu_features() -> str:
    """Which code paths the library runs on this CPU: ``"avx512 avx512vnni"``, ``"avx512"``, ``"avx2"`` or
    ``"scalar"``."""
    lib = library()
    return "unavailable" if lib is None else lib.cpu_features()


ISAS = ("scalar", "avx2", "avx512")


def set_isa(name: str | None) -> None:
    """Tests and benchmarks: the widest code path the kernels may take (``"scalar"``: the portable loops,
    ``"avx2"``, ``"avx512"``; None: the widest this CPU runs). The CPU's own support still applies."""
    if name is not None and name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; valid: {', '.join(ISAS)}")
    _lib().set_max_isa(len(ISAS) - 1 if name is None else ISAS.index(name))


def _lib() -> ModuleType:
    lib = library()
    if lib is None:
        from slimquant.errors import SlimquantError

        raise SlimquantError(f"native CPU kernels unavailable: {unavailable_reason()}")
    return lib


def w8a8_dynamic(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` float ``[..., k]``, ``w`` int8 ``[n, k]``, ``w_scale`` ``[n]`` or ``[n, 1]``, ``bias`` ``[n]`` or None
    -> ``[..., n]`` in ``x.dtype`` (computed in float32)."""
    return _lib().w8a8_dynamic(x, w, w_scale, bias, W8A8_GEMV_MAX_ROWS)


def w8a8_static(
    x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor, w: torch.Tensor,
    deq_scale: torch.Tensor, quant_bias: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``input_scale`` / ``input_offset``: 1-element tensors (read as float32); ``deq_scale`` float ``[n]``;
    ``quant_bias`` int32 ``[n]``."""
    return _lib().w8a8_static(x, input_scale, input_offset, w, deq_scale, quant_bias, W8A8_GEMV_MAX_ROWS)


def w8a8_dynamic_q(
    q: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows already quantized per token: ``q`` int8 ``[M, k]``, ``xs`` float32 ``[M]`` -> float32 ``[M, n]``
    (``w8a8_dynamic``'s GEMM and rescale without its quantize pass)."""
    return _lib().w8a8_dynamic_q(q, xs, w, w_scale, bias, W8A8_GEMV_MAX_ROWS)


def w8a8_static_q(q: torch.Tensor, w: torch.Tensor, deq_scale: torch.Tensor, quant_bias: torch.Tensor) -> torch.Tensor:
    """Rows already quantized with a layer's ``input_scale`` / ``input_offset``: ``q`` int8 ``[M, k]`` ->
    float32 ``[M, n]``."""
    return _lib().w8a8_static_q(q, w, deq_scale, quant_bias, W8A8_GEMV_MAX_ROWS)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in float32, one pass per row, rows in parallel: ``x`` float32 ``[..., k]``, ``weight``
    float32 ``[k]`` -> ``y [..., k]`` (the ``y`` of :func:`rmsnorm_quant` without its int8 rows)."""
    return _lib().rmsnorm(x, weight, eps)


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: torch.Tensor | None = None,
    input_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Llama's RMSNorm in float32 and the int8 rows of its output in one pass: ``x`` float32 ``[..., k]``,
    ``weight`` float32 ``[k]`` -> ``(y [..., k], q int8 [M, k], xs [M])``; per-token scales ``xs`` unless
    ``input_scale`` / ``input_offset`` (1-element tensors) are given (then ``xs`` is empty)."""
    y, q, xs = _lib().rmsnorm_quant(x, weight, eps, input_scale, input_offset)
    return y, q, xs


def silu_mul_quant(
    g: torch.Tensor, u: torch.Tensor, input_scale: torch.Tensor | None = None, input_offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 rows of ``silu(g) * u`` (float32 ``[..., k]`` each) without writing the float product:
    ``(q int8 [M, k], xs [M])`` as :func:`rmsnorm_quant`."""
    q, xs = _lib().silu_mul_quant(g, u, input_scale, input_offset)
    return q, xs


def w8a16(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``x`` float ``[..., k]``, ``w`` int8 ``[n, k]``, ``scale`` / ``offset`` ``[n, G]`` (or ``[1, G]``, ``[n]``:
    broadcast; ``k % G == 0``; W = (w + offset) * scale per group of k / G columns), ``bias`` ``[n]`` ->
    ``[..., n]`` in ``x.dtype``. Any number of rows works; it pays off up to ``W8A16_GEMV_MAX_ROWS``."""
    return _lib().w8a16(x, w, scale, offset, bias)


def w4a16(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: float,
    bias: torch.Tensor | None = None, k: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """4-bit weights packed as :mod:`slimquant.math.packing` writes them: ``w`` uint8 ``[n, ceil(k/8)*4]`` holding
    ``u = q - qmin`` (two per byte, low nibble first), ``scale`` / ``zero_point`` ``[n, G]`` (or broadcast like
    :func:`w8a16`; W = (u + qmin - zero_point) * scale per group of k / G columns), ``k`` the weight's columns
    (default ``x.shape[-1]``; checked against ``x`` and the packed row length), ``bias`` ``[n]`` -> ``[..., n]`` in
    ``x.dtype`` (computed in float32; the reference is :func:`slimquant.kernels.weight_only.linear_w4a16_reference`,
    equal up to float32 summation order). Up to ``W4A16_GEMV_MAX_ROWS`` rows take the nibble GEMV (vector loops
    when a group is a multiple of 32 columns), more the tiled GEMM, which holds at most the library's
    ``w4_tile_bytes()`` (2 MiB) of float weight at a time."""
    k = x.shape[-1] if k is None else int(k)
    return _lib().w4a16(x, w, scale, zero_point, float(qmin), k, bias, W4A16_GEMV_MAX_ROWS)


class Packed4(NamedTuple):
    """One packed 4-bit weight as :func:`w4a16` takes it (``bias`` optional)."""

    w: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    qmin: float
    bias: torch.Tensor | None = None


def w4a16_gated(x: torch.Tensor, gate: Packed4, up: Packed4, k: int | None = None) -> torch.Tensor:
    """A gated MLP's hidden rows ``silu(x Wg^T + bg) * (x Wu^T + bu)`` from packed 4-bit ``gate`` and ``up``
    weights of the same shape (each as :func:`w4a16` takes it) -> ``[..., n]`` in ``x.dtype``. The reference is
    ``F.silu(linear_w4a16_reference(x, gate...)) * linear_w4a16_reference(x, up...)``, equal up to float32
    rounding (summation order, a Cephes-style ``exp``). Past ``W4A16_GEMV_MAX_ROWS`` rows one tiled GEMM serves
    both weights: per tile of columns, the gate's and the up's float rows side by side, one ``at::mm``, then
    ``silu * up`` while the products are in cache, so neither product is written whole; fewer rows run the two
    nibble GEMVs."""
    k = x.shape[-1] if k is None else int(k)
    return _lib().w4a16_gated(
        x, gate.w, gate.scale, gate.zero_point, float(gate.qmin), gate.bias,
        up.w, up.scale, up.zero_point, float(up.qmin), up.bias, k, W4A16_GEMV_MAX_ROWS,
    )  # fmt: skip
