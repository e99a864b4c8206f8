// Host-side launchers of the kernels in route_kernels.cuh, written once for every `Launch`: the
// real CUDA launch (route_cuda.cu, nvcc) and the CPU emulator (csrc/emulated/, g++). A Launch is
// called as launch(kernel, work items, output tensor, kernel arguments...); the output tensor is
// what the emulator's exactly-once check watches (the CUDA launch ignores it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <limits>

#include "route_kernels.cuh"

namespace moss {

// z[N, R_T + R_I] (acc dtype) <- route and convolve the tap products p[N, R_T + KK*R_I].
template <typename Launch>
void route_forward(const Launch& launch, const at::Tensor& p, const at::Tensor& route,
                   const at::Tensor& nbr, int64_t r_t, int64_t r_i, at::Tensor& z) {
  const int64_t n = p.size(0), kk = nbr.size(1);
  if (n * (r_t + r_i) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "moss_route_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(route_fwd_kernel<scalar_t, acc_t>, n * (r_t + r_i), z, p.data_ptr<scalar_t>(),
           p.stride(0), route.data_ptr<int8_t>(), nbr.data_ptr<int32_t>(), n, r_t, r_i, kk,
           z.data_ptr<acc_t>());
  });
}

// dp[N, R_T + KK*R_I] <- gather dz[N, R_T + R_I] through the transposed window table.
template <typename Launch>
void route_backward(const Launch& launch, const at::Tensor& dz, const at::Tensor& route,
                    const at::Tensor& nbr_t, int64_t r_t, int64_t r_i, at::Tensor& dp) {
  const int64_t n = dz.size(0), kk = nbr_t.size(1);
  if (n * (r_t + kk * r_i) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "moss_route_bwd", [&] {
    launch(route_bwd_kernel<scalar_t>, n * (r_t + kk * r_i), dp, dz.data_ptr<scalar_t>(),
           dz.stride(0), route.data_ptr<int8_t>(), nbr_t.data_ptr<int32_t>(), n, r_t, r_i, kk,
           dp.data_ptr<scalar_t>());
  });
}

// Bcat [d_out, R_T + R_I] in b_cat's dtype, and bad [2, d_out] (see pack_up_kernel).
template <typename Launch>
void pack_up(const Launch& launch, const at::Tensor& text_B, const at::Tensor& image_B,
             at::Tensor& b_cat, at::Tensor& bad) {
  const int64_t d_out = text_B.size(0), r_t = text_B.size(1), r_i = image_B.size(1);
  if (d_out == 0) return;
  const at::Tensor tb = text_B.contiguous(), ib = image_B.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tb.scalar_type(), "moss_pack_up", [&] {
    if (b_cat.scalar_type() == tb.scalar_type()) {
      launch(pack_up_kernel<scalar_t, scalar_t>, d_out, b_cat, tb.data_ptr<scalar_t>(),
             ib.data_ptr<scalar_t>(), d_out, r_t, r_i, b_cat.data_ptr<scalar_t>(),
             bad.data_ptr<uint8_t>());
    } else {  // fp16 weights meeting fp32 rank-space values (linear_impl.h)
      launch(pack_up_kernel<scalar_t, float>, d_out, b_cat, tb.data_ptr<scalar_t>(),
             ib.data_ptr<scalar_t>(), d_out, r_t, r_i, b_cat.data_ptr<float>(),
             bad.data_ptr<uint8_t>());
    }
  });
}

// A_all [R_T + K*K*R_I, d_in] in a_all's dtype, and bad [2, d_in] (see pack_down_kernel).
template <typename Launch>
void pack_down(const Launch& launch, const at::Tensor& text_A, const at::Tensor& image_A,
               at::Tensor& a_all, at::Tensor& bad) {
  const int64_t d_in = text_A.size(1), r_t = text_A.size(0), r_i = image_A.size(0);
  const int64_t kk = image_A.size(2) * image_A.size(3);
  if (d_in == 0) return;
  const at::Tensor ta = text_A.contiguous(), ia = image_A.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ta.scalar_type(), "moss_pack_down", [&] {
    if (a_all.scalar_type() == ta.scalar_type()) {
      launch(pack_down_kernel<scalar_t, scalar_t>, d_in, a_all, ta.data_ptr<scalar_t>(),
             ia.data_ptr<scalar_t>(), d_in, r_t, r_i, kk, a_all.data_ptr<scalar_t>(),
             bad.data_ptr<uint8_t>());
    } else {
      launch(pack_down_kernel<scalar_t, float>, d_in, a_all, ta.data_ptr<scalar_t>(),
             ia.data_ptr<scalar_t>(), d_in, r_t, r_i, kk, a_all.data_ptr<float>(),
             bad.data_ptr<uint8_t>());
    }
  });
}

// out[t, j] = NaN where bad[route[t]][j] (see poison_kernel); out [N, d], rows of stride ldo.
template <typename Launch>
void poison(const Launch& launch, at::Tensor& out, const at::Tensor& route, const at::Tensor& bad) {
  const int64_t n = out.size(0), d = out.size(1);
  if (n * d == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "moss_poison", [&] {
    launch(poison_kernel<scalar_t>, d, at::Tensor(), out.data_ptr<scalar_t>(), out.stride(0),
           route.data_ptr<int8_t>(), bad.data_ptr<uint8_t>(), n, d,
           static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN()));
  });
}

// z [B, R_T + R_I] (acc dtype) and the ring's new slots, from p [B, R_T + KK*R_I] (ring's dtype):
// one decode step's rank space (see decode_taps_kernel).
template <typename Launch>
void decode_taps(const Launch& launch, const at::Tensor& p, at::Tensor& ring,
                 const at::Tensor& kind, const at::Tensor& pos, const at::Tensor& width,
                 int64_t r_t, int64_t k, at::Tensor& z) {
  const int64_t b = z.size(0), r = z.size(1);
  if (b * r == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "moss_decode_taps", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(decode_taps_kernel<scalar_t, acc_t>, b * r, z, p.data_ptr<scalar_t>(), p.stride(0),
           ring.data_ptr<scalar_t>(), ring.size(1), kind.data_ptr<int8_t>(),
           pos.data_ptr<int64_t>(), width.data_ptr<int64_t>(), b, r_t, r - r_t, k,
           z.data_ptr<acc_t>());
  });
}

}  // namespace moss
