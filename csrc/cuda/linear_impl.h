// The composition of the CUDA backend of moss::_ext_linear_fwd / _ext_linear_bwd, written once
// for any `Dev`: the real GPU (linear_cuda.cpp) and the CPU emulation of the same kernels
// (csrc/emulated/, the `cuda-emulated` test backend), so that CI runs this very code.
//
// Forward (C = R_T + KK*R_I tap-product columns, R = R_T + R_I adapter columns; u the
// adapters' input: x_adapter when given, else x):
//   P  = u A_all^T                  [N, C]
//   z  = route_forward(P)           [N, R]      acc dtype (saved for the backward)
//   y  = x W^T + b                  [N, D_out]  the base GEMM, exactly as F.linear makes it
//   y += (z * scales) Bcat^T        the expand accumulates onto y (beta = 1)
// Backward:
//   dz = (dy Bcat) * scales,  dBcat = dy^T z,  dP = route_backward(dz),  dA_all = dP^T u
//   dx = dy W;  dx += dP A_all      the transposed convolution accumulates onto dx (beta = 1),
//                                   or, with an x_adapter, is its gradient on its own
//   dW = dy^T x,  db = sum dy       only when asked for
// Why no hand-written GEMM: the D-wide GEMMs are where the time goes, and on Hopper cuBLAS runs
// them with TMA + wgmma kernels that a hand-written mma.sync GEMM does not match; the adapter
// adds only rank-R work, which rides in cuBLAS GEMMs whose beta = 1 is applied in the epilogue.
// That costs one extra read and write of y (and dx) per layer, which the Triton backend avoids
// by putting the expand into its own GEMM's K loop; `moss bench` on a GPU measures both.
//
// Numerics (docs/design.md section 3). fp16 inputs keep the rank-space intermediates (P, dz,
// dP) and the products that meet them in fp32 (`Dev::mm_fp32`): a routed sum of K*K tap
// products, or a gradient dy B, can pass fp16's 65504 while every output fits; bf16 has fp32's
// range and stays in bf16. Scales multiply z and dz in fp32, never B (scale * B rounded to a
// half dtype puts its epsilon on every weight). A NaN or Inf in one route's B (forward) or A
// (dx) would reach every other route's rows through the full-width expand (0 * NaN): the
// expand runs on the weights' finite part (pack_up / pack_down) and `poison` puts NaN back on
// exactly the rows of the route that reads the bad column. Every adapter GEMM covers all N rows:
// skipping the columns routing makes zero (as the CPU backend does) would need the route on the
// host, i.e. a device sync.
//
// A Dev provides: guard(x) (RAII, x's device current), check_dtype(x), empty(sizes, options)
// for the outputs the kernels write, mm_fp32(a, b) (an fp32-accumulating product with an fp32
// result), and the launches of route_launch.h: route_forward, route_backward, pack_up,
// pack_down, poison.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../linear.h"

