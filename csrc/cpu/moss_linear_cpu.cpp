// CPU kernels of moss::_ext_linear_fwd / _ext_linear_bwd and their registration.
//
// u is what the adapters read: x_adapter when given, x * keep * scale with a dropout mask
// (LoRA dropout, read where the kernels read u: never written out), else x.
// Forward (P, dz, dP live in the accumulation type A, padded per route to whole vectors):
//   P  = project(u; A_text^T | A_taps^T)     tap products, each token only its route's columns
//   z  = route_forward(P)                     text: copy; image: sum of K*K taps over `nbr`
//   y  = x W^T + b                            ATen (MKL): the base GEMM, exactly F.linear's
//   y += expand(z; B_text^T | B_image^T)      in place, one pass over y
// Backward:
//   dz = project(dy; B_text | B_image),  dP = route_backward(dz)   (gather over `nbr_t`)
//   dB^T = outer(z, dy),  dA_all = outer(dP, u)
//   dx = dy W (ATen), then += expand(dP; A_text | A_taps) if u is x, else that expand is
//   dx_adapter's alone;  dW = dy^T x, db = sum dy if asked
// The rank-space kernels are in rank_kernels.h (why hand-written: see there); this file packs
// their operands, runs them under at::parallel_for (OpenMP), and holds the routing kernels.
// Measured on the 2-core dev machine: bench/results/README.md.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../linear.h"
#include "rank_kernels.h"

