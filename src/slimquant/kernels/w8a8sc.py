"""The W8A8SC weight codec: tiles of a W8A8S int8 weight entropy-coded with rANS (reference and native).

A W8A8S weight (:attr:`slimquant.types.spec.QuantSpec.outlier_fraction`) holds int8 values of which all but a
small fraction lie on the 4-bit range ``[-8, 7]``, most near zero. The weight ``[n, k]`` is cut into tiles of
``tile_rows x tile_cols`` (edge tiles smaller); each tile is coded on its own, so tiles decode independently (in
parallel, or one at a time), and the index locates each one in the stream. docs/format.md specifies the bytes.

Tile blob (little-endian)::

    u8   mode                      0: raw (the tile's int8 values, row-major), 1: rANS
    rANS mode:
    u16  freq[33]                  symbol frequencies, summing to 16384 (PROB_BITS = 14); symbol v + 16 for a
                                   value v in [-16, 15] (the 4-bit range and the nearest outliers), symbol 32 =
                                   escape (a farther outlier)
    u32  n_outliers
    i8   outliers[n_outliers]      the escaped values, in the tile's row-major order
    u32  state                     the rANS coder's final state
    u8   bytes[...]                the renormalisation bytes, in decoding order

A tile is stored raw when its rANS blob would not be smaller. The rANS coder is the byte-wise one of Duda's
asymmetric numeral systems (32-bit state, lower bound ``L = 2**23``, 14-bit probabilities); symbols are encoded
last to first so they decode first to last.

Two implementations, chosen explicitly: :func:`encode_tiles_reference` / :func:`decode_tiles_reference` (numpy,
vectorised over tiles: the specification in code) and the native ones in ``csrc/w8a8sc.cpp`` (a loop per tile,
OpenMP across tiles), byte-identical (tests). :func:`encode_tiles` / :func:`decode_tiles` take ``impl="native"``
(the default; the reference when the native build is unavailable, with the reason logged once) or
``"reference"``. Frequency tables are computed once (:func:`normalize_frequencies`) for both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

PROB_BITS = 14
PROB_SCALE = 1 << PROB_BITS
RANS_L = 1 << 23
VALUE_MIN, VALUE_MAX = -16, 15  # values coded directly: the 4-bit range and the nearest outliers
N_SYMBOLS = VALUE_MAX - VALUE_MIN + 2  # 32 values, then the escape
ESCAPE = N_SYMBOLS - 1
MODE_RAW = 0
MODE_RANS = 1
HEADER_BYTES = 1 + 2 * N_SYMBOLS + 4  # mode, freq table, n_outliers (the state follows the outliers)


@dataclass(frozen=True)
class Tiling:
    """How a ``[n, k]`` weight is cut: ``rows x cols`` tiles, row-major (all tiles of the first ``rows`` rows,
    left to right, then the next)."""

    n: int
    k: int
    rows: int
    cols: int

    @property
    def n_tiles(self) -> tuple[int, int]:
        return -(-self.n // self.rows), -(-self.k // self.cols)

    def bounds(self) -> list[tuple[int, int, int, int]]:
        """``(r0, r1, c0, c1)`` of every tile, in stream order."""
        nt, kt = self.n_tiles
        return [(i * self.rows, min(self.n, (i + 1) * self.rows), j * self.cols, min(self.k, (j + 1) * self.cols))
                for i in range(nt) for j in range(kt)]  # fmt: skip


def tiles_of(weight: torch.Tensor, tiling: Tiling) -> list[np.ndarray]:
    """The tiles of an int8 ``[n, k]`` weight, each flattened row-major (int8), in stream order."""
    w = weight.contiguous().numpy()
    return [np.ascontiguousarray(w[r0:r1, c0:c1]).reshape(-1) for r0, r1, c0, c1 in tiling.bounds()]


def symbols_of(values: np.ndarray) -> np.ndarray:
    """int8 values -> symbols (uint8): ``v + 16`` on ``[-16, 15]``, :data:`ESCAPE` elsewhere."""
    v = values.astype(np.int16)
    return np.where((v >= VALUE_MIN) & (v <= VALUE_MAX), v - VALUE_MIN, ESCAPE).astype(np.uint8)


def normalize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Symbol counts ``[T, 33]`` (int) -> frequencies ``[T, 33]`` (uint16) summing to 16384 per row, every symbol
    that occurs keeping at least 1. Deterministic: both coders read the table from the stream, the encoders
    take it from here."""
    counts = counts.astype(np.int64)
    total = counts.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("a tile has no symbols")
    freq = (counts * PROB_SCALE) // total
    freq = np.where((counts > 0) & (freq == 0), 1, freq)
    # hand the difference to (or take it from) each row's most frequent symbol; when that symbol alone cannot
    # absorb an excess (many rare symbols raised to 1), take from the others largest first
    diff = PROB_SCALE - freq.sum(axis=1)
    top = counts.argmax(axis=1)
    rows = np.arange(len(freq))
    freq[rows, top] += diff
    for t in np.nonzero(freq[rows, top] < 1)[0]:  # pathological rows only (33 symbols at most)
        f = freq[t]
        f[top[t]] = 1
        excess = int(f.sum()) - PROB_SCALE
        for s in np.argsort(-f, kind="stable"):
            if excess <= 0:
                break
            take = min(excess, int(f[s]) - 1)
            f[s] -= take
            excess -= take
    assert (freq.sum(axis=1) == PROB_SCALE).all()
    return freq.astype(np.uint16)


