// slimquant native CPU kernels: fused int8 linear layers (built on first use by slimquant.kernels.native).
//
// Every function here has a pure-torch reference in slimquant/kernels/int8.py and is tested against it:
//   w8a8_dynamic  per-token symmetric int8 input x per-channel int8 weight: bit-identical to the reference
//   w8a8_static   msModelSlim W8A8 (per-tensor asymmetric input, quant_bias, deq_scale): bit-identical
//   w8a16         int8 weight x float32 input, per-channel or per-group scale and offset: equal to the
//                 reference up to float32 summation order (it sums x * q in a different order)
//   w8a8_*_q      the same two layers from rows already quantized (q int8 [M, k], per-token scales xs [M]):
//                 bit-identical to the reference on those rows
//   rmsnorm_quant Llama's RMSNorm in float32 and its int8 rows in one pass; silu_mul_quant the int8 rows of
//                 silu(g) * u: the producers of slimquant.nn.fused. Their float values equal the reference up to
//                 float32 rounding (sum of squares order, a Cephes-style exp); the int8 rows are exactly the
//                 quantization of the values they computed
// The entry points (bottom) take any leading dims and float dtype, compute in float32 and check shapes; the
// *_2d workers take contiguous float32 [M, k] rows and int8 [n, k] weights.
//
// Integer products are exact, so the W8A8 kernels only have to reproduce the reference's float32 steps in the
// same order (built with -ffp-contract=off so no multiply-add is fused): quantize
// (scale = absmax / 127, q = clamp(rint(x / scale))), then (float(acc) * x_scale) * w_scale + bias, or
// float(acc + quant_bias) * deq_scale.
//
// Small M (decode): our own GEMV over int8 rows; with AVX512-VNNI the u8 x s8 dot product runs on
// (q + 128) and subtracts 128 * sum(w) (exact in int32). Large M (prefill): one quantize pass, at::_int_mm
// (oneDNN; without VNNI exact float32 GEMMs instead: int8_mm_via_float), one rescale pass. AVX512 and AVX2 code
// is compiled with target attributes and chosen at run time, so the library also runs (portable loops) on CPUs
// without them; AVX512 without VNNI takes the scalar int8 dot product.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {


// the widest instruction set the kernels may use: 0 portable loops, 1 AVX2 + FMA, 2 AVX512 (tests lower it to run
// the other paths on one machine; the CPU's own support still applies)
int g_max_isa = 2;

bool cpu_has_avx512() {
  static const bool ok =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok && g_max_isa >= 2;
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && g_max_isa >= 1;
}

bool cpu_has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512vnni");
  return ok && cpu_has_avx512();
}

// ---------------------------------------------------------------------------------------------------------
// quantize rows (dynamic: per row; static: one scale / offset)

// NaN handling as torch's: a NaN absmax gives scale 1 (torch.where(scale > 0, scale, 1)); a NaN value becomes 0.
inline int8_t to_int8_scalar(float v) {
  if (std::isnan(v)) return 0;
  v = std::min(std::max(v, -128.0f), 127.0f);
  return static_cast<int8_t>(static_cast<int32_t>(v));
}

float row_scale_scalar(const float* x, int64_t k) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < k; ++i) {
    float a = std::fabs(x[i]);
    if (std::isnan(a)) nan = true;
    m = std::max(m, a);
  }
  float s = nan ? NAN : m / 127.0f;
  return (s > 0.0f) ? s : 1.0f;
}

void quantize_row_scalar(const float* x, int64_t k, float scale, float offset, int8_t* q) {
  for (int64_t i = 0; i < k; ++i) q[i] = to_int8_scalar(std::nearbyint(x[i] / scale) + offset);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) float row_scale_avx512(const float* x, int64_t k) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  if (i < k) {
    __mmask16 m = (__mmask16)((1u << (k - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  float s = nan ? NAN : _mm512_reduce_max_ps(mx) / 127.0f;
  return (s > 0.0f) ? s : 1.0f;
}

// q = clamp(rint(x / scale) + offset, -128, 127); NaN -> 0 (truncating pack of INT_MIN). Optionally also
// writes u = q + 128 as uint8 for the VNNI dot product.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_row_avx512(
    const float* x, int64_t k, float scale, float offset, int8_t* q, uint8_t* u) {
  const __m512 vs = _mm512_set1_ps(scale), vo = _mm512_set1_ps(offset);
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  const __m128i bias = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < k; i += 16) {
    __mmask16 m = (k - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1u);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    v = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_add_ps(v, vo);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));  // operand order keeps NaN (max/min return the 2nd on NaN)
    __m128i b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));  // NaN -> INT_MIN -> low byte 0
    _mm_mask_storeu_epi8(q + i, m, b);
    if (u) _mm_mask_storeu_epi8(u + i, m, _mm_xor_si128(b, bias));
  }
}

float row_scale(const float* x, int64_t k) {
  return cpu_has_avx512() ? row_scale_avx512(x, k) : row_scale_scalar(x, k);
}

void quantize_row(const float* x, int64_t k, float scale, float offset, int8_t* q, uint8_t* u) {
  if (cpu_has_avx512()) {
    quantize_row_avx512(x, k, scale, offset, q, u);
    return;
  }
  quantize_row_scalar(x, k, scale, offset, q);
  if (u)
    for (int64_t i = 0; i < k; ++i) u[i] = static_cast<uint8_t>(static_cast<int32_t>(q[i]) + 128);
}

// ---------------------------------------------------------------------------------------------------------
// int8 GEMV: acc[m] = sum_k q[m, k] * w_row[k]

void int8_dot_rows_scalar(const int8_t* q, int64_t mrows, const int8_t* wr, int64_t k, int32_t* acc) {
  for (int64_t m = 0; m < mrows; ++m) {
    int32_t s = 0;
    const int8_t* qm = q + m * k;
    for (int64_t i = 0; i < k; ++i) s += static_cast<int32_t>(qm[i]) * static_cast<int32_t>(wr[i]);
    acc[m] = s;
  }
}

// u = q + 128 (uint8). dpbusd(u, w) = sum (q + 128) * w; minus 128 * sum(w) gives sum q * w exactly.
// MB activation rows x NB weight rows per call: MB * NB independent accumulator chains (one chain per output
// would stall on the dpbusd latency).
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void int8_dot_block_vnni(
    const uint8_t* u, const int8_t* w, int64_t k, int32_t* acc /* [MB][NB] */) {
  __m512i a[MB][NB], wsum[NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) a[m][j] = _mm512_setzero_si512();
  for (int j = 0; j < NB; ++j) wsum[j] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < k; i += 64) {
    const __mmask64 mk = (k - i >= 64) ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
    __m512i x[MB];
    for (int m = 0; m < MB; ++m) x[m] = _mm512_maskz_loadu_epi8(mk, u + m * k + i);
    for (int j = 0; j < NB; ++j) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mk, w + j * k + i);
      wsum[j] = _mm512_dpbusd_epi32(wsum[j], ones, wv);
      for (int m = 0; m < MB; ++m) a[m][j] = _mm512_dpbusd_epi32(a[m][j], x[m], wv);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int32_t corr = 128 * _mm512_reduce_add_epi32(wsum[j]);
    for (int m = 0; m < MB; ++m) acc[m * NB + j] = _mm512_reduce_add_epi32(a[m][j]) - corr;
  }
}

// ---------------------------------------------------------------------------------------------------------
// shared W8A8 driver

