// moss::_ext_decode on CPU: one incremental decode step of a MOSS linear layer, in one call.
//
// For a batch of B new tokens (one per sequence), each with its kind (0 text, 1 image, -1
// neither: padding) and, for image tokens, its position in its image (row-major, width W), with
// the adapters packed once per generation (moss_kernels/decode.py: a_all = [A_t; A_taps],
// b_cat = [s_t B_t | s_i B_i]):
//   y = x W^T + b;  P = x a_all^T                                      (ATen: MKL's GEMVs)
//   z[t] = text: P[t, :R_T] | 0;  image: 0 | sum over the K*K causal taps (p, q) inside the image
//          of ring[t, (pos + (p-K+1) W + (q-K+1)) % S][tap columns], after
//          ring[t, pos % S] = P[t, R_T:]
//   y += z b_cat^T
// ring [B, S, K*K*R_I] (S = ring_size(K, W) slots, moss_kernels/decode.py) is the decode state,
// updated in place: the tap products of each sequence's last S image tokens. The math is
// moss_kernels/decode.py's reference (its specification); why one op: the step is a handful of
// tiny GEMVs and gathers, and as ~25 PyTorch calls from Python per layer per token it cost 2.4x
// PEFT LoRA's decode on the dev CPU (#16). Here it is three GEMVs and one loop.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace moss {
namespace cpu {
namespace {

void check_decode_args(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                       const at::Tensor& b_cat, const at::Tensor& ring, const at::Tensor& kind,
                       const at::Tensor& pos, int64_t width, int64_t r_t, int64_t k) {
  TORCH_CHECK(x.dim() == 2, "x: expected [B, D_in], got ", x.sizes());
  const int64_t b = x.size(0), d_in = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d_in, "weight: expected [D_out, ", d_in,
              "], got ", weight.sizes());
  const int64_t d_out = weight.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == d_out),
              "bias: expected [", d_out, "]");
  TORCH_CHECK(width >= 1 && k >= 1 && r_t >= 0, "width, kernel_size: expected >= 1, r_text >= 0");
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
  for (const at::Tensor* t : {&weight, &a_all, &b_cat, &ring}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "weights, adapters and ring must have x's dtype ", x.scalar_type(),
                " and device ", x.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
}

at::Tensor decode_cpu(const at::Tensor& x, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                      const at::Tensor& b_cat, at::Tensor& ring, const at::Tensor& kind,
                      const at::Tensor& pos, int64_t width, int64_t r_t, int64_t k) {
  check_decode_args(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_t, k);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  const int64_t b = x.size(0), kk = k * k, r_i = (a_all.size(0) - r_t) / kk, c = kk * r_i;
  const int64_t slots = r_i > 0 ? ring.size(1) : 0, r = r_t + r_i;
  if (r == 0) return y;
  const at::Tensor p = at::mm(x, a_all.t());  // [B, R_T + K*K*R_I]: text, then tap products
  at::Tensor z = at::empty({b, r}, x.options());
  const int8_t* kd = kind.data_ptr<int8_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moss_decode_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* rp = ring.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    for (int64_t t = 0; t < b; ++t) {
      const scalar_t* pt = pp + t * (r_t + c);
      scalar_t* zt = zp + t * r;
      for (int64_t j = 0; j < r_t; ++j) zt[j] = kd[t] == 0 ? pt[j] : scalar_t(0);
      for (int64_t j = 0; j < r_i; ++j) zt[r_t + j] = scalar_t(0);
      if (kd[t] != 1 || slots == 0) continue;
      scalar_t* rt = rp + t * slots * c;
      std::copy(pt + r_t, pt + r_t + c, rt + (ps[t] % slots) * c);
      const int64_t row = ps[t] / width, col = ps[t] % width;
      for (int64_t j = 0; j < r_i; ++j) {
        A acc = 0;
        for (int64_t i = 0; i < k; ++i) {    // causal: row offsets -(K-1)..0
          for (int64_t q = 0; q < k; ++q) {  // and column offsets -(K-1)..0
            const int64_t dr = i - (k - 1), dc = q - (k - 1);
            if (row + dr < 0 || col + dc < 0) continue;
            const int64_t src = (ps[t] + dr * width + dc) % slots;
            acc += static_cast<A>(rt[src * c + (i * k + q) * r_i + j]);
          }
        }
        zt[r_t + j] = static_cast<scalar_t>(acc);
      }
    }
  });
  y.addmm_(z, b_cat.t());
  return y;
}

// Shapes only, for torch.compile's fake tensors (which run an op's Meta kernel).
at::Tensor decode_meta(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                       at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                       int64_t) {
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) { m.impl("_ext_decode", &cpu::decode_cpu); }
TORCH_LIBRARY_IMPL(moss, Meta, m) { m.impl("_ext_decode", &cpu::decode_meta); }

}  // namespace moss