namespace moss {
namespace cpu {
namespace {

constexpr int64_t kGrain = 64;  // tokens per parallel_for task

// ---- routing (rank space, O(N * K^2 * R)) ---------------------------------------------------

template <typename A>
MOSS_INLINE void route_forward_rows(const A* p, int64_t ldp, int64_t p_img, const int8_t* route,
                                    const int32_t* nbr, int64_t kk, int64_t r_t, int64_t r_i,
                                    A* z, int64_t begin, int64_t end) {
  const int64_t ldz = r_t + r_i;
  for (int64_t t = begin; t < end; ++t) {
    A* zt = z + t * ldz;
    const A* pt = p + t * ldp;
    for (int64_t j = 0; j < r_t; ++j) zt[j] = route[t] == 0 ? pt[j] : A(0);
    A* zi = zt + r_t;
    for (int64_t j = 0; j < r_i; ++j) zi[j] = A(0);
    for (int64_t tap = 0; tap < kk; ++tap) {  // -1 for every tap unless t is an image token
      const int64_t s = nbr[t * kk + tap];
      if (s < 0) continue;
      const A* ps = p + s * ldp + p_img + tap * r_i;
      for (int64_t j = 0; j < r_i; ++j) zi[j] += ps[j];
    }
  }
}

// dP[s] for text and image rows (padding rows are never read). dz's image columns start at
// dz_img, dP's taps at dp_img.
template <typename A>
MOSS_INLINE void route_backward_rows(const A* dz, int64_t ldz, int64_t dz_img,
                                     const int8_t* route, const int32_t* nbr_t, int64_t kk,
                                     int64_t r_t, int64_t r_i, A* dp, int64_t ldp, int64_t dp_img,
                                     int64_t begin, int64_t end) {
  for (int64_t s = begin; s < end; ++s) {
    A* dps = dp + s * ldp;
    if (route[s] == 0) {
      for (int64_t j = 0; j < r_t; ++j) dps[j] = dz[s * ldz + j];
    } else if (route[s] == 1) {
      for (int64_t tap = 0; tap < kk; ++tap) {
        A* dst = dps + dp_img + tap * r_i;
        const int64_t t = nbr_t[s * kk + tap];
        for (int64_t j = 0; j < r_i; ++j) dst[j] = t < 0 ? A(0) : dz[t * ldz + dz_img + j];
      }
    }
  }
}

// ---- the ISA clones: one per kernel and dtype, each taking a range of work -------------------

#define MOSS_CPU_KERNELS(S, A)                                                                  \
  MOSS_CPU_CLONES void project(const ProjectArgs<S, A>& a, int64_t b, int64_t e) {             \
    MOSS_BY_WIDTH(project_rows, S, A, a, b, e);                                                 \
  }                                                                                             \
  MOSS_CPU_CLONES void expand(const ExpandArgs<S, A>& a, int64_t b, int64_t e) {               \
    MOSS_BY_WIDTH(expand_rows, S, A, a, b, e);                                                  \
  }                                                                                             \
  MOSS_CPU_CLONES void outer(const OuterArgs<S, A>& a, int r, int64_t o0) {                    \
    MOSS_BY_WIDTH(outer_task, S, A, a, r, o0);                                                  \
  }                                                                                             \
  MOSS_CPU_CLONES void kept(const S* x, int64_t ldx, int64_t d, const int8_t* route,            \
                            const Dropout<A>& drop, S* out, int64_t b, int64_t e) {             \
    MOSS_BY_WIDTH(kept_rows, S, A, x, ldx, d, route, drop, out, b, e);                          \
  }
MOSS_CPU_KERNELS(float, float)
MOSS_CPU_KERNELS(double, double)
MOSS_CPU_KERNELS(c10::BFloat16, float)
#undef MOSS_CPU_KERNELS

// The routing kernels read and write only the accumulation type A.
#define MOSS_CPU_ROUTING(A)                                                                     \
  MOSS_CPU_CLONES void route_forward(const A* p, int64_t ldp, int64_t p_img,                   \
                                     const int8_t* route, const int32_t* nbr, int64_t kk,       \
                                     int64_t r_t, int64_t r_i, A* z, int64_t b, int64_t e) {    \
    route_forward_rows(p, ldp, p_img, route, nbr, kk, r_t, r_i, z, b, e);                       \
  }                                                                                             \
  MOSS_CPU_CLONES void route_backward(const A* dz, int64_t ldz, int64_t dz_img,                \
                                      const int8_t* route, const int32_t* nbr_t, int64_t kk,    \
                                      int64_t r_t, int64_t r_i, A* dp, int64_t ldp,             \
                                      int64_t dp_img, int64_t b, int64_t e) {                   \
    route_backward_rows(dz, ldz, dz_img, route, nbr_t, kk, r_t, r_i, dp, ldp, dp_img, b, e);    \
  }
MOSS_CPU_ROUTING(float)
MOSS_CPU_ROUTING(double)
#undef MOSS_CPU_ROUTING

// ---- operand packing and the composition ------------------------------------------------------

// The lanes of the widest vector of the accumulation type (simd::kMaxBytes), for code that holds
// it as a ScalarType: buffers padded to whole ones are whole vectors of either width.
int64_t lanes(at::ScalarType acc) {
  return simd::kMaxBytes / static_cast<int64_t>(c10::elementSize(acc));
}

// m [c, d] -> [d, round_up(c)] = scale * m^T zero-padded: a project operand. The scale is
// applied in A: rounding scale * B to bf16 first would put an error of bf16's epsilon on every
// weight, which the cancelling sums of a gradient dy B amplify.
at::Tensor pack_t(const at::Tensor& m, at::ScalarType acc, double scale = 1.0) {
  at::Tensor w = at::zeros({m.size(1), simd::round_up(m.size(0), lanes(acc))},
                           m.options().dtype(acc));
  w.narrow(1, 0, m.size(0)).copy_(m.t()).mul_(scale);
  return w;
}

// The row stride of an expand operand or an outer accumulator with d columns: whole vectors plus
// one, so that consecutive rows do not sit a multiple of 4 KiB apart (for d = 1024 floats they
// would all map to the same L1 sets, and the expand's 16-64 row panel would thrash them).
int64_t row_stride(int64_t d, at::ScalarType acc) {
  return simd::round_up(d, lanes(acc)) + lanes(acc);
}

// m [c, d] -> [c, row_stride(d)] = scale * m zero-padded: an expand operand.
at::Tensor pack(const at::Tensor& m, at::ScalarType acc, double scale = 1.0) {
  at::Tensor w = at::zeros({m.size(0), row_stride(m.size(1), acc)}, m.options().dtype(acc));
  w.narrow(1, 0, m.size(1)).copy_(m).mul_(scale);
  return w;
}

// The image adapter's tap rows [K*K*R_I, D_in], tap-major (row (p*K + q)*R_I + j).
at::Tensor taps(const at::Tensor& image_A) {
  const auto r_i = image_A.size(0), d_in = image_A.size(1), k = image_A.size(2);
  return image_A.permute({2, 3, 0, 1}).reshape({k * k * r_i, d_in});
}

template <typename A>
Seg<A> seg(const at::Tensor& w, int64_t width, int64_t off) {
  return Seg<A>{w.data_ptr<A>(), w.size(1), width, off};
}

// x as the kernels read it: rows of unit stride (any row stride, 64-bit offsets).
at::Tensor unit_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

std::vector<int64_t> rows_of(const at::Tensor& route, int8_t r) {
  const int8_t* p = route.data_ptr<int8_t>();
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < route.size(0); ++t) {
    if (p[t] == r) rows.push_back(t);
  }
  return rows;
}

// The dropout a kernel applies to the input it reads: none without a mask.
template <typename A>
Dropout<A> dropout_of(const c10::optional<at::Tensor>& keep, double scale) {
  return keep.has_value() ? Dropout<A>{keep->data_ptr<uint8_t>(), keep->size(1), A(scale)}
                          : Dropout<A>{};
}

template <typename S, typename A>
void run_expand(at::Tensor& y, const at::Tensor& route, const at::Tensor& z, Seg<A> text,
                Seg<A> image, bool store = false, Dropout<A> drop = {}) {
  ExpandArgs<S, A> a{y.data_ptr<S>(), y.stride(0), y.size(1), route.data_ptr<int8_t>(),
                     z.data_ptr<A>(), z.stride(0), {text, image}, store, drop};
  at::parallel_for(0, y.size(0), kGrain, [&](int64_t b, int64_t e) { expand(a, b, e); });
}

// With dropout, each task projects blocks of kGrain rows that it first copies out of x through
// the mask (kept_rows): the block stays in cache, so dropout adds no pass over memory.
template <typename S, typename A>
void run_project(const at::Tensor& x, const at::Tensor& route, Seg<A> text, Seg<A> image,
                 at::Tensor& out, Dropout<A> drop = {}) {
  const ProjectArgs<S, A> a{x.data_ptr<S>(), x.stride(0), x.size(1), route.data_ptr<int8_t>(),
                            {text, image}, out.data_ptr<A>(), out.stride(0)};
  if (drop.keep == nullptr) {
    at::parallel_for(0, x.size(0), kGrain, [&](int64_t b, int64_t e) { project(a, b, e); });
    return;
  }
  const int64_t d = x.size(1);
  at::parallel_for(0, x.size(0), kGrain, [&](int64_t b, int64_t e) {
    std::vector<S> block(static_cast<size_t>(std::min(kGrain, e - b) * d));
    for (int64_t t = b; t < e; t += kGrain) {
      const int64_t u = std::min(e, t + kGrain);
      kept(a.x, a.ldx, d, a.route, drop, block.data(), t, u);
      ProjectArgs<S, A> local = a;
      local.x = block.data();
      local.ldx = d;
      local.row0 = t;
      project(local, t, u);
    }
  });
}

// g_r[j, :] = sum over route r's rows t of z[t, off_r + j] x[t, :] (g_r: [width_r, row_stride(D)]).
template <typename S, typename A>
void run_outer(const at::Tensor& x, const at::Tensor& z, const std::vector<int64_t> (&rows)[2],
               const int64_t (&width)[2], const int64_t (&off)[2], at::Tensor (&g)[2],
               Dropout<A> drop = {}) {
  const int64_t d = x.size(1), chunk = kOuterColumns<A>;
  OuterArgs<S, A> a{x.data_ptr<S>(), x.stride(0), d, z.data_ptr<A>(), z.stride(0),
                    {rows[0].data(), rows[1].data()},
                    {int64_t(rows[0].size()), int64_t(rows[1].size())},
                    {width[0], width[1]}, {off[0], off[1]},
                    {g[0].data_ptr<A>(), g[1].data_ptr<A>()}, g[0].size(1), drop};
  // Tasks interleave the routes (text chunk 0, image chunk 0, text chunk 1, ...) so that the
  // contiguous ranges parallel_for hands each thread carry both routes' work in proportion.
  const int64_t chunks = (d + chunk - 1) / chunk;
  at::parallel_for(0, 2 * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int r = int(task % 2);
      if (width[r] > 0 && !rows[r].empty()) outer(a, r, (task / 2) * chunk);
    }
  });
}