struct Rescale {
  // dynamic: y = (float(acc) * xs[m]) * ws[n] (+ b[n]);  static: y = float(acc + qb[n]) * dq[n]
  bool dynamic;
  const float* xs;
  const float* ws;
  const float* b;
  const int32_t* qb;
  const float* dq;
  inline float operator()(int32_t acc, int64_t m, int64_t n) const {
    if (dynamic) {
      float y = static_cast<float>(acc) * xs[m];
      y = y * ws[n];
      return b ? y + b[n] : y;
    }
    return static_cast<float>(acc + qb[n]) * dq[n];
  }
};

// one output row of the GEMM path: the same float32 operations as Rescale, 16 columns at a time
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rescale_row_avx512(const Rescale& rs, const int32_t* acc,
                                                                           int64_t m, int64_t n, float* y) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = (n - j >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
    __m512i a = _mm512_maskz_loadu_epi32(mk, acc + j);
    __m512 v;
    if (rs.dynamic) {
      v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(rs.xs[m]));
      v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, rs.ws + j));
      if (rs.b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, rs.b + j));
    } else {
      a = _mm512_add_epi32(a, _mm512_maskz_loadu_epi32(mk, rs.qb + j));
      v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_maskz_loadu_ps(mk, rs.dq + j));
    }
    _mm512_mask_storeu_ps(y + j, mk, v);
  }
}

// rows [m0, m0 + MB) x weight rows [j0, j0 + NB) -> y
template <int MB, int NB>
inline void w8a8_tile(const int8_t* q, const uint8_t* u, int64_t m0, const int8_t* w, int64_t j0, int64_t n,
                      int64_t k, const Rescale& rs, float* y) {
  int32_t acc[MB * NB];
  if (u) {
    int8_dot_block_vnni<MB, NB>(u + m0 * k, w + j0 * k, k, acc);
  } else {
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) int8_dot_rows_scalar(q + (m0 + m) * k, 1, w + (j0 + j) * k, k, &acc[m * NB + j]);
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) y[(m0 + m) * n + j0 + j] = rs(acc[m * NB + j], m0 + m, j0 + j);
}

template <int MB, int NB>
void w8a8_rows(const int8_t* q, const uint8_t* u, int64_t m0, const int8_t* w, int64_t n0, int64_t n1, int64_t n,
               int64_t k, const Rescale& rs, float* y) {
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) w8a8_tile<MB, NB>(q, u, m0, w, j, n, k, rs, y);
  for (; j < n1; ++j) w8a8_tile<MB, 1>(q, u, m0, w, j, n, k, rs, y);
}

// q [M, k] int8 (and u, its +128 uint8 copy when VNNI runs) -> y [M, n]; 4 activation rows at a time, then 1
void w8a8_small(const int8_t* q, const uint8_t* u, int64_t M, const int8_t* w, int64_t n, int64_t k,
                const Rescale& rs, float* y) {
  at::parallel_for(0, n, 32, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) w8a8_rows<4, 4>(q, u, m, w, n0, n1, n, k, rs, y);
    for (; m < M; ++m) w8a8_rows<1, 8>(q, u, m, w, n0, n1, n, k, rs, y);
  });
}

// Per-thread scratch tensors reused across calls (quantized input, its uint8 copy, int32 accumulators): a fresh
// multi-MB buffer per call costs page faults comparable to the rescale itself at 512 rows. Buffers over 16 MiB
// are not kept. They are allocated as normal tensors even under torch.inference_mode: an inference tensor kept
// from such a call could not be written by a later call outside it.
at::Tensor scratch(int slot, at::IntArrayRef shape, at::ScalarType dtype) {
  thread_local at::Tensor buffers[3];
  int64_t numel = 1;
  for (auto d : shape) numel *= d;
  at::Tensor& b = buffers[slot];
  if (numel * static_cast<int64_t>(c10::elementSize(dtype)) > (16 << 20)) return at::empty(shape, at::dtype(dtype));
  if (!b.defined() || b.scalar_type() != dtype || b.numel() < numel) {
    c10::InferenceMode normal(false);
    b = at::empty({numel}, at::dtype(dtype));
  }
  return b.narrow(0, 0, numel).view(shape);
}

void check_w8a8(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, k]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be contiguous int8 [n, k]");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w disagree on k");
  TORCH_CHECK(!x.is_cuda() && !w.is_cuda(), "CPU tensors only");
}

// q [M, k] rows quantized with per-row (scale, offset) from `row_params` (xs[m] = scale when xs is given), and
// u = q + 128 when `up` is given
template <typename RowParams>
void quantize_rows(const float* xp, int64_t M, int64_t k, RowParams row_params, float* xs, int8_t* qp, uint8_t* up) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float s, off;
      row_params(xp + m * k, k, &s, &off);
      if (xs) xs[m] = s;
      quantize_row(xp + m * k, k, s, off, qp + m * k, up ? up + m * k : nullptr);
    }
  });
}

bool small_rows(int64_t M, int64_t k, int64_t n, int64_t small_m) {
  return M <= small_m || k < 2 || n < 2;  // _int_mm mis-reads size-1 dims with odd strides
}

// acc [M, n] int32 = q [M, k] int8 x w [n, k]^T through float32 GEMMs, exactly: every product is at most 2^14 in
// magnitude, so over at most 1024 columns every partial sum is an integer of at most 2^24, which float32 holds
// exactly in any summation order; longer rows add their 1024-column chunks in int32. Used where the CPU has no
// VNNI, on which at::_int_mm (oneDNN) measured 25-35x slower than a float GEMM of the same shape (such CPUs have no
// bf16 matmul units either, so the float32 GEMM computes in float32). The weight is converted one tile (1 MiB of
// float32) at a time.
void int8_mm_via_float(const at::Tensor& q, const at::Tensor& w, at::Tensor& acc) {
  const int64_t M = q.size(0), k = q.size(1), n = w.size(0);
  constexpr int64_t kChunk = 1024;
  const at::Tensor qf = q.to(at::kFloat);
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(n, (1 << 20) / (4 * k) / 16 * 16));
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t j1 = std::min(n, j0 + tile);
    const at::Tensor wf = w.narrow(0, j0, j1 - j0).to(at::kFloat);
    at::Tensor out = acc.narrow(1, j0, j1 - j0);
    for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
      const int64_t c = std::min(kChunk, k - c0);
      const at::Tensor part = at::mm(qf.narrow(1, c0, c), wf.narrow(1, c0, c).t()).to(at::kInt);
      if (c0 == 0)
        out.copy_(part);
      else
        out.add_(part);
    }
  }
}

// quantized rows q [M, k] (and u = q + 128, or nullptr: made here when the VNNI GEMV needs it) -> y [M, n]
at::Tensor w8a8_gemm(const at::Tensor& q, const uint8_t* up, const at::Tensor& w, const Rescale& rs,
                     int64_t small_m) {
  const int64_t M = q.size(0), k = q.size(1), n = w.size(0);
  at::Tensor y = at::empty({M, n}, at::dtype(at::kFloat));
  if (M == 0 || n == 0) return y;
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  if (small_rows(M, k, n, small_m)) {
    if (cpu_has_vnni() && !up) {
      at::Tensor u = scratch(1, {M, k}, at::kByte);
      uint8_t* u8 = u.data_ptr<uint8_t>();
      for (int64_t i = 0; i < M * k; ++i) u8[i] = static_cast<uint8_t>(qp[i]) ^ 0x80;  // q + 128
      up = u8;
    }
    w8a8_small(qp, cpu_has_vnni() ? up : nullptr, M, w.data_ptr<int8_t>(), n, k, rs, yp);
    return y;
  }
  at::Tensor acc = scratch(2, {M, n}, at::kInt);
  if (cpu_has_vnni())
    at::_int_mm_out(acc, q, w.t());
  else
    int8_mm_via_float(q, w, acc);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const bool vec = cpu_has_avx512();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (vec) {
        rescale_row_avx512(rs, ap + m * n, m, n, yp + m * n);
      } else {
        for (int64_t j = 0; j < n; ++j) yp[m * n + j] = rs(ap[m * n + j], m, j);
      }
    }
  });
  return y;
}

