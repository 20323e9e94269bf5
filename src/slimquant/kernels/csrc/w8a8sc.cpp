// slimquant W8A8SC codec: rANS over tiles of a W8A8S int8 weight (see slimquant/kernels/w8a8sc.py, which holds
// the numpy reference these loops must match byte for byte, and docs/format.md for the stream layout).
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kProbBits = 14;
constexpr uint32_t kProbScale = 1u << kProbBits;
constexpr uint32_t kRansL = 1u << 23;
constexpr int kValueMin = -16;  // symbols 0..31: values -16..15; 32: escape
constexpr int kSymbols = 33;
constexpr int kEscape = 32;
constexpr int kHeader = 1 + 2 * kSymbols + 4;

inline uint32_t rd32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
inline uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

// Each tile's symbols (flat[offsets[t] .. offsets[t+1]]) coded with its frequency row: [states, bytes, starts].
std::vector<torch::Tensor> rans_encode(torch::Tensor flat, torch::Tensor offsets, torch::Tensor freq) {
  TORCH_CHECK(flat.dtype() == torch::kUInt8 && offsets.dtype() == torch::kInt64 && freq.dtype() == torch::kInt32,
              "rans_encode: uint8 symbols, int64 offsets, int32 frequencies");
  flat = flat.contiguous();
  offsets = offsets.contiguous();
  freq = freq.contiguous();
  const int64_t T = offsets.numel() - 1;
  TORCH_CHECK(freq.size(0) == T && freq.size(1) == kSymbols, "rans_encode: one frequency row per tile");
  const uint8_t* sym = flat.data_ptr<uint8_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int32_t* fq = freq.data_ptr<int32_t>();
  std::vector<std::vector<uint8_t>> bodies(T);
  auto states = torch::empty({T}, torch::kInt64);
  int64_t* st = states.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* f = fq + t * kSymbols;
    uint32_t cum[kSymbols];
    uint32_t c = 0;
    for (int s = 0; s < kSymbols; ++s) {
      cum[s] = c;
      c += uint32_t(f[s]);
    }
    const int64_t m = off[t + 1] - off[t];
    std::vector<uint8_t> buf(size_t(2 * m + 8));
    int64_t pos = int64_t(buf.size());
    uint64_t x = kRansL;
    for (int64_t j = m - 1; j >= 0; --j) {
      const int s = sym[off[t] + j];
      const uint64_t fs = uint64_t(f[s]);
      const uint64_t x_max = uint64_t((kRansL >> kProbBits) << 8) * fs;
      while (x >= x_max) {
        buf[size_t(--pos)] = uint8_t(x & 0xFF);
        x >>= 8;
      }
      x = ((x / fs) << kProbBits) + (x % fs) + cum[s];
    }
    st[t] = int64_t(x);
    bodies[t].assign(buf.begin() + pos, buf.end());
  }
  auto starts = torch::empty({T + 1}, torch::kInt64);
  int64_t* sp = starts.data_ptr<int64_t>();
  sp[0] = 0;
  for (int64_t t = 0; t < T; ++t) sp[t + 1] = sp[t] + int64_t(bodies[t].size());
  auto data = torch::empty({sp[T]}, torch::kUInt8);
  uint8_t* d = data.data_ptr<uint8_t>();
  for (int64_t t = 0; t < T; ++t)
    if (!bodies[t].empty()) std::memcpy(d + sp[t], bodies[t].data(), bodies[t].size());
  return {states, data, starts};
}

