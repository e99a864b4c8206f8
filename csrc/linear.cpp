// The MOSS linear layer composed from ATen GEMMs and a device's two routing kernels.
//
// Forward (C = R_T + KK*R_I tap-product columns, R = R_T + R_I adapter columns):
//   P  = x A_all^T                  [N, C]      per row block, only the columns it needs
//   z  = route_forward(P)           [N, R]      acc dtype (saved for the backward)
//   y  = x W^T + b                  [N, D_out]  the base GEMM, one call, as F.linear makes it
//   y += z Bcat^T                   per row block: the expand accumulates onto y (beta = 1)
// Backward:
//   dz = dy Bcat,  dBcat += dy^T z  per row block
//   dP = route_backward(dz)         [N, C]
//   dA_all += dP^T x                per row block
//   dx = dy W;  dx += dP A_all      per row block: the transposed convolution accumulates onto dx
//   dW = dy^T x,  db = sum dy       only when asked for
//
// Why this shape. Every D-wide operation is a dense GEMM done by ATen (MKL/oneDNN on CPU,
// cuBLAS on CUDA), which we could not beat by hand. The base GEMM is one call, exactly
// F.linear's; the adapter's expand is a rank-R GEMM that accumulates onto its output
// (beta = 1: cuBLAS and MKL apply it in the GEMM's epilogue, no separate elementwise pass).
// Measured on the 2-core dev machine (4096 x 1024 x 1024 fp32, interleaved medians): running
// the base GEMM per 256-row block, so that each block is still in cache for the expand, was
// no faster (1.15x vs 1.12x F.linear for the whole forward), and putting beta = 1 on the big
// GEMM instead (expand first) cost 3-8% more. On CUDA the expand's beta = 1 still costs one
// extra read and write of y; the Triton backend avoids it by fusing the expand into the base
// GEMM's K loop, and the benchmark shows which of the two wins.
//
// Row blocks let a device skip adapter work that routing makes zero: a block with no image
// token needs none of the K*K*R_I tap columns, one with no text token none of the text
// columns (with half the tokens in images that halves the adapter FLOPs). Values the skip
// leaves unset are never read: the routing kernels read text columns only on text rows and tap
// columns only on image rows, and they select rather than multiply by a mask, so garbage
// (even NaN) in an unset entry cannot leak.
#include "linear.h"

#include <c10/util/Optional.h>