def _cumulative(freq: np.ndarray) -> np.ndarray:
    """``[T, 33]`` frequencies -> ``[T, 33]`` cumulative starts (int64)."""
    c = np.zeros(freq.shape, dtype=np.int64)
    c[:, 1:] = np.cumsum(freq[:, :-1].astype(np.int64), axis=1)
    return c


# -- rANS core: reference ------------------------------------------------------------------------------------


def rans_encode_reference(symbols: list[np.ndarray], freq: np.ndarray) -> list[tuple[int, bytes]]:
    """rANS-code each tile's symbols (uint8) with its frequency row: ``[(final state, bytes in decoding order)]``.
    Vectorised over tiles of the same length."""
    out: list[tuple[int, bytes] | None] = [None] * len(symbols)
    cum = _cumulative(freq)
    by_len: dict[int, list[int]] = {}
    for t, s in enumerate(symbols):
        by_len.setdefault(len(s), []).append(t)
    for m, ts in by_len.items():
        idx = np.array(ts)
        sym = np.stack([symbols[t] for t in ts]).astype(np.int64)  # [T, m]
        f_all, c_all = freq[idx].astype(np.uint64), cum[idx].astype(np.uint64)
        nt = len(ts)
        cap = 2 * m + 8
        buf = np.zeros((nt, cap), dtype=np.uint8)
        pos = np.full(nt, cap, dtype=np.int64)  # bytes are written backwards
        x = np.full(nt, RANS_L, dtype=np.uint64)
        rows = np.arange(nt)
        for j in range(m - 1, -1, -1):
            s = sym[:, j]
            f = f_all[rows, s]
            c = c_all[rows, s]
            x_max = np.uint64((RANS_L >> PROB_BITS) << 8) * f
            for _ in range(2):  # at most two bytes per symbol with these constants
                emit = x >= x_max
                if not emit.any():
                    break
                pos[emit] -= 1
                buf[rows[emit], pos[emit]] = (x[emit] & np.uint64(0xFF)).astype(np.uint8)
                x[emit] >>= np.uint64(8)
            x = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c
        for i, t in enumerate(ts):
            out[t] = (int(x[i]), buf[i, pos[i]:].tobytes())
    return out  # type: ignore[return-value]