void check_cpu_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "x: the cpu backend supports float32, float64 and bfloat16, got ", t);
}

template <typename S>
std::tuple<at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x_adapter, const c10::optional<at::Tensor>& keep,
    double dropout_scale, const at::Tensor& text_A, const at::Tensor& text_B,
    const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& route,
    const at::Tensor& nbr, double text_scale, double image_scale) {
  using A = at::opmath_type<S>;
  const auto acc = acc_type(x_in.scalar_type());
  const at::Tensor x = unit_stride(x_in);
  const at::Tensor u = x_adapter.has_value() ? unit_stride(*x_adapter) : x;
  const int64_t n = x.size(0), r_t = text_A.size(0), r_i = image_A.size(0), kk = nbr.size(1);
  // y first: the allocator can then hand it the block the previous layer's output just freed
  // (malloc splits free blocks for smaller requests: allocated after P and z, y often lands on
  // fresh pages, and first-touch page faults cost several percent of the base GEMM here).
  at::Tensor y = at::empty({n, weight.size(0)}, x.options());
  const at::Tensor w_text = pack_t(text_A, acc), w_img = pack_t(taps(image_A), acc);
  at::Tensor p = at::empty({n, w_text.size(1) + w_img.size(1)}, x.options().dtype(acc));
  run_project<S, A>(u, route, seg<A>(w_text, r_t, 0), seg<A>(w_img, kk * r_i, w_text.size(1)),
                    p, dropout_of<A>(keep, dropout_scale));

  at::Tensor z = at::empty({n, r_t + r_i}, x.options().dtype(acc));
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    route_forward(p.data_ptr<A>(), p.stride(0), w_text.size(1), route.data_ptr<int8_t>(),
                  nbr.data_ptr<int32_t>(), kk, r_t, r_i, z.data_ptr<A>(), b, e);
  });

  if (bias.has_value()) {
    at::addmm_out(y, *bias, x, weight.t());
  } else {
    at::mm_out(y, x, weight.t());
  }
  const at::Tensor bt_text = pack(text_B.t(), acc, text_scale);
  const at::Tensor bt_img = pack(image_B.t(), acc, image_scale);
  run_expand<S, A>(y, route, z, seg<A>(bt_text, r_t, 0), seg<A>(bt_img, r_i, r_t));
  return {y, z};
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor>;

