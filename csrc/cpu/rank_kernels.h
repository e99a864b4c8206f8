// The adapter's three skinny GEMM shapes, route-aware, register-blocked (simd.h).
//
// Every token uses one route's slice of the rank space (text: R_T columns; image: K*K*R_I tap
// columns, or R_I after the convolution), so each kernel takes two Segs, indexed by the route
// (0 text, 1 image), and does only the selected slice's work; padding rows (route -1) are skipped.
//   project: out[t, off + j]  = sum_k x[t, k] w[k, j]          (tap products P, and dz = dy B)
//   expand:  y[t, o]         += sum_j z[t, off + j] w[j, o]    (y += z B^T, and dx += dP A_all)
//   outer:   g[j, o]         += sum_t z[t, off + j] x[t, o]    (dB^T = z^T dy, dA_all = dP^T x)
// Why not MKL: these GEMMs have 16-80 columns; cut by route they are many small calls, and MKL ran
// them at a third to a half of its big-GEMM rate on the 2-core dev machine (per-block expand
// alone cost 5.6% of F.linear for 1.6% of its FLOPs). Here every kernel is one pass in one
// parallel region: project and expand read each x / y row once, keeping a 6-12 row x 1-4 vector
// accumulator tile in registers (up to 6 x 2 with 32-byte vectors: simd.h); outer accumulates
// 4 rows x 1-4 vectors over the route's rows (a fixed order, so results are deterministic and
// independent of the thread count).
// Accumulation is in A (float for bf16 and float, double for double); operands `w` are packed
// once per call in A with the vectorised dimension zero-padded to whole vectors.
#pragma once

#include <algorithm>

#include "simd.h"