def rans_decode_reference(streams: list[bytes], states: list[int], counts: list[int], freq: np.ndarray,
                          tile_ids: list[int] | None = None) -> list[np.ndarray]:  # fmt: skip
    """Inverse of :func:`rans_encode_reference`: each tile's ``counts[t]`` symbols (uint8). Errors name the tile
    as ``tile_ids`` numbers it (default: its position)."""
    ids = list(range(len(streams))) if tile_ids is None else tile_ids
    out: list[np.ndarray | None] = [None] * len(streams)
    cum = _cumulative(freq)
    by_len: dict[int, list[int]] = {}
    for t, m in enumerate(counts):
        by_len.setdefault(m, []).append(t)
    for m, ts in by_len.items():
        nt = len(ts)
        idx = np.array(ts)
        width = max(len(streams[t]) for t in ts) + 8
        data = np.zeros((nt, width), dtype=np.uint64)
        for i, t in enumerate(ts):
            data[i, : len(streams[t])] = np.frombuffer(streams[t], dtype=np.uint8)
        f_all, c_all = freq[idx].astype(np.uint64), cum[idx].astype(np.uint64)
        lut = np.zeros((nt, PROB_SCALE), dtype=np.int64)  # slot -> symbol
        for i in range(nt):
            lut[i] = np.repeat(np.arange(N_SYMBOLS), f_all[i].astype(np.int64))
        x = np.array([states[t] for t in ts], dtype=np.uint64)
        ptr = np.zeros(nt, dtype=np.int64)
        rows = np.arange(nt)
        sym = np.zeros((nt, m), dtype=np.uint8)
        mask_bits = np.uint64(PROB_SCALE - 1)
        for j in range(m):
            slot = x & mask_bits
            s = lut[rows, slot.astype(np.int64)]
            sym[:, j] = s
            x = f_all[rows, s] * (x >> np.uint64(PROB_BITS)) + slot - c_all[rows, s]
            for _ in range(2):
                need = x < np.uint64(RANS_L)
                if not need.any():
                    break
                x[need] = (x[need] << np.uint64(8)) | data[rows[need], np.minimum(ptr[need], width - 1)]
                ptr[need] += 1
        for i, t in enumerate(ts):
            if ptr[i] > len(streams[t]):
                raise ValueError(f"tile {ids[t]}: {_NATIVE_ERRORS[7]}")
            if int(x[i]) != RANS_L or ptr[i] != len(streams[t]):
                raise ValueError(f"tile {ids[t]}: {_NATIVE_ERRORS[8]}")
            out[t] = sym[i]
    return out  # type: ignore[return-value]


# -- native --------------------------------------------------------------------------------------------------


def _native():
    from slimquant.kernels import native

    return native.codec_library()


def rans_encode_native(symbols: list[np.ndarray], freq: np.ndarray) -> list[tuple[int, bytes]]:
    lib = _native()
    if lib is None:
        raise RuntimeError("native W8A8SC codec unavailable")
    offsets = np.zeros(len(symbols) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in symbols])
    flat = np.concatenate(symbols) if symbols else np.zeros(0, dtype=np.uint8)
    states, data, starts = lib.rans_encode(torch.from_numpy(flat), torch.from_numpy(offsets),
                                           torch.from_numpy(freq.astype(np.int32)))  # fmt: skip
    buf = data.numpy().tobytes()
    st, so = states.tolist(), starts.tolist()
    return [(st[t], buf[so[t]:so[t + 1]]) for t in range(len(symbols))]


def decode_weight_native(stream: np.ndarray, index: np.ndarray, tiling: Tiling) -> torch.Tensor:
    """:func:`decode_weight_reference` in C++ (blob parsing, rANS, escapes; OpenMP across tiles)."""
    lib = _native()
    if lib is None:
        raise RuntimeError("native W8A8SC codec unavailable")
    out = lib.sc_decode(torch.from_numpy(np.ascontiguousarray(stream).view(np.uint8)),
                        torch.from_numpy(np.ascontiguousarray(index).view(np.uint8)),
                        tiling.n, tiling.k, tiling.rows, tiling.cols)  # fmt: skip
    code, tile = int(out[1][0]), int(out[1][1])
    if code:
        raise ValueError(f"tile {tile}: {_NATIVE_ERRORS.get(code, f'error {code}')}")
    return out[0]