// x [M, k] float32 -> y [M, n] float32; per-row (scale, offset) from `row_params`
template <typename RowParams>
at::Tensor w8a8(const at::Tensor& x, const at::Tensor& w, Rescale rs, std::vector<float>& xs, RowParams row_params,
                int64_t small_m) {
  const int64_t M = x.size(0), k = x.size(1), n = w.size(0);
  xs.resize(M);
  const bool vnni = small_rows(M, k, n, small_m) && cpu_has_vnni();
  at::Tensor q = scratch(0, {M, k}, at::kChar);
  at::Tensor u = vnni ? scratch(1, {M, k}, at::kByte) : at::Tensor();
  uint8_t* up = vnni ? u.data_ptr<uint8_t>() : nullptr;
  quantize_rows(x.data_ptr<float>(), M, k, row_params, xs.data(), q.data_ptr<int8_t>(), up);
  rs.xs = xs.data();
  return w8a8_gemm(q, up, w, rs, small_m);
}

Rescale dynamic_rescale(const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n,
              "w_scale must be contiguous float32 with n elements");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be contiguous float32 [n]");
    bp = bias->data_ptr<float>();
  }
  return Rescale{true, nullptr, w_scale.data_ptr<float>(), bp, nullptr, nullptr};
}

Rescale static_rescale(const at::Tensor& deq_scale, const at::Tensor& quant_bias, int64_t n) {
  TORCH_CHECK(deq_scale.scalar_type() == at::kFloat && deq_scale.is_contiguous() && deq_scale.numel() == n,
              "deq_scale must be contiguous float32 [n]");
  TORCH_CHECK(quant_bias.scalar_type() == at::kInt && quant_bias.is_contiguous() && quant_bias.numel() == n,
              "quant_bias must be contiguous int32 [n]");
  return Rescale{false, nullptr, nullptr, nullptr, quant_bias.data_ptr<int32_t>(), deq_scale.data_ptr<float>()};
}

void dynamic_row_params(const float* row, int64_t k, float* s, float* off) {
  *s = row_scale(row, k);
  *off = 0.0f;
}

struct StaticRowParams {
  float s, off;
  void operator()(const float*, int64_t, float* ps, float* poff) const {
    *ps = s;
    *poff = off;
  }
};

at::Tensor w8a8_dynamic_2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const c10::optional<at::Tensor>& bias, int64_t small_m) {
  check_w8a8(x, w);
  std::vector<float> xs;
  return w8a8(x, w, dynamic_rescale(w_scale, bias, w.size(0)), xs, dynamic_row_params, small_m);
}

at::Tensor w8a8_static_2d(const at::Tensor& x, double input_scale, double input_offset, const at::Tensor& w,
                          const at::Tensor& deq_scale, const at::Tensor& quant_bias, int64_t small_m) {
  check_w8a8(x, w);
  std::vector<float> xs;
  StaticRowParams params{static_cast<float>(input_scale), static_cast<float>(input_offset)};
  return w8a8(x, w, static_rescale(deq_scale, quant_bias, w.size(0)), xs, params, small_m);
}

// ---------------------------------------------------------------------------------------------------------
// producers of quantized rows for the W8A8 layers that read them (slimquant.nn.fused): the float op before a
// W8A8 layer writes its int8 input directly. q [M, k] int8, xs [M] float32 (dynamic) or empty (static).

void check_quantized(const at::Tensor& q, const at::Tensor& w) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 [M, k]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "w must be contiguous int8 [n, k]");
  TORCH_CHECK(q.size(1) == w.size(1), "q and w disagree on k");
}

at::Tensor w8a8_dynamic_q(const at::Tensor& q, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& w_scale,
                          const c10::optional<at::Tensor>& bias, int64_t small_m) {
  RECORD_FUNCTION("slimquant::w8a8_dynamic_q", std::vector<c10::IValue>());
  check_quantized(q, w);
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xs.is_contiguous() && xs.numel() == q.size(0),
              "xs must be contiguous float32 [M]");
  Rescale rs = dynamic_rescale(w_scale.reshape({-1}).contiguous(), bias, w.size(0));
  rs.xs = xs.data_ptr<float>();
  return w8a8_gemm(q, nullptr, w, rs, small_m);
}

at::Tensor w8a8_static_q(const at::Tensor& q, const at::Tensor& w, const at::Tensor& deq_scale,
                         const at::Tensor& quant_bias, int64_t small_m) {
  RECORD_FUNCTION("slimquant::w8a8_static_q", std::vector<c10::IValue>());
  check_quantized(q, w);
  return w8a8_gemm(q, nullptr, w, static_rescale(deq_scale, quant_bias, w.size(0)), small_m);
}

// q of the rows `row` fills with float32 values (in a per-thread buffer of k floats): dynamic per-row scale
// (xs) or the static (scale, offset)
template <typename FillRow>
std::vector<at::Tensor> quantize_produced(int64_t M, int64_t k, const c10::optional<at::Tensor>& input_scale,
                                          const c10::optional<at::Tensor>& input_offset, FillRow fill_row,
                                          float* keep /* [M, k] float32 copy of the rows, or nullptr */) {
  const bool is_static = input_scale.has_value() && input_scale->defined();
  TORCH_CHECK(is_static == (input_offset.has_value() && input_offset->defined()),
              "input_scale and input_offset come together");
  float s = 1.0f, off = 0.0f;
  if (is_static) {
    TORCH_CHECK(input_scale->numel() == 1 && input_offset->numel() == 1, "input_scale / input_offset: one value each");
    s = input_scale->to(at::kFloat).item<float>();
    off = input_offset->to(at::kFloat).item<float>();
  }
  at::Tensor q = at::empty({M, k}, at::dtype(at::kChar));
  at::Tensor xs = at::empty({is_static ? 0 : M}, at::dtype(at::kFloat));
  int8_t* qp = q.data_ptr<int8_t>();
  float* xsp = is_static ? nullptr : xs.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(keep ? 0 : k);
    for (int64_t m = m0; m < m1; ++m) {
      float* row = keep ? keep + m * k : buf.data();
      fill_row(m, row);
      float rs = s;
      if (!is_static) rs = xsp[m] = row_scale(row, k);
      quantize_row(row, k, rs, off, qp + m * k, nullptr);
    }
  });
  return {q, xs};
}

// RMSNorm as Llama's in float32: y = weight * (x * (1 / sqrt(mean(x^2) + eps)))
__attribute__((target("avx512f,avx512bw,avx512vl"))) void rmsnorm_row_avx512(const float* x, const float* w,
                                                                           int64_t k, float eps, float* y) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = (k - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(k) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = (k - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), vr);
    _mm512_mask_storeu_ps(y + i, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, w + i), v));
  }
}

void rmsnorm_row_scalar(const float* x, const float* w, int64_t k, float eps, float* y) {
  double acc = 0.0;
  for (int64_t i = 0; i < k; ++i) acc += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(acc / static_cast<double>(k)) + eps);
  for (int64_t i = 0; i < k; ++i) y[i] = w[i] * (x[i] * r);
}