// u: the adapters' input (x_adapter, or x, read through `drop`'s mask when it has one); x: for
// dW only (undefined when not asked for).
template <typename S>
Grads backward_impl(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& u_in,
                    bool separate, Dropout<at::opmath_type<S>> drop, const at::Tensor& weight,
                    const at::Tensor& text_A,
                    const at::Tensor& text_B, const at::Tensor& image_A, const at::Tensor& image_B,
                    const at::Tensor& z, const at::Tensor& route, const at::Tensor& nbr_t,
                    double text_scale, double image_scale, bool need_dx, bool need_dweight,
                    bool need_dbias, bool need_dx_adapter) {
  using A = at::opmath_type<S>;
  const auto acc = acc_type(u_in.scalar_type());
  const at::Tensor u = unit_stride(u_in);
  const at::Tensor dy = dy_in.contiguous();  // a gradient may arrive expanded (stride 0)
  const int64_t n = u.size(0), d_in = u.size(1), d_out = weight.size(0);
  const int64_t r_t = text_A.size(0), r_i = image_A.size(0), kk = nbr_t.size(1);
  check_backward_args(dy, u, weight, z, r_t + r_i);
  // dx first, for the reason y comes first in the forward. dx_adapter is written whole by
  // the expand in store mode (padding rows zeroed), with no zero fill first.
  at::Tensor dx = need_dx ? at::empty({n, d_in}, u.options()) : at::empty({0}, u.options());
  at::Tensor dx_adapter = need_dx_adapter ? at::empty({n, d_in}, u.options())
                                          : at::empty({0}, u.options());

  // dz = dy B (scaled), then gathered back through the window into tap space.
  const at::Tensor w_text = pack_t(text_B.t(), acc, text_scale);
  const at::Tensor w_img = pack_t(image_B.t(), acc, image_scale);
  at::Tensor dz = at::empty({n, w_text.size(1) + w_img.size(1)}, dy.options().dtype(acc));
  run_project<S, A>(dy, route, seg<A>(w_text, r_t, 0), seg<A>(w_img, r_i, w_text.size(1)), dz);
  const at::Tensor a_text = pack(text_A, acc), a_img = pack(taps(image_A), acc);
  at::Tensor dp = at::empty({n, simd::round_up(r_t, lanes(acc)) + a_img.size(0)},
                            dy.options().dtype(acc));
  const int64_t dp_img = dp.size(1) - a_img.size(0);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    route_backward(dz.data_ptr<A>(), dz.stride(0), w_text.size(1), route.data_ptr<int8_t>(),
                   nbr_t.data_ptr<int32_t>(), kk, r_t, r_i, dp.data_ptr<A>(), dp.stride(0),
                   dp_img, b, e);
  });

  const std::vector<int64_t> rows[2] = {rows_of(route, 0), rows_of(route, 1)};
  const int64_t ld_b = row_stride(d_out, acc);
  at::Tensor g_b[2] = {at::zeros({r_t, ld_b}, dy.options().dtype(acc)),
                       at::zeros({r_i, ld_b}, dy.options().dtype(acc))};
  run_outer<S, A>(dy, z, rows, {r_t, r_i}, {0, r_t}, g_b);
  at::Tensor g_a[2] = {at::zeros({r_t, a_text.size(1)}, dy.options().dtype(acc)),
                       at::zeros({a_img.size(0), a_text.size(1)}, dy.options().dtype(acc))};
  run_outer<S, A>(u, dp, rows, {r_t, a_img.size(0)}, {0, dp_img}, g_a, drop);

  // The adapters' input gradient dP A_all: onto dx when they read x (through the dropout mask,
  // if any), else dx_adapter's own.
  const auto expand_dp = [&](at::Tensor& out, bool store) {
    run_expand<S, A>(out, route, dp, seg<A>(a_text, r_t, 0),
                     seg<A>(a_img, a_img.size(0), dp_img), store, store ? Dropout<A>{} : drop);
  };
  if (need_dx) {
    at::mm_out(dx, dy, weight);
    if (!separate) expand_dp(dx, false);
  }
  if (need_dx_adapter) expand_dp(dx_adapter, true);
  at::Tensor dw = need_dweight ? at::mm(dy.t(), x) : at::empty({0}, u.options());
  at::Tensor db = need_dbias ? dy.sum({0}, false, acc).to(dy.scalar_type())
                             : at::empty({0}, u.options());

  const auto k = image_A.size(2);
  const auto dtype = u.scalar_type();
  at::Tensor d_text_A = g_a[0].narrow(1, 0, d_in).to(dtype).contiguous();
  at::Tensor d_image_A = g_a[1]
                             .narrow(1, 0, d_in)
                             .reshape({k, k, r_i, d_in})
                             .permute({2, 3, 0, 1})
                             .to(dtype)
                             .contiguous();
  at::Tensor d_text_B = (g_b[0].narrow(1, 0, d_out).t() * text_scale).to(dtype).contiguous();
  at::Tensor d_image_B = (g_b[1].narrow(1, 0, d_out).t() * image_scale).to(dtype).contiguous();
  return {dx, dw, db, dx_adapter, d_text_A, d_text_B, d_image_A, d_image_B};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x_adapter, const c10::optional<at::Tensor>& dropout_mask,
    double dropout_scale, const at::Tensor& text_A, const at::Tensor& text_B,
    const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& route,
    const at::Tensor& nbr, double text_scale, double image_scale) {
  check_forward_args(x, weight, bias, text_A, text_B, image_A, image_B, route, nbr);
  check_adapter_input(x, x_adapter);
  check_dropout_mask(x, x_adapter, dropout_mask);
  check_cpu_dtype(x);
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "moss_forward_cpu", [&] {
    return forward_impl<scalar_t>(x, weight, bias, x_adapter, dropout_mask, dropout_scale,
                                  text_A, text_B, image_A, image_B, route, nbr, text_scale,
                                  image_scale);
  });
}

