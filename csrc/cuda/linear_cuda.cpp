// The CUDA backend of moss::_ext_linear_fwd / _ext_linear_bwd: cuBLAS GEMMs (through ATen)
// around the two routing kernels of moss_linear_cuda.cu, and the CUDA registration.
//
// Forward (C = R_T + KK*R_I tap-product columns, R = R_T + R_I adapter columns):
//   P  = x A_all^T                  [N, C]
//   z  = route_forward(P)           [N, R]      acc dtype (saved for the backward)
//   y  = x W^T + b                  [N, D_out]  the base GEMM, exactly as F.linear makes it
//   y += z Bcat^T                   the expand accumulates onto y (beta = 1)
// Backward:
//   dz = dy Bcat,  dBcat = dy^T z,  dP = route_backward(dz),  dA_all = dP^T x
//   dx = dy W;  dx += dP A_all      the transposed convolution accumulates onto dx (beta = 1)
//   dW = dy^T x,  db = sum dy       only when asked for
// Why no hand-written GEMM here: the D-wide GEMMs are where the time goes, and on Hopper cuBLAS
// runs them with TMA + wgmma kernels that a hand-written mma.sync GEMM does not match; the
// adapter adds only rank-R work, which rides in cuBLAS GEMMs whose beta = 1 is applied in the
// epilogue. That costs one extra read and write of y (and dx) per layer, which the Triton
// backend avoids by putting the expand into its own GEMM's K loop; `moss bench` on a GPU
// measures both. fp16 inputs keep the rank-space intermediates (P, dz, dP) and the products that
// meet them in fp32 (cuBLAS's fp16 x fp16 -> fp32 GEMMs, fp32 copies where an operand is fp32):
// a routed sum of K*K tap products, or a gradient dy B, can pass fp16's 65504 while every
// output fits. That costs fp32 temporaries of y / dx (and copies of x, dy) for fp16 only; bf16
// has fp32's range and stays in bf16. Every adapter GEMM covers all N rows: skipping the columns routing makes zero
// (as the CPU backend does) would need the route on the host, i.e. a device sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../linear.h"
#include "route_cuda.h"

namespace moss {
namespace {


// A_all [R_T + KK*R_I, D_in]: the text rows, then one block of R_I rows per tap (p*K + q).
at::Tensor stack_down(const at::Tensor& text_A, const at::Tensor& image_A) {
  const auto r_i = image_A.size(0), d_in = image_A.size(1), k = image_A.size(2);
  return at::cat({text_A, image_A.permute({2, 3, 0, 1}).reshape({k * k * r_i, d_in})}, 0);
}

// The adapters' scales per rank column, fp32. They multiply z and dz (in fp32, or after the
// GEMM's one rounding), not B: scale * B rounded to a half dtype puts that dtype's epsilon on
// every weight, which the cancelling sums of dy B amplify.
at::Tensor column_scales(int64_t r_t, int64_t r_i, double text_scale, double image_scale,
                         const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kFloat);
  return at::cat({at::full({r_t}, text_scale, opts), at::full({r_i}, image_scale, opts)});
}

void check_cuda_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "x: the cuda backend supports float32, float16 and bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
    const at::Tensor& image_B, const at::Tensor& route, const at::Tensor& nbr,
    double text_scale, double image_scale) {
  check_forward_args(x, weight, bias, text_A, text_B, image_A, image_B, route, nbr);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), r_t = text_A.size(0), r_i = image_A.size(0);
  const bool wide = x.scalar_type() == at::kHalf;
  const at::Tensor a_all = stack_down(text_A, image_A);
  const at::Tensor p = wide ? at::mm(x, a_all.t(), at::kFloat) : at::mm(x, a_all.t());  // [N, C]
  at::Tensor z = at::empty({n, r_t + r_i}, x.options().dtype(acc_type(x.scalar_type())));
  route_forward_cuda(p, route, nbr, r_t, r_i, z);
  const at::Tensor b_cat = at::cat({text_B, image_B}, 1);
  const at::Tensor z_s = z * column_scales(r_t, r_i, text_scale, image_scale, z);
  if (wide) {
    at::Tensor y = at::mm(x, weight.t(), at::kFloat);
    if (bias.has_value()) y.add_(*bias);
    y.addmm_(z_s, b_cat.to(at::kFloat).t());
    return {y.to(x.scalar_type()), z};
  }
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(z_s.to(x.scalar_type()), b_cat.t());
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cuda(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
              const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
              const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
              const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
              bool need_dweight, bool need_dbias) {
  check_forward_args(x, weight, c10::nullopt, text_A, text_B, image_A, image_B, route, nbr_t);
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = dy_in.contiguous();  // a gradient may arrive expanded (stride 0)
  const int64_t n = x.size(0), d_in = x.size(1);
  const int64_t r_t = text_A.size(0), r_i = image_A.size(0);
  check_backward_args(dy, x, weight, z, r_t + r_i);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor b_cat = at::cat({text_B, image_B}, 1);
  const at::Tensor a_all = stack_down(text_A, image_A);
  const int64_t c = a_all.size(0);

  const bool wide = x.scalar_type() == at::kHalf;
  const auto up = [&](const at::Tensor& t) { return wide ? t.to(at::kFloat) : t; };
  at::Tensor dz = wide ? at::mm(dy, b_cat, at::kFloat) : at::mm(dy, b_cat);  // [N, R]
  dz.mul_(column_scales(r_t, r_i, text_scale, image_scale, dz));
  const at::Tensor d_b_cat =                                                         // [D_out, R]
      (wide ? at::mm(up(dy).t(), z) : at::mm(dy.t(), z.to(dy.scalar_type()))).to(acc);
  at::Tensor dp = at::empty({n, c}, dz.options());
  route_backward_cuda(dz, route, nbr_t, r_t, r_i, dp);
  const at::Tensor d_all = at::mm(dp.t(), up(x)).to(acc);  // [C, D_in]
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = wide ? at::mm(dy, weight, at::kFloat) : at::mm(dy, weight);
    dx.addmm_(dp, up(a_all));
    dx = dx.to(x.scalar_type());
  }
  at::Tensor dw = need_dweight ? at::mm(dy.t(), x) : at::empty({0}, x.options());
  at::Tensor db = need_dbias ? dy.sum({0}, false, acc).to(dy.scalar_type())
                             : at::empty({0}, x.options());

  const auto k = image_A.size(2);
  // Each gradient gets its own memory: custom-op outputs may not alias one another.
  at::Tensor d_text_A = d_all.narrow(0, 0, r_t).to(text_A.scalar_type()).clone();
  at::Tensor d_image_A = d_all.narrow(0, r_t, c - r_t)
                             .reshape({k, k, r_i, d_in})
                             .permute({2, 3, 0, 1})
                             .to(image_A.scalar_type())
                             .clone(at::MemoryFormat::Contiguous);
  at::Tensor d_text_B = (d_b_cat.narrow(1, 0, r_t) * text_scale).to(text_B.scalar_type());
  at::Tensor d_image_B = (d_b_cat.narrow(1, r_t, r_i) * image_scale).to(image_B.scalar_type());
  return {dx, dw, db, d_text_A, d_text_B, d_image_A, d_image_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(moss, CUDA, m) {
  m.impl("_ext_linear_fwd", &forward_cuda);
  m.impl("_ext_linear_bwd", &backward_cuda);
}

}  // namespace moss