__attribute__((target("avx2,fma"))) void rmsnorm_row_avx2(const float* x, const float* w, int64_t k, float eps,
                                                          float* y) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
  }
  for (; i + 8 <= k; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc0 = _mm256_fmadd_ps(v, v, acc0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  float sum = 0.0f;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  for (int64_t t = i; t < k; ++t) sum += x[t] * x[t];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(x + j), vr)));
  for (; j < k; ++j) y[j] = w[j] * (x[j] * r);
}

// one row of the RMSNorm on the widest code path this CPU (and set_max_isa) allows
void rmsnorm_row(const float* x, const float* w, int64_t k, float eps, float* y) {
  if (cpu_has_avx512())
    rmsnorm_row_avx512(x, w, k, eps, y);
  else if (cpu_has_avx2())
    rmsnorm_row_avx2(x, w, k, eps, y);
  else
    rmsnorm_row_scalar(x, w, k, eps, y);
}

// the checked arguments of the RMSNorm kernels: x as contiguous [M, k] rows
at::Tensor rmsnorm_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "x must be float32 [..., k]");
  TORCH_CHECK(!x.is_cuda(), "CPU tensors only");
  const int64_t k = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == k,
              "weight must be contiguous float32 [k]");
  return x.reshape({-1, k}).contiguous();
}

// Llama's RMSNorm in float32 alone (the float output of rmsnorm_quant without its int8 rows), rows in parallel
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  RECORD_FUNCTION("slimquant::rmsnorm", std::vector<c10::IValue>());
  const at::Tensor x2 = rmsnorm_rows(x, weight);
  const int64_t M = x2.size(0), k = x2.size(1);
  at::Tensor y = at::empty(x.sizes(), at::dtype(at::kFloat));
  const float *xp = x2.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rmsnorm_row(xp + m * k, wp, k, e, yp + m * k);
  });
  return y;
}

std::vector<at::Tensor> rmsnorm_quant(const at::Tensor& x, const at::Tensor& weight, double eps,
                                      const c10::optional<at::Tensor>& input_scale,
                                      const c10::optional<at::Tensor>& input_offset) {
  RECORD_FUNCTION("slimquant::rmsnorm_quant", std::vector<c10::IValue>());
  const at::Tensor x2 = rmsnorm_rows(x, weight);
  const int64_t M = x2.size(0), k = x2.size(1);
  at::Tensor y = at::empty(x.sizes(), at::dtype(at::kFloat));
  const float *xp = x2.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  auto fill = [&](int64_t m, float* row) { rmsnorm_row(xp + m * k, wp, k, e, row); };
  std::vector<at::Tensor> out = quantize_produced(M, k, input_scale, input_offset, fill, y.data_ptr<float>());
  return {y, out[0], out[1]};
}

// exp(x) in float32, ~1 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, times 2^n)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-87.3365447504f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// h = silu(g) * u = g / (1 + exp(-g)) * u, as torch's F.silu(g) * u
__attribute__((target("avx512f,avx512bw,avx512vl"))) void silu_mul_row_avx512(const float* g, const float* u,
                                                                            int64_t k, float* h) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = (k - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - i)) - 1u);
    const __m512 vg = _mm512_maskz_loadu_ps(mk, g + i);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), vg));
    const __m512 s = _mm512_div_ps(vg, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(h + i, mk, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mk, u + i)));
  }
}

void silu_mul_row_scalar(const float* g, const float* u, int64_t k, float* h) {
  for (int64_t i = 0; i < k; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// exp_avx512's steps in AVX2 + FMA; 2^n built in the exponent field as 2^(n - 1) * 2 (n reaches 128 at the top
// of the clamp, one past the largest exponent; at the bottom, n = -126, it gives 0 instead of ~1.2e-38)
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.3365447504f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
}

__attribute__((target("avx2,fma"))) void silu_mul_row_avx2(const float* g, const float* u, int64_t k, float* h) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 vg = _mm256_loadu_ps(g + i);
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), vg));
    const __m256 s = _mm256_div_ps(vg, _mm256_add_ps(one, e));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  if (i < k) silu_mul_row_scalar(g + i, u + i, k - i, h + i);
}

// h[0:k] = silu(g) * u on the widest loops the CPU has
void silu_mul_row(const float* g, const float* u, int64_t k, float* h) {
  if (cpu_has_avx512())
    silu_mul_row_avx512(g, u, k, h);
  else if (cpu_has_avx2())
    silu_mul_row_avx2(g, u, k, h);
  else
    silu_mul_row_scalar(g, u, k, h);
}

std::vector<at::Tensor> silu_mul_quant(const at::Tensor& g, const at::Tensor& u,
                                       const c10::optional<at::Tensor>& input_scale,
                                       const c10::optional<at::Tensor>& input_offset) {
  RECORD_FUNCTION("slimquant::silu_mul_quant", std::vector<c10::IValue>());
  TORCH_CHECK(g.dim() >= 1 && g.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && g.sizes() == u.sizes(),
              "g and u must be float32 tensors of one shape [..., k]");
  const int64_t k = g.size(-1);
  at::Tensor g2 = g.reshape({-1, k}).contiguous(), u2 = u.reshape({-1, k}).contiguous();
  const float *gp = g2.data_ptr<float>(), *upp = u2.data_ptr<float>();
  auto fill = [&](int64_t m, float* row) { silu_mul_row(gp + m * k, upp + m * k, k, row); };
  return quantize_produced(g2.size(0), k, input_scale, input_offset, fill, nullptr);
}

// ---------------------------------------------------------------------------------------------------------
// W8A16: y[m, j] = sum_g scale[j, g] * (sum_{i in g} x[m, i] * q[j, i] + offset[j, g] * sum_{i in g} x[m, i]) + b[j]

// MB activation rows x NB weight rows; gs % 16 == 0 or G == 1 (masked tail). sc / of: weight row j0's [NB, G]
// block (row stride G); xg: the activation rows' per-group sums [MB, G]
template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void w8a16_block_avx512(
    const float* x, const int8_t* w, int64_t k, int64_t gs, int64_t G, const float* sc, const float* of,
    const float* xg, float* out /* [MB][NB] */) {
  __m512 tot[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) tot[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 a[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) a[m][j] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * gs;
    for (int64_t i = g * gs; i < end; i += 16) {
      const __mmask16 mk = (end - i >= 16) ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - i)) - 1u);
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, x + m * k + i);
      for (int j = 0; j < NB; ++j) {
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w + j * k + i)));
        for (int m = 0; m < MB; ++m) a[m][j] = _mm512_fmadd_ps(xv[m], wv, a[m][j]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m512 vs = _mm512_set1_ps(sc[j * G + g]);
      for (int m = 0; m < MB; ++m) {
        if (of)  // offset * sum(x over the group), in lane 0 (the lanes are summed at the end)
          a[m][j] = _mm512_add_ps(a[m][j], _mm512_maskz_mov_ps(1, _mm512_set1_ps(of[j * G + g] * xg[m * G + g])));
        tot[m][j] = _mm512_fmadd_ps(a[m][j], vs, tot[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = _mm512_reduce_add_ps(tot[m][j]);
}

__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the AVX2 loop of w8a16_block_avx512: gs % 8 == 0 (G == 1: k % 8 == 0)
template <int MB, int NB>
__attribute__((target("avx2,fma"))) inline void w8a16_block_avx2(
    const float* x, const int8_t* w, int64_t k, int64_t gs, int64_t G, const float* sc, const float* of,
    const float* xg, float* out /* [MB][NB] */) {
  __m256 tot[MB][NB];
  float corr[MB][NB] = {};
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) tot[m][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) a[m][j] = _mm256_setzero_ps();
    const int64_t end = (g + 1) * gs;
    for (int64_t i = g * gs; i < end; i += 8) {
      __m256 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * k + i);
      for (int j = 0; j < NB; ++j) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * k + i));
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        for (int m = 0; m < MB; ++m) a[m][j] = _mm256_fmadd_ps(xv[m], wv, a[m][j]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float s = sc[j * G + g];
      const __m256 vs = _mm256_set1_ps(s);
      for (int m = 0; m < MB; ++m) {
        if (of) corr[m][j] += s * (of[j * G + g] * xg[m * G + g]);
        tot[m][j] = _mm256_fmadd_ps(a[m][j], vs, tot[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = hsum_avx2(tot[m][j]) + corr[m][j];
}

template <int MB, int NB>
void w8a16_block_scalar(const float* x, const int8_t* w, int64_t k, int64_t gs, int64_t G, const float* sc,
                        const float* of, const float* xg, float* out) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      float total = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t i = g * gs; i < (g + 1) * gs; ++i) s += x[m * k + i] * static_cast<float>(w[j * k + i]);
        if (of) s += of[j * G + g] * xg[m * G + g];
        total += sc[j * G + g] * s;
      }
      out[m * NB + j] = total;
    }
}