namespace moss {
namespace cpu {

using simd::kLanes;
using simd::Vec;

template <typename A>
struct Seg {
  const A* w = nullptr;  // the packed operand (project: [D, ld]; expand: [width, ld])
  int64_t ld = 0;        // its row stride, a whole number of vectors
  int64_t width = 0;     // rank-space columns this route uses
  int64_t off = 0;       // where they start in a row of the rank-space matrix
};

// LoRA dropout on the adapters' input, read where a kernel reads that input: x[t, c] * scale
// where bit c of row t of `keep` is set (bits packed as simd::kept reads them, ld bytes a row),
// else 0. keep == nullptr: no dropout.
template <typename A>
struct Dropout {
  const uint8_t* keep = nullptr;
  int64_t ld = 0;
  A scale = 1;
};

template <typename S, typename A>
struct ProjectArgs {
  const S* x;  // row t at x + (t - row0) * ldx: row0 > 0 for a block copied out of x
  int64_t ldx, d;
  const int8_t* route;
  Seg<A> seg[2];
  A* out;  // [N, ldo]; a route's row gets round_up(width) columns from off (padding included)
  int64_t ldo;
  int64_t row0 = 0;
};

template <typename S, typename A>
struct ExpandArgs {
  S* y;
  int64_t ldy, d;
  const int8_t* route;
  const A* z;
  int64_t ldz;
  Seg<A> seg[2];
  // false: y += z W (the forward's y, the backward's dx); true: y = z W, and rows no adapter
  // reads (padding) are zeroed: a fresh output needs no zero fill first.
  bool store = false;
  // y += keep * scale * (z W) (the backward's dx through LoRA dropout; not with store).
  Dropout<A> drop = {};
};

template <typename S, typename A>
struct OuterArgs {
  const S* x;
  int64_t ldx, d;
  const A* z;
  int64_t ldz;
  const int64_t* rows[2];  // the token indices of each route, ascending
  int64_t nrows[2];
  int64_t width[2], off[2];
  A* g[2];  // [width, ldg], accumulated into
  int64_t ldg;
  Dropout<A> drop = {};  // x as the adapters read it
};

// The end of the run of tokens with route[t]'s route that starts at t (at most `end`). Kernels
// walk runs with plain loops, not a callback: a lambda would be a separate function, compiled for
// the baseline ISA rather than the clone's (simd.h).
MOSS_INLINE int64_t run_end(const int8_t* route, int64_t t, int64_t end) {
  int64_t u = t + 1;
  while (u < end && route[u] == route[t]) ++u;
  return u;
}

// ---- project --------------------------------------------------------------------------------

template <typename S, typename A, int V, int MR, int NV>
MOSS_INLINE void project_tiles(const ProjectArgs<S, A>& a, const Seg<A>& s, int64_t c0,
                               int64_t t, int64_t u) {
  constexpr int64_t L = kLanes<A, V>;
  for (int64_t t0 = t; t0 < u; t0 += MR) {
    const int64_t m = std::min<int64_t>(MR, u - t0);
    const S* xr[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      xr[i] = a.x + (t0 + std::min<int64_t>(i, m - 1) - a.row0) * a.ldx;
    }
    Vec<A, V> acc[MR][NV] = {};
    const A* w = s.w + c0;
    for (int64_t k = 0; k < a.d; ++k, w += s.ld) {
      Vec<A, V> wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = simd::load<A, V>(w + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const A xi = static_cast<A>(xr[i][k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += xi * wv[v];
      }
    }
    for (int i = 0; i < m; ++i) {
      A* o = a.out + (t0 + i) * a.ldo + s.off + c0;
      for (int v = 0; v < NV; ++v) simd::store<A, V>(o + v * L, acc[i][v]);
    }
  }
}

// Tiles of MR rows x NV vectors, sized so that the MR x NV accumulators, the NV operand vectors
// and a broadcast fit the registers: up to 6 x 4 with AVX-512's 32 (V = 64), 6 x 2 with AVX2's 16
// (V = 32; simd.h).
template <typename S, typename A, int V>
MOSS_INLINE void project_rows(const ProjectArgs<S, A>& a, int64_t begin, int64_t end) {
  constexpr int64_t L = kLanes<A, V>, NV = V == 64 ? 4 : 2;
  for (int64_t t = begin, u; t < end; t = u) {
    u = run_end(a.route, t, end);
    const int8_t r = a.route[t];
    if (r < 0 || a.seg[r].width == 0) continue;
    const Seg<A>& s = a.seg[r];
    for (int64_t c0 = 0; c0 < s.width; c0 += NV * L) {
      switch (std::min<int64_t>(NV, (s.width - c0 + L - 1) / L)) {
        case 4: if constexpr (NV >= 4) project_tiles<S, A, V, 6, 4>(a, s, c0, t, u); break;
        case 3: if constexpr (NV >= 3) project_tiles<S, A, V, 6, 3>(a, s, c0, t, u); break;
        case 2: project_tiles<S, A, V, NV >= 4 ? 8 : 6, 2>(a, s, c0, t, u); break;
        default: project_tiles<S, A, V, 12, 1>(a, s, c0, t, u); break;
      }
    }
  }
}

// The rows [begin, end) of x that an adapter reads (route >= 0), through LoRA dropout, into
// out[t - begin] (row stride d): project then reads this block, still in cache, instead of x.
// One pass that reads x once, as project does; the dropped-out x is never written to memory.
template <typename S, typename A, int V>
MOSS_INLINE void kept_rows(const S* x, int64_t ldx, int64_t d, const int8_t* route,
                           const Dropout<A>& drop, S* out, int64_t begin, int64_t end) {
  constexpr int64_t L = kLanes<A, V>;
  for (int64_t t = begin; t < end; ++t) {
    if (route[t] < 0) continue;
    const S* xt = x + t * ldx;
    const uint8_t* kt = drop.keep + t * drop.ld;
    S* o = out + (t - begin) * d;
    for (int64_t c = 0; c < d; c += L) {
      const int64_t n = std::min(L, d - c);
      simd::store<A, V>(o + c, simd::load_kept<A, V>(xt, kt, c, drop.scale, n), n);
    }
  }
}

// ---- expand ---------------------------------------------------------------------------------

// TAIL: the chunk's last vector is partial (only at the end of a row whose length is not a
// whole number of vectors). A compile-time flag, so that full chunks load and store y with
// plain vector moves (a run-time length makes the compiler call memcpy for every store).
constexpr int kExpandRows = 4;

template <typename S, typename A, int V, int NV, bool TAIL>
MOSS_INLINE void expand_tiles(const ExpandArgs<S, A>& a, const Seg<A>& s, int64_t o0,
                              int64_t t, int64_t u) {
  constexpr int64_t L = kLanes<A, V>;
  constexpr int MR = kExpandRows;
  const int64_t tail = TAIL ? a.d - o0 - (NV - 1) * L : L;  // lanes used in the last vector
  for (int64_t t0 = t; t0 < u; t0 += MR) {
    const int64_t m = std::min<int64_t>(MR, u - t0);
    S* yr[MR];
    const A* zr[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const int64_t ti = t0 + std::min<int64_t>(i, m - 1);
      yr[i] = a.y + ti * a.ldy + o0;
      zr[i] = a.z + ti * a.ldz + s.off;
    }
    const bool fresh = a.store || a.drop.keep != nullptr;  // accumulate z W alone
    Vec<A, V> acc[MR][NV];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = fresh ? Vec<A, V>{} : simd::load<A, V>(yr[i] + v * L, v == NV - 1 ? tail : L);
      }
    }
    const A* w = s.w + o0;
    for (int64_t j = 0; j < s.width; ++j, w += s.ld) {
      Vec<A, V> wv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[v] = simd::load<A, V>(w + v * L);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const A zi = zr[i][j];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += zi * wv[v];
      }
    }
    if (a.drop.keep != nullptr) {
      for (int i = 0; i < m; ++i) {
        const uint8_t* kr = a.drop.keep + (t0 + i) * a.drop.ld;
        for (int v = 0; v < NV; ++v) {
          const int64_t n = v == NV - 1 ? tail : L;
          const Vec<A, V> dy = simd::kept<A, V>(acc[i][v] * a.drop.scale, kr, o0 + v * L);
          simd::store<A, V>(yr[i] + v * L, simd::load<A, V>(yr[i] + v * L, n) + dy, n);
        }
      }
      continue;
    }
    for (int i = 0; i < m; ++i) {
      for (int v = 0; v < NV; ++v) {
        simd::store<A, V>(yr[i] + v * L, acc[i][v], v == NV - 1 ? tail : L);
      }
    }
  }
}

template <typename S, typename A, int V>
MOSS_INLINE void expand_rows(const ExpandArgs<S, A>& a, int64_t begin, int64_t end) {
  constexpr int64_t L = kLanes<A, V>, NV = V == 64 ? 4 : 2;  // a tile's vectors, at most
  for (int64_t t = begin, u; t < end; t = u) {
    u = run_end(a.route, t, end);
    const int8_t r = a.route[t];
    if (r < 0 || a.seg[r].width == 0) {
      if (a.store) {
        for (int64_t i = t; i < u; ++i) std::fill_n(a.y + i * a.ldy, a.d, S(0));
      }
      continue;
    }
    // Rows outer, columns inner: y is then read and written row after row, sequentially. (The
    // other order walks a column chunk down the rows, and with 4 KiB rows every access lands
    // on a new page, where the hardware prefetchers do not follow: 10-20% slower here.)
    const Seg<A>& s = a.seg[r];
    const int64_t full = a.d / L * L;  // columns in whole vectors
    for (int64_t t0 = t; t0 < u; t0 += kExpandRows) {
      const int64_t u0 = std::min(u, t0 + kExpandRows);
      for (int64_t o0 = 0; o0 < full; o0 += NV * L) {
        switch (std::min<int64_t>(NV, (full - o0) / L)) {
          case 4: if constexpr (NV >= 4) expand_tiles<S, A, V, 4, false>(a, s, o0, t0, u0); break;
          case 3: if constexpr (NV >= 3) expand_tiles<S, A, V, 3, false>(a, s, o0, t0, u0); break;
          case 2: expand_tiles<S, A, V, 2, false>(a, s, o0, t0, u0); break;
          default: expand_tiles<S, A, V, 1, false>(a, s, o0, t0, u0); break;
        }
      }
      if (full < a.d) expand_tiles<S, A, V, 1, true>(a, s, full, t0, u0);
    }
  }
}

// ---- outer ----------------------------------------------------------------------------------

constexpr int64_t kOuterRows = 64;  // tokens per pass over an accumulator tile

template <typename S, typename A, int V, int NV>
MOSS_INLINE void outer_tiles(const OuterArgs<S, A>& a, int r, int64_t o0) {
  constexpr int64_t L = kLanes<A, V>;
  constexpr int MJ = 4;
  const int64_t tail = std::min(L, a.d - o0 - (NV - 1) * L);
  const int64_t width = a.width[r], off = a.off[r];
  const int64_t* rows = a.rows[r];
  // The block's x columns, copied to a dense tile: read from x once, then reused from L1 by
  // every j block (x's own rows are often 4 KiB apart and would collide in the same L1 sets).
  alignas(64) A xs[kOuterRows][NV * L];
  for (int64_t b0 = 0; b0 < a.nrows[r]; b0 += kOuterRows) {
    const int64_t nb = std::min(a.nrows[r] - b0, kOuterRows);
    for (int64_t b = 0; b < nb; ++b) {
      const S* xt = a.x + rows[b0 + b] * a.ldx + o0;
      if (a.drop.keep != nullptr) {
        const uint8_t* kt = a.drop.keep + rows[b0 + b] * a.drop.ld;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          const int64_t n = v == NV - 1 ? tail : L;
          simd::store<A, V>(xs[b] + v * L,
                         simd::load_kept<A, V>(xt - o0, kt, o0 + v * L, a.drop.scale, n));
        }
        continue;
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        simd::store<A, V>(xs[b] + v * L, simd::load<A, V>(xt + v * L, v == NV - 1 ? tail : L));
      }
    }
    for (int64_t j0 = 0; j0 < width; j0 += MJ) {
      const int64_t mj = std::min<int64_t>(MJ, width - j0);
      A* gr[MJ];
      int64_t zj[MJ];
#pragma GCC unroll 4
      for (int i = 0; i < MJ; ++i) {
        zj[i] = off + j0 + std::min<int64_t>(i, mj - 1);
        gr[i] = a.g[r] + (j0 + std::min<int64_t>(i, mj - 1)) * a.ldg + o0;
      }
      Vec<A, V> acc[MJ][NV];
#pragma GCC unroll 4
      for (int i = 0; i < MJ; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = simd::load<A, V>(gr[i] + v * L);
      }
      for (int64_t b = 0; b < nb; ++b) {
        const A* zt = a.z + rows[b0 + b] * a.ldz;
        Vec<A, V> xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) xv[v] = simd::load<A, V>(xs[b] + v * L);
#pragma GCC unroll 4
        for (int i = 0; i < MJ; ++i) {
          const A zi = zt[zj[i]];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][v] += zi * xv[v];
        }
      }
      for (int i = 0; i < mj; ++i) {
        for (int v = 0; v < NV; ++v) simd::store<A, V>(gr[i] + v * L, acc[i][v]);
      }
    }
  }
}

// One task: route r's accumulator columns [o0, o0 + kOuterColumns) over all of its rows, in
// tiles of 4 rows of g by up to 4 vectors (V = 64) or 2 (V = 32).
template <typename A>
constexpr int64_t kOuterColumns = 4 * kLanes<A, simd::kMaxBytes>;

template <typename S, typename A, int V>
MOSS_INLINE void outer_task(const OuterArgs<S, A>& a, int r, int64_t o0) {
  constexpr int64_t L = kLanes<A, V>, NV = V == 64 ? 4 : 2;
  const int64_t end = std::min(a.d, o0 + kOuterColumns<A>);
  for (int64_t o = o0; o < end; o += NV * L) {
    switch (std::min<int64_t>(NV, (end - o + L - 1) / L)) {
      case 4: if constexpr (NV >= 4) outer_tiles<S, A, V, 4>(a, r, o); break;
      case 3: if constexpr (NV >= 3) outer_tiles<S, A, V, 3>(a, r, o); break;
      case 2: outer_tiles<S, A, V, 2>(a, r, o); break;
      default: outer_tiles<S, A, V, 1>(a, r, o); break;
    }
  }
}

}  // namespace cpu
}  // namespace moss
