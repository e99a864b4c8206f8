// moss::_ext_decode on CPU: one incremental decode step of a MOSS linear layer, in one call (the
// math: moss_kernels/decode.py). The base GEMV is ATen's (MKL, exactly as F.linear makes it);
// the rank space follows in three steps:
//
//   1. P[t] = A_all[route's rows] x_t   dot products over a_all's contiguous rows, only the rows
//                                       of the token's route (text: R_T, image: K*K*R_I; padding:
//                                       none); the rows shared out over the threads
//   2. ring[t, pos % S] = P[t]          (image tokens) and z[t] = the K x K window's taps
//   3. y_t += Bcat[:, route's cols] z   axpys over rows of Bcat^T (contiguous: b_cat is column-
//                                       major as moss_kernels.decode.pack makes it); the outputs
//                                       shared out over the threads
//
// Why not the GPU's composition (csrc/cuda/decode_impl.h: three GEMMs around the decode_taps
// kernel, which this file ran as one thread until #16's second round): at decode sizes the CPU
// step is latency, not FLOPs. On the dev machine MKL's GEMMs of 2 rows by 16-80 columns cost
// 6-9 us each, the GPU kernel's per-element index arithmetic (64-bit divisions, ~40 cycles each)
// ~17 us a call, and one core streams the adapters' few hundred KB at about a quarter of the rate
// the base GEMV reads W with all of them: in a 28-layer cycle (caches cold) the step cost 37 us
// over the base GEMV's 45, now 19. Here the index arithmetic is per token and tap, and both
// products read only the rows and columns of the routes present.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "decode_cpu.h"

#include "../cuda/decode_impl.h"
#include "simd.h"