struct W8A16Args {
  const float* x;
  const int8_t* w;
  const float* sc;
  const float* of;
  const float* xg;
  const float* b;
  float* y;
  int64_t n, k, gs, G;
  int isa;  // 2 AVX512, 1 AVX2, 0 portable
};

template <int MB, int NB>
inline void w8a16_tile(const W8A16Args& a, int64_t m0, int64_t j0) {
  float out[MB * NB];
  const float* x = a.x + m0 * a.k;
  const int8_t* w = a.w + j0 * a.k;
  const float* sc = a.sc + j0 * a.G;
  const float* of = a.of ? a.of + j0 * a.G : nullptr;
  const float* xg = a.of ? a.xg + m0 * a.G : nullptr;
  if (a.isa == 2)
    w8a16_block_avx512<MB, NB>(x, w, a.k, a.gs, a.G, sc, of, xg, out);
  else if (a.isa == 1)
    w8a16_block_avx2<MB, NB>(x, w, a.k, a.gs, a.G, sc, of, xg, out);
  else
    w8a16_block_scalar<MB, NB>(x, w, a.k, a.gs, a.G, sc, of, xg, out);
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      const float v = out[m * NB + j];
      a.y[(m0 + m) * a.n + j0 + j] = a.b ? v + a.b[j0 + j] : v;
    }
}

template <int MB, int NB>
void w8a16_rows(const W8A16Args& a, int64_t m0, int64_t n0, int64_t n1) {
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) w8a16_tile<MB, NB>(a, m0, j);
  for (; j < n1; ++j) w8a16_tile<MB, 1>(a, m0, j);
}

at::Tensor w8a16_2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias) {
  check_w8a8(x, w);
  const int64_t M = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale must be contiguous float32 [n, G]");
  const int64_t G = scale.size(1);
  TORCH_CHECK(G >= 1 && k % G == 0, "k must be a multiple of the number of groups");
  const int64_t gs = k / G;
  const float* op = nullptr;
  if (offset.has_value() && offset->defined()) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == at::kFloat && offset->is_contiguous(),
                "offset must be contiguous float32 like scale");
    op = offset->data_ptr<float>();
  }
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be contiguous float32 [n]");
    bp = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  const float* xp = x.data_ptr<float>();
  // per-row per-group sums of x (only needed with offsets)
  std::vector<float> xg(op ? M * G : 0);
  if (op)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t i = g * gs; i < (g + 1) * gs; ++i) s += xp[m * k + i];
        xg[m * G + g] = s;
      }
  const int isa = (cpu_has_avx512() && (G == 1 || gs % 16 == 0)) ? 2 : (cpu_has_avx2() && gs % 8 == 0) ? 1 : 0;
  W8A16Args args{xp, w.data_ptr<int8_t>(), scale.data_ptr<float>(), op, xg.data(), bp, y.data_ptr<float>(),
                 n, k, gs, G, isa};
  at::parallel_for(0, n, 32, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) w8a16_rows<4, 2>(args, m, n0, n1);
    for (; m < M; ++m) w8a16_rows<1, 8>(args, m, n0, n1);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// W4A16: 4-bit weights packed two per byte as slimquant.math.packing writes them (byte i of a row: element 2i in
// the low nibble, 2i + 1 in the high one, u = q - qmin in [0, 16)), float32 inputs, per-channel or per-group
// scales and optional float zero points: W[j, i] = (u + qmin - zp[j, g]) * scale[j, g].
//   GEMV (few rows): y[m, j] = sum_g scale[j, g] * (sum_{i in g} x[m, i] * u[j, i] + (qmin - zp[j, g]) * xg[m, g])
//     with xg the per-group sums of x; the vector loops read x with each 32-column chunk reordered as its 16 even
//     then its 16 odd columns (done once per call), so a chunk's low nibbles meet x[0:16] and its high ones
//     x[16:32] without shuffling the weight
//   GEMM (more rows): per tile of weight rows, the tile's float weight (the reference's float32 operations, so the
//     same bits) goes to a buffer of at most g_w4_tile_bytes (2 MiB; a smaller layer is one tile, and a row of
//     more than 32768 columns still makes 16-row tiles), and at::mm multiplies it

struct W4Args {
  const float* x;   // [M, k] as given
  const float* xr;  // [M, k] chunk-reordered (vector loops)
  const uint8_t* w;
  const float* sc;
  const float* zp;  // nullptr: no zero point
  const float* xg;  // [M, G]
  const float* b;
  float* y;
  float qmin;
  int64_t n, k, kb, gs, G;
  int isa;
};

inline float w4_offset(const W4Args& a, int64_t j, int64_t g) { return a.zp ? a.qmin - a.zp[j * a.G + g] : a.qmin; }

template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void w4a16_block_avx512(const W4Args& a, int64_t m0,
                                                                                   int64_t j0, float* out) {
  __m512 tot[MB][NB];
  float corr[MB][NB] = {};
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) tot[m][j] = _mm512_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < a.G; ++g) {
    __m512 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t i = g * a.gs; i < (g + 1) * a.gs; i += 32) {
      __m512 x0[MB], x1[MB];
      for (int m = 0; m < MB; ++m) {
        x0[m] = _mm512_loadu_ps(a.xr + (m0 + m) * a.k + i);
        x1[m] = _mm512_loadu_ps(a.xr + (m0 + m) * a.k + i + 16);
      }
      for (int j = 0; j < NB; ++j) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + (j0 + j) * a.kb + i / 2));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
        for (int m = 0; m < MB; ++m) acc[m][j] = _mm512_fmadd_ps(x1[m], hi, _mm512_fmadd_ps(x0[m], lo, acc[m][j]));
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float s = a.sc[(j0 + j) * a.G + g], off = w4_offset(a, j0 + j, g);
      for (int m = 0; m < MB; ++m) {
        corr[m][j] += s * (off * a.xg[(m0 + m) * a.G + g]);
        tot[m][j] = _mm512_fmadd_ps(acc[m][j], _mm512_set1_ps(s), tot[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = _mm512_reduce_add_ps(tot[m][j]) + corr[m][j];
}

template <int MB, int NB>
__attribute__((target("avx2,fma"))) inline void w4a16_block_avx2(const W4Args& a, int64_t m0, int64_t j0,
                                                                 float* out) {
  __m256 tot[MB][NB];
  float corr[MB][NB] = {};
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) tot[m][j] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 acc[MB][NB];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t i = g * a.gs; i < (g + 1) * a.gs; i += 32) {
      for (int j = 0; j < NB; ++j) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.w + (j0 + j) * a.kb + i / 2));
        const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int m = 0; m < MB; ++m) {
          const float* xm = a.xr + (m0 + m) * a.k + i;
          __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w0, acc[m][j]);
          t = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w1, t);
          t = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w2, t);
          acc[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w3, t);
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float s = a.sc[(j0 + j) * a.G + g], off = w4_offset(a, j0 + j, g);
      for (int m = 0; m < MB; ++m) {
        corr[m][j] += s * (off * a.xg[(m0 + m) * a.G + g]);
        tot[m][j] = _mm256_fmadd_ps(acc[m][j], _mm256_set1_ps(s), tot[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) out[m * NB + j] = hsum_avx2(tot[m][j]) + corr[m][j];
}

template <int MB, int NB>
void w4a16_block_scalar(const W4Args& a, int64_t m0, int64_t j0, float* out) {
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      const float* x = a.x + (m0 + m) * a.k;
      const uint8_t* w = a.w + (j0 + j) * a.kb;
      float total = 0.0f;
      for (int64_t g = 0; g < a.G; ++g) {
        float s = 0.0f;
        for (int64_t i = g * a.gs; i < (g + 1) * a.gs; ++i)
          s += x[i] * static_cast<float>((w[i >> 1] >> ((i & 1) * 4)) & 0x0F);
        s += w4_offset(a, j0 + j, g) * a.xg[(m0 + m) * a.G + g];
        total += a.sc[(j0 + j) * a.G + g] * s;
      }
      out[m * NB + j] = total;
    }
}