// One tile's blob -> its values written into out (row stride k). 0 on success, else the error code of
// slimquant.kernels.w8a8sc._NATIVE_ERRORS.
int decode_tile(const uint8_t* blob, int64_t len, int64_t rows, int64_t cols, int8_t* out, int64_t k) {
  const int64_t size = rows * cols;
  if (len < 1) return 2;
  if (blob[0] == 0) {  // raw
    if (len != 1 + size) return 4;
    for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * k, blob + 1 + r * cols, size_t(cols));
    return 0;
  }
  if (blob[0] != 1) return 3;
  if (len < kHeader + 4) return 2;
  uint32_t f[kSymbols], cum[kSymbols];
  uint32_t c = 0;
  for (int s = 0; s < kSymbols; ++s) {
    f[s] = rd16(blob + 1 + 2 * s);
    cum[s] = c;
    c += f[s];
  }
  if (c != kProbScale) return 5;
  static thread_local uint8_t lut[kProbScale];
  for (int s = 0; s < kSymbols; ++s) std::memset(lut + cum[s], s, f[s]);
  const int64_t n_out = rd32(blob + 1 + 2 * kSymbols);
  if (n_out > size) return 6;
  if (kHeader + n_out + 4 > len) return 2;
  const int8_t* outl = reinterpret_cast<const int8_t*>(blob + kHeader);
  uint64_t x = rd32(blob + kHeader + n_out);
  const uint8_t* p = blob + kHeader + n_out + 4;
  const uint8_t* end = blob + len;
  int64_t used = 0;
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* o = out + r * k;
    for (int64_t cc = 0; cc < cols; ++cc) {
      const uint32_t slot = uint32_t(x & (kProbScale - 1));
      const int s = lut[slot];
      x = uint64_t(f[s]) * (x >> kProbBits) + slot - cum[s];
      while (x < kRansL) {
        if (p >= end) return 7;
        x = (x << 8) | *p++;
      }
      if (s == kEscape) {
        if (used >= n_out) return 9;
        o[cc] = outl[used++];
      } else {
        o[cc] = int8_t(s + kValueMin);
      }
    }
  }
  if (x != kRansL || p != end) return 8;
  if (used != n_out) return 9;
  return 0;
}

// (stream, index) of a [n, k] weight cut into rows x cols tiles -> [weight int8 [n, k], error int64 [2]]
// (error: code, tile; code 0 = fine).
std::vector<torch::Tensor> sc_decode(torch::Tensor stream, torch::Tensor index, int64_t n, int64_t k, int64_t rows,
                                     int64_t cols) {
  TORCH_CHECK(stream.dtype() == torch::kUInt8 && index.dtype() == torch::kUInt8, "sc_decode: uint8 stream and index");
  TORCH_CHECK(n > 0 && k > 0 && rows > 0 && cols > 0, "sc_decode: positive shape and tiling");
  stream = stream.contiguous();
  index = index.contiguous();
  const int64_t nt = (n + rows - 1) / rows, kt = (k + cols - 1) / cols, T = nt * kt;
  TORCH_CHECK(index.numel() == 8 * T, "sc_decode: the index holds ", index.numel(), " bytes; ", T, " tiles need ", 8 * T);
  auto out = torch::zeros({n, k}, torch::kInt8);
  auto err = torch::zeros({2}, torch::kInt64);
  int8_t* o = out.data_ptr<int8_t>();
  const uint8_t* s = stream.data_ptr<uint8_t>();
  const uint8_t* ix = index.data_ptr<uint8_t>();
  const int64_t size = stream.numel();
  std::vector<int> codes(size_t(T), 0);
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t off = rd32(ix + 8 * t), len = rd32(ix + 8 * t + 4);
    if (len < 1 || off + len > size) {
      codes[size_t(t)] = 1;
      continue;
    }
    const int64_t r0 = (t / kt) * rows, c0 = (t % kt) * cols;
    const int64_t tr = std::min(rows, n - r0), tc = std::min(cols, k - c0);
    codes[size_t(t)] = decode_tile(s + off, len, tr, tc, o + r0 * k + c0, k);
  }
  int64_t* e = err.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    if (codes[size_t(t)]) {
      e[0] = codes[size_t(t)];
      e[1] = t;
      break;
    }
  return {out, err};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rans_encode", &rans_encode, "rANS-code each tile's symbols: [states, bytes, starts]");
  m.def("sc_decode", &sc_decode, "W8A8SC (stream, index) -> [int8 weight, error (code, tile)]");
}