_NATIVE_ERRORS = {
    1: "the index points outside the weight stream",
    2: "the tile's blob is shorter than its header",
    3: "unknown tile mode",
    4: "a raw tile's length does not match its size",
    5: f"the frequency table does not sum to {PROB_SCALE}",
    6: "more outliers than values",
    7: "the rANS stream ran out of bytes",
    8: "the rANS state did not return to its start, or bytes were left over (corrupt tile)",
    9: "an escape without an outlier value left, or outlier values left over",
}


# -- whole weights -------------------------------------------------------------------------------------------


def encode_weight(weight: torch.Tensor, tiling: Tiling, impl: str = "native") -> tuple[np.ndarray, np.ndarray]:
    """An int8 ``[n, k]`` weight -> ``(stream, index)``: the tile blobs concatenated (int8 ``[x]``) and the index
    (int8 ``[8 * tiles]``: per tile its byte offset in the stream and its length, two little-endian u32)."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or tuple(weight.shape) != (tiling.n, tiling.k):
        raise ValueError(f"expected an int8 [{tiling.n}, {tiling.k}] weight, got {weight.dtype} {list(weight.shape)}")
    tiles = tiles_of(weight, tiling)
    syms = [symbols_of(t) for t in tiles]
    counts = np.stack([np.bincount(s, minlength=N_SYMBOLS) for s in syms])
    freq = normalize_frequencies(counts)
    coded = _rans_encode(syms, freq, impl)
    blobs: list[bytes] = []
    for t, (tile, sym) in enumerate(zip(tiles, syms)):
        state, body = coded[t]
        outliers = tile[sym == ESCAPE]
        blob = b"".join((bytes([MODE_RANS]), freq[t].astype("<u2").tobytes(), np.uint32(len(outliers)).astype("<u4").tobytes(),
                         outliers.astype(np.int8).tobytes(), np.uint32(state).astype("<u4").tobytes(), body))  # fmt: skip
        if len(blob) >= 1 + tile.size:
            blob = bytes([MODE_RAW]) + tile.astype(np.int8).tobytes()
        blobs.append(blob)
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(blobs) else lengths
    if len(blobs) and int(offsets[-1] + lengths[-1]) >= 1 << 32:
        raise ValueError("a compressed weight of 4 GiB or more does not fit the index's 32-bit offsets")
    index = np.stack([offsets, lengths], axis=1).astype("<u4").reshape(-1).view(np.int8)
    stream = np.frombuffer(b"".join(blobs), dtype=np.int8).copy()
    return stream, index.copy()


def _rans_encode(syms: list[np.ndarray], freq: np.ndarray, impl: str) -> list[tuple[int, bytes]]:
    if impl == "native" and _native_or_log() is not None:
        return rans_encode_native(syms, freq)
    if impl not in ("native", "reference"):
        raise ValueError(f"unknown implementation {impl!r}; valid: native, reference")
    return rans_encode_reference(syms, freq)


def _native_or_log():
    lib = _native()
    if lib is None:
        from slimquant.kernels import native

        if not _warned:
            log.warning("native W8A8SC codec unavailable (%s); using the numpy reference (slower)",
                        native.codec_unavailable_reason())  # fmt: skip
            _warned.append(True)
    return lib


_warned: list[bool] = []


def parse_index(index: np.ndarray, n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, lengths)`` (int64) of an index of ``n_tiles`` tiles."""
    raw = np.ascontiguousarray(index).view(np.uint8)
    if raw.size != 8 * n_tiles:
        raise ValueError(f"the index has {raw.size} bytes; {n_tiles} tiles need {8 * n_tiles}")
    pairs = raw.view("<u4").reshape(n_tiles, 2).astype(np.int64)
    return pairs[:, 0], pairs[:, 1]