template <int MB, int NB>
inline void w4a16_tile(const W4Args& a, int64_t m0, int64_t j0) {
  float out[MB * NB];
  if (a.isa == 2)
    w4a16_block_avx512<MB, NB>(a, m0, j0, out);
  else if (a.isa == 1)
    w4a16_block_avx2<MB, NB>(a, m0, j0, out);
  else
    w4a16_block_scalar<MB, NB>(a, m0, j0, out);
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      const float v = out[m * NB + j];
      a.y[(m0 + m) * a.n + j0 + j] = a.b ? v + a.b[j0 + j] : v;
    }
}

template <int MB, int NB>
void w4a16_rows(const W4Args& a, int64_t m0, int64_t n0, int64_t n1) {
  int64_t j = n0;
  for (; j + NB <= n1; j += NB) w4a16_tile<MB, NB>(a, m0, j);
  for (; j < n1; ++j) w4a16_tile<MB, 1>(a, m0, j);
}

// float weight rows [j0, j1) into out [j1 - j0, k]: ((u + qmin) - zp) * scale, the reference's float32 steps
__attribute__((target("avx2,fma"))) void w4_dequant_rows_avx2(const W4Args& a, int64_t j0, int64_t j1, float* out) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256 vq = _mm256_set1_ps(a.qmin);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* w = a.w + j * a.kb;
    float* o = out + (j - j0) * a.k;
    for (int64_t g = 0; g < a.G; ++g) {
      const __m256 vs = _mm256_set1_ps(a.sc[j * a.G + g]);
      const __m256 vz = _mm256_set1_ps(a.zp ? a.zp[j * a.G + g] : 0.0f);
      for (int64_t i = g * a.gs; i < (g + 1) * a.gs; i += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2));
        const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m128i e0 = _mm_unpacklo_epi8(lo, hi), e1 = _mm_unpackhi_epi8(lo, hi);  // columns i..i+15, i+16..
        const __m128i parts[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
        for (int p = 0; p < 4; ++p) {
          __m256 v = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), vq);
          if (a.zp) v = _mm256_sub_ps(v, vz);
          _mm256_storeu_ps(o + i + 8 * p, _mm256_mul_ps(v, vs));
        }
      }
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void w4_dequant_rows_avx512(const W4Args& a, int64_t j0,
                                                                                int64_t j1, float* out) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m512 vq = _mm512_set1_ps(a.qmin);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* w = a.w + j * a.kb;
    float* o = out + (j - j0) * a.k;
    for (int64_t g = 0; g < a.G; ++g) {
      const __m512 vs = _mm512_set1_ps(a.sc[j * a.G + g]);
      const __m512 vz = _mm512_set1_ps(a.zp ? a.zp[j * a.G + g] : 0.0f);
      for (int64_t i = g * a.gs; i < (g + 1) * a.gs; i += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2));
        const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m128i parts[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int p = 0; p < 2; ++p) {
          __m512 v = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[p])), vq);
          if (a.zp) v = _mm512_sub_ps(v, vz);
          _mm512_storeu_ps(o + i + 16 * p, _mm512_mul_ps(v, vs));
        }
      }
    }
  }
}

void w4_dequant_rows_scalar(const W4Args& a, int64_t j0, int64_t j1, float* out) {
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* w = a.w + j * a.kb;
    float* o = out + (j - j0) * a.k;
    for (int64_t g = 0; g < a.G; ++g) {
      const float s = a.sc[j * a.G + g], z = a.zp ? a.zp[j * a.G + g] : 0.0f;
      for (int64_t i = g * a.gs; i < (g + 1) * a.gs; ++i) {
        float v = static_cast<float>((w[i >> 1] >> ((i & 1) * 4)) & 0x0F) + a.qmin;
        if (a.zp) v = v - z;
        o[i] = v * s;
      }
    }
  }
}

void w4_dequant_rows(const W4Args& a, int64_t j0, int64_t j1, float* out) {
  if (a.isa == 2)
    w4_dequant_rows_avx512(a, j0, j1, out);
  else if (a.isa == 1)
    w4_dequant_rows_avx2(a, j0, j1, out);
  else
    w4_dequant_rows_scalar(a, j0, j1, out);
}

// the float weight tile of the GEMM path (the most float weight that exists at a time; a smaller layer is one
// tile): at 512 rows on smollm2's shapes, 2 threads, A/B over 120 alternations, 2 MiB ran 0-3% faster than 1 MiB
// and 4 MiB no faster than 2 MiB (benchmarks/int8_kernels.py prints the tile sizes side by side)
int64_t g_w4_tile_bytes = 2 * 1024 * 1024;

// columns per tile of the GEMM path: equal tiles, multiples of 16 columns, each holding at most g_w4_tile_bytes
// of float weight for `parts` weights side by side (a short last tile ran up to 1.6x slower per column); rows so
// long that 16 of them exceed the budget still get 16-row tiles
int64_t w4_tile_cols(int64_t n, int64_t k, int64_t parts) {
  const int64_t cap = std::max<int64_t>(16, g_w4_tile_bytes / (4 * std::max<int64_t>(k, 1) * parts) / 16 * 16);
  const int64_t tiles = (n + cap - 1) / cap;
  return std::min(n, ((n + tiles - 1) / tiles + 15) / 16 * 16);
}

// the checked arguments of one packed weight (y, xr, xg filled in by the caller)
W4Args w4_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
               const c10::optional<at::Tensor>& zero_point, double qmin, int64_t k,
               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, k]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 [n, kb]");
  TORCH_CHECK(!x.is_cuda() && !w.is_cuda(), "CPU tensors only");
  TORCH_CHECK(x.size(1) == k && w.size(1) * 2 >= k, "x and w disagree on k");
  const int64_t n = w.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale must be contiguous float32 [n, G]");
  const int64_t G = scale.size(1);
  TORCH_CHECK(G >= 1 && k % G == 0, "k must be a multiple of the number of groups");
  const int64_t gs = k / G;
  const float* zp = nullptr;
  if (zero_point.has_value() && zero_point->defined()) {
    TORCH_CHECK(zero_point->sizes() == scale.sizes() && zero_point->scalar_type() == at::kFloat &&
                    zero_point->is_contiguous(),
                "zero_point must be contiguous float32 like scale");
    zp = zero_point->data_ptr<float>();
  }
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "bias must be contiguous float32 [n]");
    bp = bias->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  const int isa = gs % 32 ? 0 : cpu_has_avx512() ? 2 : cpu_has_avx2() ? 1 : 0;
  return W4Args{xp, xp, w.data_ptr<uint8_t>(), scale.data_ptr<float>(), zp, nullptr, bp, nullptr,
                static_cast<float>(qmin), n, k, w.size(1), gs, G, isa};
}

