// The composition of moss::_ext_decode (one decode step of a MOSS linear layer; the math and
// why it is one op: moss_kernels/decode.py), written once for any `Dev`: the CPU (csrc/cpu/
// decode_cpu.cpp), the GPU (linear_cuda.cpp) and the CPU emulation of the GPU kernel
// (csrc/emulated/, the `cuda-emulated` test backend), so the kernel CI runs is the GPU's.
//
//   y  = x W^T + b                           the base GEMV, exactly as F.linear makes it
//   P  = x A_all^T                           [B, R_T + KK*R_I], in the ring's dtype
//   z  = decode_taps(P, ring, kind, pos)     [B, R_T + R_I], acc dtype; the ring's new slots
//   y += z Bcat^T                            Bcat = [s_t B_t | s_i B_i], scales packed in
//
// Numerics as the full op's (linear_impl.h): fp16 keeps the rank space in fp32 (P, the ring,
// and y until its last rounding: a tap product or a sum of K*K of them can pass 65504 where
// the output fits); bf16, fp32 and fp64 keep their own dtype. Shapes never depend on the data
// and nothing reads it on the host: a step can be captured in a CUDA graph.
//
// A Dev provides guard(x), empty(sizes, options), mm_fp32(a, b) and decode_taps(p, ring, kind,
// pos, width, r_t, k, z) (route_launch.h's, with its Launch).
#pragma once

#include <ATen/ATen.h>

#include "../linear.h"

namespace moss {
namespace composition {

// The dtype of the ring and of P for x's dtype (moss_kernels.decode.ring_dtype).
inline at::ScalarType ring_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

inline void check_decode_args(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                              const at::Tensor& b_cat, const at::Tensor& ring,
                              const at::Tensor& kind, const at::Tensor& pos,
                              const at::Tensor& width, int64_t r_t, int64_t k) {
  TORCH_CHECK(x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1),
              "x: expected [B, D_in] or [B, 1, D_in], got ", x.sizes());
  const int64_t b = x.size(0), d_in = x.size(-1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d_in, "weight: expected [D_out, ", d_in,
              "], got ", weight.sizes());
  const int64_t d_out = weight.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == d_out),
              "bias: expected [", d_out, "]");
  TORCH_CHECK(k >= 1 && r_t >= 0, "kernel_size: expected >= 1, r_text >= 0");
  TORCH_CHECK(a_all.dim() == 2 && a_all.size(1) == d_in && a_all.size(0) >= r_t &&
                  (a_all.size(0) - r_t) % (k * k) == 0,
              "a_all: expected [R_T + K*K*R_I, ", d_in, "], got ", a_all.sizes());
  const int64_t r_i = (a_all.size(0) - r_t) / (k * k), c = k * k * r_i;
  TORCH_CHECK(b_cat.dim() == 2 && b_cat.size(0) == d_out && b_cat.size(1) == r_t + r_i,
              "b_cat: expected [", d_out, ", ", r_t + r_i, "], got ", b_cat.sizes());
  TORCH_CHECK(ring.dim() == 3 && ring.size(0) == b && (ring.size(1) == 0 || ring.size(2) == c) &&
                  ring.is_contiguous(),
              "ring: expected a contiguous [", b, ", S, ", c, "] tensor, got ", ring.sizes());
  TORCH_CHECK(kind.scalar_type() == at::kChar && kind.dim() == 1 && kind.size(0) == b &&
                  kind.is_contiguous(),
              "kind: expected a contiguous int8 [", b, "] tensor");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == b &&
                  pos.is_contiguous(),
              "pos: expected a contiguous int64 [", b, "] tensor");
  for (const at::Tensor* t : {&weight, &a_all, &b_cat}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "weights and adapters must have x's dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(ring.scalar_type() == ring_type(x.scalar_type()) && ring.device() == x.device(),
              "ring: expected ", ring_type(x.scalar_type()), " on ", x.device(), " (for ",
              x.scalar_type(), " inputs), got ", ring.scalar_type(), " on ", ring.device());
  TORCH_CHECK(width.scalar_type() == at::kLong && width.dim() == 1 && width.size(0) == b &&
                  width.is_contiguous(),
              "width: expected a contiguous int64 [", b, "] tensor");
  TORCH_CHECK(kind.device() == x.device() && pos.device() == x.device() &&
                  width.device() == x.device(),
              "kind, pos, width: expected them on x's device ", x.device());
  // The ring must hold each sequence's K x K window: values are checked where they are on the
  // host (a GPU check would be a device sync per layer and step); a smaller ring on the GPU
  // reads wrong slots, never outside it (slot = position % S).
  if (width.is_cpu()) {
    const int64_t* w = width.data_ptr<int64_t>();
    for (int64_t t = 0; t < b; ++t) {
      TORCH_CHECK(w[t] >= 1, "width[", t, "]: expected >= 1, got ", w[t]);
      TORCH_CHECK(ring.size(1) == 0 || ring.size(1) > (k - 1) * (w[t] + 1), "ring: expected at "
                  "least ", (k - 1) * (w[t] + 1) + 1, " slots (ring_size for width[", t, "] = ",
                  w[t], "), got ", ring.size(1));
    }
  }
}

// x [B, 1, D_in] (a layer's one token per sequence, as it comes) is read as its [B, D_in] rows,
// and y given the same shape: views made here cost a fraction of a Python view's (#16).
inline at::Tensor as_rows(const at::Tensor& x) { return x.dim() == 3 ? x.select(1, 0) : x; }
inline at::Tensor like_input(const at::Tensor& x, const at::Tensor& y) {
  return x.dim() == 3 ? y.unsqueeze(1) : y;
}

template <typename Dev>
at::Tensor decode(const Dev& dev, const at::Tensor& x_in, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                  const at::Tensor& b_cat, at::Tensor& ring, const at::Tensor& kind,
                  const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k) {
  check_decode_args(x_in, weight, bias, a_all, b_cat, ring, kind, pos, width, r_t, k);
  const at::Tensor x = as_rows(x_in);
  [[maybe_unused]] const auto guard = dev.guard(x);
  const bool wide = x.scalar_type() == at::kHalf;
  const int64_t b = x.size(0), r = b_cat.size(1);
  at::Tensor y;
  if (wide) {
    y = dev.mm_fp32(x, weight.t());
    if (bias.has_value()) y.add_(*bias);
  } else {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  if (r > 0) {
    const at::Tensor p = wide ? dev.mm_fp32(x, a_all.t()) : at::mm(x, a_all.t());
    at::Tensor z = dev.empty({b, r}, x.options().dtype(acc_type(x.scalar_type())));
    dev.decode_taps(p, ring, kind, pos, width, r_t, k, z);
    if (wide) {
      y.addmm_(z, b_cat.to(at::kFloat).t());
    } else {
      y.addmm_(z.to(x.scalar_type()), b_cat.t());
    }
  }
  return like_input(x_in, wide ? y.to(x.scalar_type()) : y);
}

// The op's kernel for a device, as TORCH_LIBRARY_IMPL registers it.
template <typename Dev>
at::Tensor decode_op(const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                     const at::Tensor& b_cat, at::Tensor& ring, const at::Tensor& kind,
                     const at::Tensor& pos, const at::Tensor& width, int64_t r_text,
                     int64_t kernel_size) {
  return decode(Dev{}, x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_text,
                kernel_size);
}

}  // namespace composition
}  // namespace moss
