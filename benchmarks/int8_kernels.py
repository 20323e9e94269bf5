"""Int8 / int4 kernel micro-benchmark: native, torch and reference kernels of :mod:`slimquant.kernels.int8` and
the native W4A16 kernels (:func:`slimquant.kernels.native.w4a16`, g64 symmetric) vs ``F.linear``.

Usage:
    python benchmarks/int8_kernels.py                 # smollm2-135m linear shapes, M = 1 and 512, 1 thread
    python benchmarks/int8_kernels.py --threads 2 --budget 0.5

Within one (shape, M) every candidate runs once per round, round-robin, so all of them see the same
machine load; the table shows medians over the rounds. Baseline: ``F.linear`` with a float weight
of the activation dtype (float32, or bfloat16 for the ``bf16`` row). W4A16 rows: the native kernel (GEMV up to
``W4A16_GEMV_MAX_ROWS`` rows, else the GEMM over float weight tiles) at its default tile (2 MiB) and at 1 / 4 MiB,
the pure-torch reference, and float32 ``F.linear`` cut into the same column tiles as the default GEMM (what splitting
the GEMM costs by itself). For the gate/up shape, a gated MLP's ``silu(gate(x)) * up(x)`` three ways: float32
(``fp32 silu(gate)*up``, the baseline of the next two), the two native W4A16 linears then torch's silu and
multiply, and :func:`slimquant.kernels.native.w4a16_gated` (one tiled GEMM for both weights, silu * up per tile).
Prints only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from slimquant.kernels.int8 import fast_available, fold_static_w8a8, get_kernel

# smollm2-135m: hidden 576, intermediate 1536, 9 heads x 64 (q, o), 3 kv heads x 64 (k, v)
SHAPES = {"q/o 576->576": (576, 576), "k/v 576->192": (576, 192), "gate/up 576->1536": (576, 1536),
          "down 1536->576": (1536, 576)}
MS = (1, 512)
GATED = "gate/up 576->1536"


def candidates(m: int, k: int, n: int) -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (baseline name, zero-argument call), all on the same random data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    w_fp32 = w.float() * ws[:, None]
    xb, w_bf16 = x.bfloat16(), w_fp32.bfloat16()
    s, off = float(x.abs().max()) / 255, 0
    qb, dq = fold_static_w8a8(w, ws, s, off, bias)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    int_mm = get_kernel("int8_matmul", "fast")
    out: dict[str, tuple[str, Callable[[], object]]] = {
        "fp32 F.linear": ("", lambda: F.linear(x, w_fp32, bias)),
        "bf16 F.linear": ("", lambda: F.linear(xb, w_bf16)),
        # the int8 GEMM alone (already-quantized input, no rescale): the ceiling of the W8A8 kernels
        "int8 GEMM only": ("fp32 F.linear", lambda: int_mm(xq, w)),
    }
    from slimquant.kernels import native

    for impl in ("native", "torch", "reference") if native.available() else ("torch", "reference"):
        dyn, sta, w16 = (get_kernel(op, impl) for op in ("linear_w8a8_dynamic", "linear_w8a8_static", "linear_w8a16"))
        out[f"w8a8_dynamic {impl}"] = ("fp32 F.linear", lambda f=dyn: f(x, w, ws, bias))
        out[f"w8a8_static {impl}"] = ("fp32 F.linear", lambda f=sta: f(x, s, off, w, dq, qb))
        out[f"w8a16 fp32 {impl}"] = ("fp32 F.linear", lambda f=w16: f(x, w, ws))
        out[f"w8a16 bf16 {impl}"] = ("bf16 F.linear", lambda f=w16: f(xb, w, ws))
    from slimquant.kernels.weight_only import linear_w4a16_reference
    from slimquant.math.packing import pack

    q4 = torch.randint(-8, 8, (n, k), generator=g)
    w4, s4 = pack(q4, 4, -8), torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3
    if native.available():
        lib = native.library()
        default = lib.w4_tile_bytes()
        for tile in (default, 1 << 20, 1 << 22):
            label = "w4a16 native" + ("" if tile == default else f" {tile >> 10}K tiles")
            out[label] = ("fp32 F.linear", lambda t=tile: (lib.set_w4_tile_bytes(t), native.w4a16(x, w4, s4, None, -8)))
        lib.set_w4_tile_bytes(default)
    out["w4a16 reference"] = ("fp32 F.linear", lambda: linear_w4a16_reference(x, w4, s4, None, -8))
    rows = tile_cols(n, k, 1, native.library().w4_tile_bytes() if native.available() else 2 << 20)  # the GEMM's tile

    def tiled() -> None:
        y = torch.empty(m, n)
        for j in range(0, n, rows):
            torch.mm(x, w_fp32[j : j + rows].t(), out=y[:, j : j + rows])

    out["fp32 in W4 tiles"] = ("fp32 F.linear", tiled)
    if (k, n) == SHAPES[GATED] and native.available():  # a gated MLP's gate and up: two weights of this shape
        q4u = torch.randint(-8, 8, (n, k), generator=g)
        w4u, s4u = pack(q4u, 4, -8), torch.rand(n, k // 64, generator=g) * 0.01 + 1e-3
        w_up = (q4u.float().view(n, -1, 64) * s4u[:, :, None]).view(n, k)
        w_gate = (q4.float().view(n, -1, 64) * s4[:, :, None]).view(n, k)
        gate, up = native.Packed4(w4, s4, None, -8), native.Packed4(w4u, s4u, None, -8)
        base = "fp32 silu(gate)*up"
        out[base] = ("", lambda: F.silu(F.linear(x, w_gate)) * F.linear(x, w_up))
        out["w4a16 silu(gate)*up"] = (base, lambda: F.silu(native.w4a16(x, w4, s4, None, -8)) * native.w4a16(x, w4u, s4u, None, -8))
        out["w4a16 gated"] = (base, lambda: native.w4a16_gated(x, gate, up))
    return out


def tile_cols(n: int, k: int, parts: int, budget: int) -> int:
    """The native W4A16 GEMM's columns per tile (cpu_linear.cpp's w4_tile_cols): equal tiles, multiples of 16,
    at most ``budget`` bytes of float weight for ``parts`` weights side by side."""
    cap = max(16, budget // (4 * max(k, 1) * parts) // 16 * 16)
    tiles = -(-n // cap)
    return min(n, (-(-n // tiles) + 15) // 16 * 16)


def measure(
    calls: dict[str, tuple[str, Callable[[], object]]], budget_s: float, min_rounds: int
) -> dict[str, tuple[float, float]]:
    """Per call: (median seconds, interquartile range / median). Rounds interleave all calls until
    ``budget_s`` is spent (>= ``min_rounds``). In a round each call gets one untimed warm-up call (so a
    slow neighbour's temporaries have not evicted its weights) and then ~1 ms of timed calls, averaged."""
    reps = {}
    for name, (_, f) in calls.items():  # warm up (oneDNN primitive creation, allocator), size the slot
        f()
        t0 = time.perf_counter()
        f()
        reps[name] = max(1, min(50, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    t_end = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < t_end:
        for name, (_, f) in calls.items():
            f()
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                f()
            times[name].append((time.perf_counter() - t0) / reps[name])
        rounds += 1
    out = {}
    for name, v in times.items():
        q1, med, q3 = statistics.quantiles(v, n=4)
        out[name] = (med, (q3 - q1) / med)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per (shape, M) cell, at least 5 rounds")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}; "
          f"fast primitive available: " + ", ".join(f"{op}={fast_available(op)}" for op in
                                                   ("linear_w8a8_dynamic", "linear_w8a16")))
    print("median us per call; iqr% = interquartile range / median; 'vs base' = baseline time / kernel time "
          "(>1: faster than float F.linear); 'fast x' = reference time / fast time\n")
    hdr = f"{'shape':<18} {'M':>4}  {'kernel':<22} {'us':>10} {'iqr%':>5} {'vs base':>8} {'fast x':>7}"
    print(hdr)
    print("-" * len(hdr))
    for label, (k, n) in SHAPES.items():
        for m in MS:
            calls = candidates(m, k, n)
            res = measure(calls, args.budget, min_rounds=5)
            med = {name: r[0] for name, r in res.items()}
            for name, (base, _) in calls.items():
                vs = f"{med[base] / med[name]:8.2f}" if base else f"{'':>8}"
                fx = f"{med[name.replace('fast', 'reference')] / med[name]:7.1f}" if name.endswith("fast") else ""
                print(f"{label:<18} {m:>4}  {name:<22} {med[name] * 1e6:>10.1f} {res[name][1] * 100:>5.0f} {vs} {fx}")
            print()


if __name__ == "__main__":
    main()
