// The CUDA routing kernels (rank space): device code with no shared memory, barriers or warp
// intrinsics, so that one (block, thread) at a time runs it exactly as a GPU would. nvcc compiles
// it as device code (route_cuda.cu); g++ compiles the very same text on CPU through
// csrc/emulated/cuda_shim.h, for the `cuda-emulated` test backend (docs/design.md section 4).
//
//   route_fwd:  z[t, j]  = P[t, j] if route[t] == 0 (j < R_T);  sum_tap P[nbr[t,tap], ...] else
//   route_bwd:  dP[s, c] = dz[s, c] if route[s] == 0 (c < R_T); dz[nbr_t[s,tap], R_T + j] else
//   pack_up:    Bcat = [B_T | B_I] with non-finite entries zeroed, bad[route][j] flags per row
//   pack_down:  A_all = [A_T ; A_I taps] likewise, bad[route][d] flags per column
//   poison:     out[t, j] = NaN where bad[route[t]][j]: the NaN the zeroed weight would have put
//                          on route[t]'s rows, and only there (docs/design.md section 3)
//   decode_taps: one decode step's rank space (moss_kernels/decode.py): the new tokens' tap
//                products into their ring slots, and z from the ring
//
// One thread per output element (per weight row / column for pack and poison), grid-stride;
// every output is written by exactly one thread (gathers, no atomics: deterministic). The plan's
// tables are read on the device, so nothing synchronises with the host.
#pragma once

#include <cstdint>

namespace moss {

template <typename scalar_t, typename acc_t>
__global__ void route_fwd_kernel(const scalar_t* __restrict__ p, int64_t ldp,
                                 const int8_t* __restrict__ route,
                                 const int32_t* __restrict__ nbr, int64_t n, int64_t r_t,
                                 int64_t r_i, int64_t kk, acc_t* __restrict__ z) {
  const int64_t width = r_t + r_i;
  const int64_t total = n * width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = idx / width, j = idx % width;
    acc_t v = acc_t(0);
    if (j < r_t) {
      if (route[t] == 0) v = static_cast<acc_t>(p[t * ldp + j]);
    } else {
      for (int64_t tap = 0; tap < kk; ++tap) {  // column R_T + tap*R_I + (j - R_T)
        const int64_t s = nbr[t * kk + tap];
        if (s >= 0) v += static_cast<acc_t>(p[s * ldp + j + tap * r_i]);
      }
    }
    z[idx] = v;
  }
}

template <typename scalar_t>
__global__ void route_bwd_kernel(const scalar_t* __restrict__ dz, int64_t ldz,
                                 const int8_t* __restrict__ route,
                                 const int32_t* __restrict__ nbr_t, int64_t n, int64_t r_t,
                                 int64_t r_i, int64_t kk, scalar_t* __restrict__ dp) {
  const int64_t width = r_t + kk * r_i;
  const int64_t total = n * width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t s = idx / width, c = idx % width;
    scalar_t v = scalar_t(0);
    if (c < r_t) {
      if (route[s] == 0) v = dz[s * ldz + c];
    } else {
      const int64_t tap = (c - r_t) / r_i, j = (c - r_t) % r_i;
      const int64_t t = nbr_t[s * kk + tap];
      if (t >= 0) v = dz[t * ldz + r_t + j];
    }
    dp[idx] = v;
  }
}

// bad [2, d] uint8: bad[r][j] != 0 when route r's weight column j held a NaN or Inf. A thread
// per column: the many columns with no bad entry return at once, without touching out.
template <typename scalar_t>
__global__ void poison_kernel(scalar_t* __restrict__ out, int64_t ldo,
                              const int8_t* __restrict__ route,
                              const uint8_t* __restrict__ bad, int64_t n, int64_t d,
                              scalar_t nan) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < d;
       j += int64_t(blockDim.x) * gridDim.x) {
    const bool text = bad[j] != 0, image = bad[d + j] != 0;
    if (!text && !image) continue;
    for (int64_t t = 0; t < n; ++t) {
      if ((text && route[t] == 0) || (image && route[t] == 1)) out[t * ldo + j] = nan;
    }
  }
}

// Bcat [d_out, R_T + R_I] (out_t) <- text_B [d_out, R_T], image_B [d_out, R_I] (contiguous),
// non-finite entries zeroed; bad[0][j] / bad[1][j]: row j of text_B / image_B held one.
template <typename scalar_t, typename out_t>
__global__ void pack_up_kernel(const scalar_t* __restrict__ text_B,
                               const scalar_t* __restrict__ image_B, int64_t d_out, int64_t r_t,
                               int64_t r_i, out_t* __restrict__ b_cat, uint8_t* __restrict__ bad) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < d_out;
       j += int64_t(blockDim.x) * gridDim.x) {
    out_t* row = b_cat + j * (r_t + r_i);
    bool text_bad = false, image_bad = false;
    for (int64_t r = 0; r < r_t + r_i; ++r) {
      const float w = static_cast<float>(r < r_t ? text_B[j * r_t + r] : image_B[j * r_i + r - r_t]);
      const bool finite = w - w == 0.0f;  // false for NaN and +-Inf (IEEE, no fast-math)
      (r < r_t ? text_bad : image_bad) |= !finite;
      row[r] = finite ? static_cast<out_t>(r < r_t ? text_B[j * r_t + r]
                                                   : image_B[j * r_i + r - r_t])
                      : out_t(0);
    }
    bad[j] = text_bad;
    bad[d_out + j] = image_bad;
  }
}