Grads backward_cpu(const at::Tensor& dy, const c10::optional<at::Tensor>& x,
                   const at::Tensor& weight, const c10::optional<at::Tensor>& x_adapter,
                   const c10::optional<at::Tensor>& dropout_mask, double dropout_scale,
                   const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
                   const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
                   const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
                   bool need_dweight, bool need_dbias, bool need_dx_adapter) {
  const at::Tensor& u = backward_adapter_input(x, x_adapter, need_dweight, need_dx_adapter);
  check_forward_args(u, weight, c10::nullopt, text_A, text_B, image_A, image_B, route, nbr_t);
  check_dropout_mask(u, x_adapter, dropout_mask);
  check_cpu_dtype(u);
  const at::Tensor x_or_none = x.has_value() ? *x : at::Tensor();
  return AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, u.scalar_type(), "moss_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    return backward_impl<scalar_t>(dy, x_or_none, u, x_adapter.has_value(),
                                   dropout_of<A>(dropout_mask, dropout_scale), weight, text_A,
                                   text_B, image_A, image_B, z, route, nbr_t, text_scale,
                                   image_scale, need_dx, need_dweight, need_dbias,
                                   need_dx_adapter);
  });
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) {
  m.impl("_ext_linear_fwd", &cpu::forward_cpu);
  m.impl("_ext_linear_bwd", &cpu::backward_cpu);
}

}  // namespace moss