// the float weight rows of tile [j0, j0 + t) of each weight in `parts`, stacked into buf [parts * t, k]; rows
// dequantized in parallel
void w4_dequant_tile(const std::vector<const W4Args*>& parts, int64_t j0, int64_t t, float* buf) {
  const int64_t k = parts[0]->k, P = static_cast<int64_t>(parts.size());
  at::parallel_for(0, P * t, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t p = r0 / t; p < P && p * t < r1; ++p) {
      const int64_t s0 = std::max(r0, p * t), s1 = std::min(r1, (p + 1) * t);
      w4_dequant_rows(*parts[p], j0 + s0 - p * t, j0 + s1 - p * t, buf + s0 * k);
    }
  });
}

at::Tensor w4a16_2d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& zero_point, double qmin, int64_t k,
                    const c10::optional<at::Tensor>& bias, int64_t gemv_max_rows) {
  W4Args a = w4_args(x, w, scale, zero_point, qmin, k, bias);
  const int64_t M = x.size(0), n = a.n, G = a.G, gs = a.gs;
  const int isa = a.isa;
  const float* xp = a.x;
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;
  a.y = y.data_ptr<float>();
  if (M > gemv_max_rows) {  // GEMM: float tiles of the weight, at::mm each
    const int64_t tile = w4_tile_cols(n, k, 1);
    // one tile at a time: its rows dequantized in parallel, then at::mm on all threads (one tile per thread with
    // single-threaded at::mm measured up to 1.3x slower on two cores)
    at::Tensor buf = at::empty({tile, k}, x.options());
    float* tp = buf.data_ptr<float>();
    for (int64_t j0 = 0; j0 < n; j0 += tile) {
      const int64_t j1 = std::min(n, j0 + tile);
      w4_dequant_tile({&a}, j0, j1 - j0, tp);
      at::Tensor out = y.narrow(1, j0, j1 - j0);  // [M, tile] with row stride n: BLAS writes it in place
      at::mm_out(out, x, buf.narrow(0, 0, j1 - j0).t());
    }
    if (a.b) y.add_(*bias);
    return y;
  }
  // GEMV: per-group sums of x, and x reordered per 32-column chunk for the vector loops
  std::vector<float> xg(M * G), xr(isa ? M * k : 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp + m * k;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) s += xm[i];
      xg[m * G + g] = s;
    }
    if (isa)
      for (int64_t c = 0; c < k; c += 32)
        for (int64_t t = 0; t < 16; ++t) {
          xr[m * k + c + t] = xm[c + 2 * t];
          xr[m * k + c + 16 + t] = xm[c + 2 * t + 1];
        }
  }
  a.xg = xg.data();
  if (isa) a.xr = xr.data();
  at::parallel_for(0, n, 32, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) w4a16_rows<4, 1>(a, m, n0, n1);
    for (; m < M; ++m) {
      if (isa == 2)
        w4a16_rows<1, 8>(a, m, n0, n1);
      else
        w4a16_rows<1, 4>(a, m, n0, n1);
    }
  });
  return y;
}

// h = silu(x Wg^T + bg) * (x Wu^T + bu), a gated MLP's hidden rows from its packed 4-bit gate and up weights
// (same n and k). GEMM: per tile of columns the gate's and the up's float weight rows side by side in one buffer,
// one at::mm for both, then silu * up into h while the tile's products are in cache (neither product is ever
// written whole, and at most a tile of float weight exists at a time); GEMV: the two nibble GEMVs, then silu * up.
at::Tensor w4a16_gated_2d(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& sg,
                          const c10::optional<at::Tensor>& zg, double qg, const c10::optional<at::Tensor>& bg,
                          const at::Tensor& wu, const at::Tensor& su, const c10::optional<at::Tensor>& zu, double qu,
                          const c10::optional<at::Tensor>& bu, int64_t k, int64_t gemv_max_rows) {
  TORCH_CHECK(wg.dim() == 2 && wu.dim() == 2 && wg.size(0) == wu.size(0), "gate and up must have the same rows, not ",
              wg.sizes(), " and ", wu.sizes());
  const int64_t M = x.size(0), n = wg.size(0);
  at::Tensor h = at::empty({M, n}, x.options());
  float* hp = h.data_ptr<float>();
  if (M <= gemv_max_rows) {
    const at::Tensor g = w4a16_2d(x, wg, sg, zg, qg, k, bg, gemv_max_rows);
    const at::Tensor u = w4a16_2d(x, wu, su, zu, qu, k, bu, gemv_max_rows);
    const float *gp = g.data_ptr<float>(), *upp = u.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) silu_mul_row(gp + m * n, upp + m * n, n, hp + m * n);
    return h;
  }
  const W4Args ag = w4_args(x, wg, sg, zg, qg, k, bg), au = w4_args(x, wu, su, zu, qu, k, bu);
  if (n == 0) return h;
  const int64_t tile = w4_tile_cols(n, k, 2);
  at::Tensor buf = at::empty({2 * tile, k}, x.options()), prod = at::empty({M, 2 * tile}, x.options());
  float *tp = buf.data_ptr<float>(), *pp = prod.data_ptr<float>();
  for (int64_t j0 = 0; j0 < n; j0 += tile) {
    const int64_t t = std::min(n, j0 + tile) - j0;
    w4_dequant_tile({&ag, &au}, j0, t, tp);
    at::Tensor out = prod.narrow(1, 0, 2 * t);  // [M, 2t], row stride 2 * tile: gate columns, then up columns
    at::mm_out(out, x, buf.narrow(0, 0, 2 * t).t());
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float *g = pp + m * 2 * tile, *u = g + t;
        if (ag.b)
          for (int64_t i = 0; i < t; ++i) g[i] += ag.b[j0 + i];
        if (au.b)
          for (int64_t i = 0; i < t; ++i) u[i] += au.b[j0 + i];
        silu_mul_row(g, u, t, hp + m * n + j0);
      }
    });
  }
  return h;
}

// ---------------------------------------------------------------------------------------------------------
// entry points: any leading dims and float dtype in (computed in float32, returned in x's dtype), scales and
// biases of any float dtype; the conversions are no-ops for float32 contiguous tensors, and doing them here
// instead of in Python saves ~10 us per call at one token

struct Rows {
  at::Tensor x2;                   // [M, k] float32 contiguous
  std::vector<int64_t> out_shape;  // [..., n]
  at::ScalarType dtype;
};

Rows rows_of(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "x must be [..., k] and w [n, k]");
  TORCH_CHECK(x.is_floating_point(), "x must be a float tensor");
  const int64_t k = x.size(-1);
  TORCH_CHECK(k == w.size(1), "x has ", k, " features but the weight has ", w.size(1));
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return {x.reshape({M, k}).to(at::kFloat).contiguous(), shape, x.scalar_type()};
}

at::Tensor f32_vector(const at::Tensor& t) { return t.reshape({-1}).to(at::kFloat).contiguous(); }

c10::optional<at::Tensor> f32_optional(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return f32_vector(*t);
}