// A_all [R_T + K*K*R_I, d_in] (out_t) <- text_A [R_T, d_in], image_A [R_I, d_in, K, K]
// (contiguous; row R_T + tap*R_I + r holds image_A[r, :, tap / K, tap % K]), non-finite entries
// zeroed; bad[0][d] / bad[1][d]: column d of text_A / of any tap held one.
template <typename scalar_t, typename out_t>
__global__ void pack_down_kernel(const scalar_t* __restrict__ text_A,
                                 const scalar_t* __restrict__ image_A, int64_t d_in, int64_t r_t,
                                 int64_t r_i, int64_t kk, out_t* __restrict__ a_all,
                                 uint8_t* __restrict__ bad) {
  for (int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; d < d_in;
       d += int64_t(blockDim.x) * gridDim.x) {
    bool text_bad = false, image_bad = false;
    for (int64_t c = 0; c < r_t + kk * r_i; ++c) {
      const scalar_t v = c < r_t ? text_A[c * d_in + d]
                                 : image_A[((c - r_t) % r_i * d_in + d) * kk + (c - r_t) / r_i];
      const float w = static_cast<float>(v);
      const bool finite = w - w == 0.0f;
      (c < r_t ? text_bad : image_bad) |= !finite;
      a_all[c * d_in + d] = finite ? static_cast<out_t>(v) : out_t(0);
    }
    bad[d] = text_bad;
    bad[d_in + d] = image_bad;
  }
}

// One decode step (moss_kernels/decode.py), for B sequences with one new token each: p [B, R_T +
// KK*R_I] its products with A_all, kind[t] (0 text, 1 image, -1 padding), pos[t] (its position in
// its image, row-major over rows of width[t]), ring [B, S, KK*R_I] (p's dtype, contiguous) each
// sequence's last S image tokens' tap products at slot pos % S, S >= (K-1)(width[t]+1)+1. One
// thread per (t, j), j < R_T + R_I:
//   j < R_T:   z[t, j] = p[t, j] on text rows, else 0
//   j >= R_T:  on image rows, ring[t, pos % S, tap*R_I + j'] = p[t, R_T + tap*R_I + j'] for every
//              tap (j' = j - R_T), and z[t, j] = the sum over the K x K causal taps inside the
//              image of ring[t, (pos + dr*width[t] + dc) % S, tap*R_I + j'], the token's own tap
//              read from p; else 0.
// Each ring element and z element is written by one thread, and no thread reads a slot this
// launch writes (S > (K-1)(W+1), so the K x K window's other slots differ from pos % S): no race.
template <typename scalar_t, typename acc_t>
__global__ void decode_taps_kernel(const scalar_t* __restrict__ p, int64_t ldp,
                                   scalar_t* __restrict__ ring, int64_t slots,
                                   const int8_t* __restrict__ kind,
                                   const int64_t* __restrict__ pos,
                                   const int64_t* __restrict__ width, int64_t b, int64_t r_t,
                                   int64_t r_i, int64_t k, acc_t* __restrict__ z) {
  const int64_t r = r_t + r_i, kk = k * k, c = kk * r_i;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < b * r;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = idx / r, j = idx % r;
    acc_t v = acc_t(0);
    if (j < r_t) {
      if (kind[t] == 0) v = static_cast<acc_t>(p[t * ldp + j]);
    } else if (kind[t] == 1 && slots > 0) {
      const int64_t jj = j - r_t, at = pos[t], w = width[t] > 0 ? width[t] : 1;
      const int64_t row = at / w, col = at % w;
      const scalar_t* pt = p + t * ldp + r_t;
      scalar_t* rt = ring + t * slots * c;
      for (int64_t tap = 0; tap < kk; ++tap) {
        rt[(at % slots) * c + tap * r_i + jj] = pt[tap * r_i + jj];
      }
      for (int64_t tap = 0; tap < kk; ++tap) {  // row and column offsets -(K-1)..0
        const int64_t dr = tap / k - (k - 1), dc = tap % k - (k - 1);
        if (row + dr < 0 || col + dc < 0) continue;
        const int64_t src = (at + dr * w + dc) % slots;
        v += static_cast<acc_t>(tap == kk - 1 ? pt[tap * r_i + jj] : rt[src * c + tap * r_i + jj]);
      }
    }
    z[idx] = v;
  }
}

}  // namespace moss