namespace moss {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A_all [R_T + KK*R_I, D_in]: the text rows, then one block of R_I rows per tap (p*K + q).
at::Tensor stack_down(const at::Tensor& text_A, const at::Tensor& image_A) {
  const auto r_i = image_A.size(0), d_in = image_A.size(1), k = image_A.size(2);
  return at::cat({text_A, image_A.permute({2, 3, 0, 1}).reshape({k * k * r_i, d_in})}, 0);
}

struct Cols {
  int64_t start, len;
};

// The columns of a [*, r_t + rest] rank-space matrix that block b needs, if any.
c10::optional<Cols> needed(const RowBlock& b, int64_t r_t, int64_t total) {
  Cols c{b.text ? 0 : r_t, (b.image ? total : r_t) - (b.text ? 0 : r_t)};
  if (!(b.text || b.image) || c.len <= 0) return c10::nullopt;
  return c;
}

at::Tensor rows(const at::Tensor& t, const RowBlock& b) { return t.slice(0, b.start, b.end); }
at::Tensor cols(const at::Tensor& t, const Cols& c) { return t.narrow(1, c.start, c.len); }

// acc += a @ b, where acc may be wider than the operands' dtype (fp32 for bf16 inputs).
void accumulate(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

}  // namespace

void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& text_A,
                        const at::Tensor& text_B, const at::Tensor& image_A,
                        const at::Tensor& image_B, const at::Tensor& route,
                        const at::Tensor& window) {
  TORCH_CHECK(x.dim() == 2, "x: expected [N, D_in], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight: expected [D_out, ", x.size(1), "], got ", weight.sizes());
  const auto d_in = x.size(1), d_out = weight.size(0);
  TORCH_CHECK(text_A.dim() == 2 && text_A.size(1) == d_in, "text_A: expected [R_T, ", d_in,
              "], got ", text_A.sizes());
  TORCH_CHECK(text_B.dim() == 2 && text_B.size(0) == d_out && text_B.size(1) == text_A.size(0),
              "text_B: expected [", d_out, ", ", text_A.size(0), "], got ", text_B.sizes());
  TORCH_CHECK(image_A.dim() == 4 && image_A.size(1) == d_in && image_A.size(2) == image_A.size(3),
              "image_A: expected [R_I, ", d_in, ", K, K], got ", image_A.sizes());
  TORCH_CHECK(image_B.dim() == 2 && image_B.size(0) == d_out &&
                  image_B.size(1) == image_A.size(0),
              "image_B: expected [", d_out, ", ", image_A.size(0), "], got ", image_B.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "bias: expected [", d_out,
                "], got ", bias->sizes());
  }
  for (const at::Tensor* t : {&weight, &text_A, &text_B, &image_A, &image_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "weights and adapters must have x's dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
  const auto kk = image_A.size(2) * image_A.size(3);
  TORCH_CHECK(route.scalar_type() == at::kChar && route.dim() == 1 && route.size(0) == x.size(0) &&
                  route.is_contiguous() && route.device() == x.device(),
              "route: expected a contiguous int8 [", x.size(0), "] tensor on ", x.device(),
              ", got ", route.scalar_type(), " ", route.sizes());
  TORCH_CHECK(window.scalar_type() == at::kInt && window.dim() == 2 &&
                  window.size(0) == x.size(0) && window.size(1) == kk &&
                  window.is_contiguous() && window.device() == x.device(),
              "nbr/nbr_t: expected a contiguous int32 [", x.size(0), ", ", kk, "] tensor on ",
              x.device(), ", got ", window.scalar_type(), " ", window.sizes());
}

std::tuple<at::Tensor, at::Tensor> linear_forward(
    const Device& dev, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& text_A, const at::Tensor& text_B,
    const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& route,
    const at::Tensor& nbr, double text_scale, double image_scale) {
  check_forward_args(x, weight, bias, text_A, text_B, image_A, image_B, route, nbr);
  const int64_t n = x.size(0);
  const int64_t r_t = text_A.size(0), r_i = image_A.size(0);
  const at::Tensor a_all = stack_down(text_A, image_A);  // [C, D_in]
  const int64_t c = a_all.size(0);

  at::Tensor p = at::empty({n, c}, x.options());  // [N, C]
  for (const auto& b : dev.blocks) {
    if (auto cc = needed(b, r_t, c)) {
      at::Tensor pb = cols(rows(p, b), *cc);
      at::mm_out(pb, rows(x, b), a_all.narrow(0, cc->start, cc->len).t());
    }
  }
  at::Tensor z = at::empty({n, r_t + r_i}, x.options().dtype(acc_type(x.scalar_type())));
  dev.route_forward(p, route, nbr, r_t, r_i, z);

  const at::Tensor z_lo = z.to(x.scalar_type());
  const at::Tensor b_cat = at::cat({text_B * text_scale, image_B * image_scale}, 1);  // [D_out, R]
  // The base GEMM in one call, exactly as F.linear does it.
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  for (const auto& b : dev.blocks) {
    if (auto cc = needed(b, r_t, r_t + r_i)) {
      rows(y, b).addmm_(cols(rows(z_lo, b), *cc), cols(b_cat, *cc).t());
    }
  }
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_backward(const Device& dev, const at::Tensor& dy_in, const at::Tensor& x,
                const at::Tensor& weight, const at::Tensor& text_A, const at::Tensor& text_B,
                const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& z,
                const at::Tensor& route, const at::Tensor& nbr_t, double text_scale,
                double image_scale, bool need_dx, bool need_dweight, bool need_dbias) {
  check_forward_args(x, weight, c10::nullopt, text_A, text_B, image_A, image_B, route, nbr_t);
  const at::Tensor dy = dy_in.contiguous();  // a gradient may arrive expanded (stride 0)
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == weight.size(0) &&
                  dy.scalar_type() == x.scalar_type(),
              "dy: expected ", x.scalar_type(), " [", x.size(0), ", ", weight.size(0),
              "], got ", dy.scalar_type(), " ", dy.sizes());
  const int64_t n = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t r_t = text_A.size(0), r_i = image_A.size(0), r = r_t + r_i;
  TORCH_CHECK(z.dim() == 2 && z.size(0) == n && z.size(1) == r, "z: expected [", n, ", ", r,
              "], got ", z.sizes());
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor b_cat = at::cat({text_B * text_scale, image_B * image_scale}, 1);
  const at::Tensor z_lo = z.to(x.scalar_type());
  const at::Tensor a_all = stack_down(text_A, image_A);
  const int64_t c = a_all.size(0);

  at::Tensor dz = at::empty({n, r}, dy.options());
  at::Tensor d_b_cat = at::zeros({d_out, r}, dy.options().dtype(acc));
  for (const auto& b : dev.blocks) {
    if (auto cc = needed(b, r_t, r)) {
      const at::Tensor dyb = rows(dy, b);
      at::Tensor dzb = cols(rows(dz, b), *cc);
      at::mm_out(dzb, dyb, cols(b_cat, *cc));
      accumulate(cols(d_b_cat, *cc), dyb.t(), cols(rows(z_lo, b), *cc));
    }
  }
  at::Tensor dp = at::empty({n, c}, dy.options());
  dev.route_backward(dz, route, nbr_t, r_t, r_i, dp);

  at::Tensor d_all = at::zeros({c, d_in}, dy.options().dtype(acc));
  for (const auto& b : dev.blocks) {
    if (auto cc = needed(b, r_t, c)) {
      accumulate(d_all.narrow(0, cc->start, cc->len), cols(rows(dp, b), *cc).t(), rows(x, b));
    }
  }
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::mm(dy, weight);
    for (const auto& b : dev.blocks) {
      if (auto cc = needed(b, r_t, c)) {
        rows(dx, b).addmm_(cols(rows(dp, b), *cc), a_all.narrow(0, cc->start, cc->len));
      }
    }
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

}  // namespace moss