namespace moss {
namespace composition {

// The image adapter's taps [K*K*R_I, D_in], tap-major, after the text rows: A_all.
inline at::Tensor stack_down(const at::Tensor& text_A, const at::Tensor& image_A) {
  const auto r_i = image_A.size(0), d_in = image_A.size(1), k = image_A.size(2);
  return at::cat({text_A, image_A.permute({2, 3, 0, 1}).reshape({k * k * r_i, d_in})}, 0);
}

// The adapters' scales per rank column, fp32.
inline at::Tensor column_scales(int64_t r_t, int64_t r_i, double text_scale, double image_scale,
                                const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kFloat);
  return at::cat({at::full({r_t}, text_scale, opts), at::full({r_i}, image_scale, opts)});
}

template <typename Dev>
std::tuple<at::Tensor, at::Tensor> forward(
    const Dev& dev, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x_adapter,
    const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
    const at::Tensor& image_B, const at::Tensor& route, const at::Tensor& nbr, double text_scale,
    double image_scale) {
  check_forward_args(x, weight, bias, text_A, text_B, image_A, image_B, route, nbr);
  check_adapter_input(x, x_adapter);
  dev.check_dtype(x);
  [[maybe_unused]] const auto guard = dev.guard(x);  // x's device current, to the end
  const int64_t n = x.size(0), d_out = weight.size(0), r_t = text_A.size(0);
  const int64_t r_i = image_A.size(0);
  const bool wide = x.scalar_type() == at::kHalf;
  const at::Tensor a_all = stack_down(text_A, image_A);
  const at::Tensor& u = x_adapter.has_value() ? *x_adapter : x;
  const at::Tensor p = wide ? dev.mm_fp32(u, a_all.t()) : at::mm(u, a_all.t());  // [N, C]
  at::Tensor z = dev.empty({n, r_t + r_i}, x.options().dtype(acc_type(x.scalar_type())));
  dev.route_forward(p, route, nbr, r_t, r_i, z);
  at::Tensor b_cat = dev.empty({d_out, r_t + r_i}, x.options().dtype(wide ? at::kFloat
                                                                          : x.scalar_type()));
  at::Tensor bad = at::empty({2, d_out}, x.options().dtype(at::kByte));
  dev.pack_up(text_B, image_B, b_cat, bad);
  const at::Tensor z_s = z * column_scales(r_t, r_i, text_scale, image_scale, z);
  at::Tensor y;
  if (wide) {
    y = dev.mm_fp32(x, weight.t());
    if (bias.has_value()) y.add_(*bias);
    y.addmm_(z_s, b_cat.t());
  } else {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.addmm_(z_s.to(x.scalar_type()), b_cat.t());
  }
  dev.poison(y, route, bad);
  return {wide ? y.to(x.scalar_type()) : y, z};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;

template <typename Dev>
Grads backward(const Dev& dev, const at::Tensor& dy_in, const c10::optional<at::Tensor>& x,
               const at::Tensor& weight, const c10::optional<at::Tensor>& x_adapter,
               const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
               const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
               const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
               bool need_dweight, bool need_dbias, bool need_dx_adapter) {
  const at::Tensor& u = backward_adapter_input(x, x_adapter, need_dweight, need_dx_adapter);
  check_forward_args(u, weight, c10::nullopt, text_A, text_B, image_A, image_B, route, nbr_t);
  dev.check_dtype(u);
  [[maybe_unused]] const auto guard = dev.guard(u);  // the inputs' device current, to the end
  const at::Tensor dy = dy_in.contiguous();  // a gradient may arrive expanded (stride 0)
  const int64_t n = u.size(0), d_in = u.size(1);
  const int64_t r_t = text_A.size(0), r_i = image_A.size(0), kk = nbr_t.size(1);
  const int64_t c = r_t + kk * r_i;
  check_backward_args(dy, u, weight, z, r_t + r_i);
  const auto dtype = u.scalar_type();
  const auto acc = acc_type(dtype);
  const bool wide = dtype == at::kHalf;
  const bool half = dtype != at::kFloat;  // fp16 or bf16
  const auto up = [&](const at::Tensor& t) { return wide ? t.to(at::kFloat) : t; };

  // dz reads B as it is: a non-finite entry reaches dz columns only the route's rows read. For
  // half types dz and dBcat come out of their GEMMs in fp32 and are scaled there, so each is
  // rounded once (bf16's dP when it is stored, below).
  const at::Tensor b_cat = at::cat({text_B, image_B}, 1);
  at::Tensor dz = half ? dev.mm_fp32(dy, b_cat) : at::mm(dy, b_cat);  // [N, R]
  dz.mul_(column_scales(r_t, r_i, text_scale, image_scale, dz));
  const at::Tensor d_b_cat =                                                         // [D_out, R]
      wide ? at::mm(up(dy).t(), z)
           : half ? dev.mm_fp32(dy.t(), z.to(dy.scalar_type())) : at::mm(dy.t(), z);
  at::Tensor dp = dev.empty({n, c}, dz.options());
  dev.route_backward(dz, route, nbr_t, r_t, r_i, dp);
  if (half && !wide) dp = dp.to(dtype);  // bf16 rank-space values stay bf16
  const at::Tensor d_all = at::mm(dp.t(), up(u)).to(acc);  // [C, D_in]
  at::Tensor dx = at::empty({0}, u.options()), dx_adapter = at::empty({0}, u.options());
  if (need_dx) dx = wide ? dev.mm_fp32(dy, weight) : at::mm(dy, weight);
  // The adapters' input gradient dP A_all: onto dx when they read x (no second pass over dx),
  // else x_adapter's gradient on its own (a GEMM of reduction C, not a second dy W).
  const bool separate = x_adapter.has_value();
  if (need_dx_adapter || (need_dx && !separate)) {
    at::Tensor a_all = dev.empty({c, d_in}, u.options().dtype(wide ? at::kFloat : dtype));
    at::Tensor bad = at::empty({2, d_in}, u.options().dtype(at::kByte));
    dev.pack_down(text_A, image_A, a_all, bad);
    if (separate) {
      dx_adapter = at::mm(dp, a_all);
    } else {
      dx.addmm_(dp, a_all);
    }
    dev.poison(separate ? dx_adapter : dx, route, bad);
  }
  dx = dx.to(dtype);
  dx_adapter = dx_adapter.to(dtype);
  at::Tensor dw = need_dweight ? at::mm(dy.t(), *x) : at::empty({0}, u.options());
  at::Tensor db = need_dbias ? dy.sum({0}, false, acc).to(dy.scalar_type())
                             : at::empty({0}, u.options());

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
  return {dx, dw, db, dx_adapter, d_text_A, d_text_B, d_image_A, d_image_B};
}

// The two ops' kernels for a device, as TORCH_LIBRARY_IMPL registers them.
template <typename Dev>
std::tuple<at::Tensor, at::Tensor> forward_op(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x_adapter, const at::Tensor& text_A,
    const at::Tensor& text_B, const at::Tensor& image_A, const at::Tensor& image_B,
    const at::Tensor& route, const at::Tensor& nbr, double text_scale, double image_scale) {
  return forward(Dev{}, x, weight, bias, x_adapter, text_A, text_B, image_A, image_B, route,
                 nbr, text_scale, image_scale);
}

template <typename Dev>
Grads backward_op(const at::Tensor& dy, const c10::optional<at::Tensor>& x,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& x_adapter,
                  const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
                  const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
                  const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
                  bool need_dweight, bool need_dbias, bool need_dx_adapter) {
  return backward(Dev{}, dy, x, weight, x_adapter, text_A, text_B, image_A, image_B, z, route,
                  nbr_t, text_scale, image_scale, need_dx, need_dweight, need_dbias,
                  need_dx_adapter);
}

}  // namespace composition
}  // namespace moss