namespace moss {
namespace cpu {
namespace {

using simd::kLanes;
using simd::Vec;

template <typename S, typename A>
struct DecodeArgs {
  const S* x;  // [B, d_in]
  int64_t b, d_in;
  const S* a_all;  // [R_T + KK*R_I, d_in]
  const S* b_t;    // [R_T + R_I, d_out]: Bcat^T
  S* y;            // [B, d_out], the base GEMV's, added to
  int64_t d_out;
  S* ring;  // [B, slots, KK*R_I]
  int64_t slots;
  const int8_t* kind;
  const int64_t* pos;
  const int64_t* width;
  int64_t r_t, r_i, k;
};

// The lanes' sum as a tree: the vector's halves added (a register extract, not a trip through
// memory) down to 16 bytes, then those lanes. A left-to-right sum is a chain of 15 dependent
// additions, and summing through a stack array stalls on store forwarding: either cost more
// than the products at 64 sums per token.
template <typename A, int V>
MOSS_INLINE A lane_sum(const Vec<A, V>& v) {
  if constexpr (V > 16) {
    Vec<A, V / 2> lo, hi;
    std::memcpy(&lo, &v, V / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + V / 2, V / 2);
    return lane_sum<A, V / 2>(lo + hi);
  } else {
    A sum = v[0];
#pragma GCC unroll 4
    for (int i = 1; i < int(V / sizeof(A)); ++i) sum += v[i];
    return sum;
  }
}

// p[c] = <x, w[c]> for c < n (w's rows d long): four rows at a time, each x vector loaded once
// for the four; whole vectors first, then the partial last one (a run-time length in every
// load would keep the compiler from plain vector moves). The sums are split over the lanes of
// 64 bytes whatever V is (V = 32: two vectors make one of 64, added before the tree of
// lane_sum<64> goes on), so that both widths add in the same order (simd.h).
template <typename S, typename A, int V>
MOSS_INLINE void dots(const S* x, const S* w, int64_t d, int64_t n, A* p) {
  constexpr int64_t L = kLanes<A, V>, P = simd::kMaxBytes / V, LL = P * L;
  const int64_t full = d / LL * LL, tail = d - full;
  for (int64_t c = 0; c < n; c += 4) {
    const int q_end = static_cast<int>(std::min<int64_t>(4, n - c));
    const S* wr[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) wr[q] = w + (c + std::min(q, q_end - 1)) * d;
    Vec<A, V> acc[4][P] = {};
    for (int64_t i = 0; i < full; i += LL) {
#pragma GCC unroll 2
      for (int64_t h = 0; h < P; ++h) {
        const Vec<A, V> xv = simd::load<A, V>(x + i + h * L);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[q][h] += xv * simd::load<A, V>(wr[q] + i + h * L);
      }
    }
    if (tail > 0) {
#pragma GCC unroll 2
      for (int64_t h = 0; h < P; ++h) {
        const int64_t m = std::min(tail - h * L, L), at = full + h * L;
        if (m <= 0) break;  // (V = 32: a tail within the first half)
        const Vec<A, V> xv = simd::load<A, V>(x + at, m);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[q][h] += xv * simd::load<A, V>(wr[q] + at, m);
      }
    }
    for (int q = 0; q < q_end; ++q) {
      Vec<A, V> sum = acc[q][0];
      for (int64_t h = 1; h < P; ++h) sum += acc[q][h];
      p[c + q] = lane_sum<A, V>(sum);
    }
  }
}

// y[o] += sum_j z[j] w[j][o] for j < n and o < d (w's rows ld apart): four vectors of y at a
// time, then the rest one vector at a time.
template <typename S, typename A, int V>
MOSS_INLINE void axpys(const A* z, const S* w, int64_t ld, int64_t n, S* y, int64_t d) {
  constexpr int64_t L = kLanes<A, V>;
  int64_t o = 0;
  for (; o + 4 * L <= d; o += 4 * L) {
    Vec<A, V> acc[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[v] = simd::load<A, V>(y + o + v * L);
    for (int64_t j = 0; j < n; ++j) {
      const A zj = z[j];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[v] += zj * simd::load<A, V>(w + j * ld + o + v * L);
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) simd::store<A, V>(y + o + v * L, acc[v]);
  }
  for (; o < d; o += L) {
    const int64_t m = std::min(L, d - o);
    Vec<A, V> acc = simd::load<A, V>(y + o, m);
    for (int64_t j = 0; j < n; ++j) acc += z[j] * simd::load<A, V>(w + j * ld + o, m);
    simd::store<A, V>(y + o, acc, m);
  }
}

// The rank-space columns token t reads: [0, R_T) for text, [R_T, R_T + K*K*R_I) of P (and
// [R_T, R_T + R_I) of z) for image tokens, none for padding or an absent adapter.
template <typename S, typename A>
MOSS_INLINE int route_of(const DecodeArgs<S, A>& a, int64_t t) {
  if (a.kind[t] == 0 && a.r_t > 0) return 0;
  if (a.kind[t] == 1 && a.r_i > 0 && a.slots > 0) return 1;
  return -1;
}

// Step 1, rows [c0, c1) of A_all: p[t, c] = <x_t, A_all[c]> for the rows of t's route. A row
// is read from memory by the first token that needs it and from cache by the others.
template <typename S, typename A, int V>
MOSS_INLINE void project_rows(const DecodeArgs<S, A>& a, A* p, int64_t c0, int64_t c1) {
  const int64_t cols = a.r_t + a.k * a.k * a.r_i;
  for (int64_t t = 0; t < a.b; ++t) {
    const int r = route_of(a, t);
    if (r < 0) continue;
    const int64_t lo = std::max(c0, r == 0 ? int64_t(0) : a.r_t);
    const int64_t hi = std::min(c1, r == 0 ? a.r_t : cols);
    if (lo < hi) dots<S, A, V>(a.x + t * a.d_in, a.a_all + lo * a.d_in, a.d_in, hi - lo,
                               p + t * cols + lo);
  }
}

// Step 2, every token: image tokens' tap products into their ring slots, and z [B, R_T + R_I]
// (the route's columns: text P's, or the K x K window's taps from the ring).
template <typename S, typename A>
MOSS_INLINE void window(const DecodeArgs<S, A>& a, const A* p, A* z) {
  const int64_t kk = a.k * a.k, c = kk * a.r_i, cols = a.r_t + c, r = a.r_t + a.r_i;
  for (int64_t t = 0; t < a.b; ++t) {
    const int route = route_of(a, t);
    const A* pt = p + t * cols;
    A* zt = z + t * r;
    if (route == 0) {
      std::copy_n(pt, a.r_t, zt);
    } else if (route == 1) {
      const A* taps = pt + a.r_t;
      A* zi = zt + a.r_t;
      const int64_t at = a.pos[t], w = std::max<int64_t>(a.width[t], 1);
      const int64_t row = at / w, col = at % w;
      S* rt = a.ring + t * a.slots * c;
      S* own = rt + (at % a.slots) * c;
      for (int64_t j = 0; j < c; ++j) own[j] = static_cast<S>(taps[j]);
      std::fill_n(zi, a.r_i, A(0));
      for (int64_t tap = 0; tap < kk; ++tap) {  // row and column offsets -(K-1)..0
        const int64_t dr = tap / a.k - (a.k - 1), dc = tap % a.k - (a.k - 1);
        if (row + dr < 0 || col + dc < 0) continue;
        if (tap == kk - 1) {  // the token's own tap straight from P, as the reference reads it
          for (int64_t j = 0; j < a.r_i; ++j) zi[j] += taps[tap * a.r_i + j];
        } else {
          const S* src = rt + ((at + dr * w + dc) % a.slots) * c + tap * a.r_i;
          for (int64_t j = 0; j < a.r_i; ++j) zi[j] += static_cast<A>(src[j]);
        }
      }
    }
  }
}

// Step 3, outputs [o0, o1): y[t, o] += sum over t's route's columns j of z[t, j] Bcat[o, j].
template <typename S, typename A, int V>
MOSS_INLINE void expand_cols(const DecodeArgs<S, A>& a, const A* z, int64_t o0, int64_t o1) {
  const int64_t r = a.r_t + a.r_i;
  for (int64_t t = 0; t < a.b; ++t) {
    const int route = route_of(a, t);
    if (route < 0) continue;
    const int64_t off = route == 0 ? 0 : a.r_t, n = route == 0 ? a.r_t : a.r_i;
    axpys<S, A, V>(z + t * r + off, a.b_t + off * a.d_out + o0, a.d_out, n,
                   a.y + t * a.d_out + o0, o1 - o0);
  }
}

#define MOSS_CPU_DECODE(S, A)                                                                   \
  MOSS_CPU_CLONES void project(const DecodeArgs<S, A>& a, A* p, int64_t c0, int64_t c1) {       \
    MOSS_BY_WIDTH(project_rows, S, A, a, p, c0, c1);                                            \
  }                                                                                             \
  MOSS_CPU_CLONES void taps(const DecodeArgs<S, A>& a, const A* p, A* z) {                      \
    window<S, A>(a, p, z);                                                                      \
  }                                                                                             \
  MOSS_CPU_CLONES void expand(const DecodeArgs<S, A>& a, const A* z, int64_t o0, int64_t o1) {  \
    MOSS_BY_WIDTH(expand_cols, S, A, a, z, o0, o1);                                             \
  }
MOSS_CPU_DECODE(float, float)
MOSS_CPU_DECODE(double, double)
MOSS_CPU_DECODE(c10::BFloat16, float)
#undef MOSS_CPU_DECODE

}  // namespace

at::Tensor decode(const at::Tensor& x_given, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& a_all_in,
                  const at::Tensor& b_cat, at::Tensor& ring, const at::Tensor& kind,
                  const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k) {
  composition::check_decode_args(x_given, weight, bias, a_all_in, b_cat, ring, kind, pos, width,
                                 r_t, k);
  const at::Tensor x_in = composition::as_rows(x_given);
  TORCH_CHECK(x_in.is_cpu(), "x: the cpu backend's decode step runs CPU tensors, got ",
              x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "x: the cpu backend's decode step runs float32, float64 and bfloat16, got ", dtype);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x_in, weight.t()) : at::mm(x_in, weight.t());
  const int64_t b = x_in.size(0), r = b_cat.size(1);
  if (b == 0 || r == 0) return composition::like_input(x_given, y);
  // Contiguous operands: no copy for what moss_kernels.decode.pack and the layers hand over.
  const at::Tensor x = x_in.contiguous(), a_all = a_all_in.contiguous(),
                   b_t = b_cat.t().contiguous();
  const int64_t r_i = r - r_t, cols = r_t + k * k * r_i;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "moss_decode_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const DecodeArgs<scalar_t, A> args{
        x.data_ptr<scalar_t>(), b, x.size(1), a_all.data_ptr<scalar_t>(),
        b_t.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), y.size(1),
        ring.data_ptr<scalar_t>(), ring.size(1), kind.data_ptr<int8_t>(),
        pos.data_ptr<int64_t>(), width.data_ptr<int64_t>(), r_t, r_i, k};
    // The rows of A_all some token reads (none: padding only, nothing to add).
    int64_t lo = cols, hi = 0;
    for (int64_t t = 0; t < b; ++t) {
      const int route = route_of(args, t);
      if (route >= 0) {
        lo = std::min(lo, route == 0 ? int64_t(0) : r_t);
        hi = std::max(hi, route == 0 ? r_t : cols);
      }
    }
    if (lo >= hi) return;
    std::vector<A> p(b * cols), z(b * r);
    // The two reads of adapter weights are shared out (A_all's rows, Bcat's output rows): at
    // decode sizes they are memory reads of a few hundred KB, which one core streams at about
    // a quarter of the rate the base GEMV gets from all of them. Small ranges run inline.
    at::parallel_for(lo, hi, 16, [&](int64_t c0, int64_t c1) { project(args, p.data(), c0, c1); });
    taps(args, p.data(), z.data());
    at::parallel_for(0, y.size(1), 256,
                     [&](int64_t o0, int64_t o1) { expand(args, z.data(), o0, o1); });
  });
  return composition::like_input(x_given, y);
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) { m.impl("_ext_decode", &cpu::decode); }

}  // namespace moss