at::Tensor finish(const at::Tensor& y, const Rows& r) { return y.view(r.out_shape).to(r.dtype); }

at::Tensor w8a8_dynamic(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                        const c10::optional<at::Tensor>& bias, int64_t small_m) {
  RECORD_FUNCTION("slimquant::w8a8_dynamic", std::vector<c10::IValue>());  // a named range in torch.profiler
  Rows r = rows_of(x, w);
  return finish(w8a8_dynamic_2d(r.x2, w.contiguous(), f32_vector(w_scale), f32_optional(bias), small_m), r);
}

at::Tensor w8a8_static(const at::Tensor& x, const at::Tensor& input_scale, const at::Tensor& input_offset,
                       const at::Tensor& w, const at::Tensor& deq_scale, const at::Tensor& quant_bias,
                       int64_t small_m) {
  RECORD_FUNCTION("slimquant::w8a8_static", std::vector<c10::IValue>());
  TORCH_CHECK(input_scale.numel() == 1 && input_offset.numel() == 1, "input_scale / input_offset: one value each");
  Rows r = rows_of(x, w);
  const float s = input_scale.to(at::kFloat).item<float>(), off = input_offset.to(at::kFloat).item<float>();
  return finish(w8a8_static_2d(r.x2, s, off, w.contiguous(), f32_vector(deq_scale),
                               quant_bias.reshape({-1}).to(at::kInt).contiguous(), small_m),
                r);
}

// scale / offset [n, G], or [1, G] / [n] / [1] (broadcast over the rows)
at::Tensor groups_of(const at::Tensor& t, int64_t n) {
  at::Tensor t2 = t.dim() == 2 ? t : t.reshape({-1, 1});
  if (t2.size(0) == 1 && n != 1) t2 = t2.expand({n, t2.size(1)});
  return t2.to(at::kFloat).contiguous();
}

at::Tensor w8a16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias) {
  RECORD_FUNCTION("slimquant::w8a16", std::vector<c10::IValue>());
  Rows r = rows_of(x, w);
  const int64_t n = w.size(0);
  c10::optional<at::Tensor> off;
  if (offset.has_value() && offset->defined()) off = groups_of(*offset, n);
  return finish(w8a16_2d(r.x2, w.contiguous(), groups_of(scale, n), off, f32_optional(bias)), r);
}

at::Tensor w4a16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                 const c10::optional<at::Tensor>& zero_point, double qmin, int64_t k,
                 const c10::optional<at::Tensor>& bias, int64_t gemv_max_rows) {
  RECORD_FUNCTION("slimquant::w4a16", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "x must be [..., k] and w [n, kb]");
  TORCH_CHECK(x.is_floating_point(), "x must be a float tensor");
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features but the weight has ", k);
  TORCH_CHECK(w.size(1) == (k + 7) / 8 * 4, "a packed 4-bit row of ", k, " values has ", (k + 7) / 8 * 4,
              " bytes, not ", w.size(1));
  const int64_t n = w.size(0);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  Rows r{x.reshape({M, k}).to(at::kFloat).contiguous(), shape, x.scalar_type()};
  c10::optional<at::Tensor> zp;
  if (zero_point.has_value() && zero_point->defined()) zp = groups_of(*zero_point, n);
  return finish(w4a16_2d(r.x2, w.contiguous(), groups_of(scale, n), zp, qmin, k, f32_optional(bias), gemv_max_rows),
                r);
}

at::Tensor w4a16_gated(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& sg,
                       const c10::optional<at::Tensor>& zg, double qg, const c10::optional<at::Tensor>& bg,
                       const at::Tensor& wu, const at::Tensor& su, const c10::optional<at::Tensor>& zu, double qu,
                       const c10::optional<at::Tensor>& bu, int64_t k, int64_t gemv_max_rows) {
  RECORD_FUNCTION("slimquant::w4a16_gated", std::vector<c10::IValue>());
  TORCH_CHECK(x.dim() >= 1 && wg.dim() == 2 && wu.dim() == 2, "x must be [..., k] and the weights [n, kb]");
  TORCH_CHECK(x.is_floating_point(), "x must be a float tensor");
  TORCH_CHECK(x.size(-1) == k, "x has ", x.size(-1), " features but the weights have ", k);
  for (const at::Tensor* w : {&wg, &wu})
    TORCH_CHECK(w->size(1) == (k + 7) / 8 * 4, "a packed 4-bit row of ", k, " values has ", (k + 7) / 8 * 4,
                " bytes, not ", w->size(1));
  const int64_t n = wg.size(0);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  Rows r{x.reshape({M, k}).to(at::kFloat).contiguous(), shape, x.scalar_type()};
  auto zp = [&](const c10::optional<at::Tensor>& z, int64_t rows) -> c10::optional<at::Tensor> {
    if (z.has_value() && z->defined()) return groups_of(*z, rows);
    return c10::nullopt;
  };
  return finish(w4a16_gated_2d(r.x2, wg.contiguous(), groups_of(sg, n), zp(zg, n), qg, f32_optional(bg),
                               wu.contiguous(), groups_of(su, wu.size(0)), zp(zu, wu.size(0)), qu, f32_optional(bu), k,
                               gemv_max_rows),
                r);
}

std::string cpu_features() {
  std::string s;
  if (cpu_has_avx512()) s += "avx512 ";
  if (cpu_has_vnni()) s += "avx512vnni ";
  if (!cpu_has_avx512() && cpu_has_avx2()) s += "avx2 ";
  return s.empty() ? "scalar" : s.substr(0, s.size() - 1);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8a8_dynamic", &w8a8_dynamic, "fused per-token int8 quantize + int8 GEMM + rescale");
  m.def("w8a8_static", &w8a8_static, "fused static int8 quantize + int8 GEMM + quant_bias + deq_scale");
  m.def("w8a8_dynamic_q", &w8a8_dynamic_q, "int8 GEMM + rescale of rows already quantized per token");
  m.def("w8a8_static_q", &w8a8_static_q, "int8 GEMM + quant_bias + deq_scale of rows already quantized (static)");
  m.def("rmsnorm_quant", &rmsnorm_quant, "Llama RMSNorm (float32) and its int8 quantization: [y, q, xs]");
  m.def("rmsnorm", &rmsnorm, "Llama RMSNorm (float32) alone, rows in parallel");
  m.def("silu_mul_quant", &silu_mul_quant, "int8 quantization of silu(g) * u: [q, xs]");
  m.def("w8a16", &w8a16, "int8-weight x float32 GEMV (per-channel or per-group scale/offset)");
  m.def("w4a16", &w4a16, "packed 4-bit weight x float32: GEMV for up to gemv_max_rows rows, tiled GEMM beyond");
  m.def("w4a16_gated", &w4a16_gated,
        "silu(x Wg^T + bg) * (x Wu^T + bu) from packed 4-bit gate / up weights: one tiled GEMM for both");
  m.def("set_w4_tile_bytes", [](int64_t v) { g_w4_tile_bytes = std::max<int64_t>(v, 4096); },
        "the float weight tile of the W4A16 GEMM path, in bytes");
  m.def("w4_tile_bytes", []() { return g_w4_tile_bytes; }, "the float weight tile of the W4A16 GEMM path, in bytes");
  m.def("cpu_features", &cpu_features, "which code paths this CPU runs");
  m.def("set_max_isa", [](int64_t v) { g_max_isa = static_cast<int>(std::min<int64_t>(std::max<int64_t>(v, 0), 2)); },
        "tests: the widest code path the kernels may take (0 portable, 1 AVX2, 2 AVX512)");
}