def decode_weight_reference(stream: np.ndarray, index: np.ndarray, tiling: Tiling) -> torch.Tensor:
    """``(stream, index)`` -> the int8 ``[n, k]`` weight (numpy; rANS vectorised over tiles). Raises ValueError
    naming the tile when a blob is inconsistent."""
    data = np.ascontiguousarray(stream).view(np.uint8).tobytes()
    bounds = tiling.bounds()
    offsets, lengths = parse_index(index, len(bounds))
    out = np.zeros((tiling.n, tiling.k), dtype=np.int8)
    rans: list[tuple[int, int, bytes, int, np.ndarray, np.ndarray]] = []  # tile, state, body, count, freq, outliers
    for t, ((r0, r1, c0, c1), off, ln) in enumerate(zip(bounds, offsets.tolist(), lengths.tolist())):
        size = (r1 - r0) * (c1 - c0)
        if off < 0 or ln < 1 or off + ln > len(data):
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[1]}")
        blob = data[off:off + ln]
        if blob[0] == MODE_RAW:
            if ln != 1 + size:
                raise ValueError(f"tile {t}: {_NATIVE_ERRORS[4]}")
            out[r0:r1, c0:c1] = np.frombuffer(blob, dtype=np.int8, offset=1).reshape(r1 - r0, c1 - c0)
            continue
        if blob[0] != MODE_RANS:
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[3]}")
        if ln < HEADER_BYTES + 4:
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[2]}")
        freq = np.frombuffer(blob, dtype="<u2", count=N_SYMBOLS, offset=1).astype(np.int64)
        if int(freq.sum()) != PROB_SCALE:
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[5]}")
        n_out = int(np.frombuffer(blob, dtype="<u4", count=1, offset=1 + 2 * N_SYMBOLS)[0])
        if n_out > size:
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[6]}")
        if HEADER_BYTES + n_out + 4 > ln:
            raise ValueError(f"tile {t}: {_NATIVE_ERRORS[2]}")
        outl = np.frombuffer(blob, dtype=np.int8, count=n_out, offset=HEADER_BYTES)
        state = int(np.frombuffer(blob, dtype="<u4", count=1, offset=HEADER_BYTES + n_out)[0])
        rans.append((t, state, blob[HEADER_BYTES + n_out + 4:], size, freq, outl))
    if rans:
        syms = rans_decode_reference([r[2] for r in rans], [r[1] for r in rans], [r[3] for r in rans],
                                     np.stack([r[4] for r in rans]), [r[0] for r in rans])  # fmt: skip
        for (t, _, _, _, _, outl), sym in zip(rans, syms):
            r0, r1, c0, c1 = bounds[t]
            esc = sym == ESCAPE
            if int(esc.sum()) != len(outl):
                raise ValueError(f"tile {t}: {_NATIVE_ERRORS[9]}")
            vals = sym.astype(np.int16) + VALUE_MIN
            vals[esc] = outl
            out[r0:r1, c0:c1] = vals.astype(np.int8).reshape(r1 - r0, c1 - c0)
    return torch.from_numpy(out)


def decode_weight(stream: np.ndarray, index: np.ndarray, tiling: Tiling, impl: str = "native") -> torch.Tensor:
    """The int8 ``[n, k]`` weight of a W8A8SC ``(stream, index)``: ``impl`` ``"native"`` (the reference when the
    native build is unavailable) or ``"reference"``."""
    if impl == "native" and _native_or_log() is not None:
        return decode_weight_native(stream, index, tiling)
    if impl not in ("native", "reference"):
        raise ValueError(f"unknown implementation {impl!r}; valid: native, reference")
    return decode_weight_reference(stream, index, tiling)
