// CPU kernels of moss::_ext_linear_fwd / _ext_linear_bwd: row blocks read from the route, the
// two routing kernels (OpenMP through at::parallel_for), and the CPU registration.
//
// The GEMMs are ATen's (linear.cpp). Routing is O(N * K^2 * R) copies and adds, a percent or
// two of the layer; its inner loops run over contiguous rank columns with the tap's source row
// fixed, so they vectorise.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../linear.h"

namespace moss {
namespace {

// Rows per block of the adapter GEMMs. Large enough that the skinny per-block GEMMs keep
// MKL busy on all cores, small enough that an image of 256+ tokens (16 x 16 and larger grids)
// makes whole blocks text-free and a text run of 256+ tokens makes them image-free.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kGrain = 64;  // tokens per parallel_for task

std::vector<RowBlock> row_blocks(const at::Tensor& route) {
  const int8_t* r = route.data_ptr<int8_t>();
  const int64_t n = route.size(0);
  std::vector<RowBlock> blocks;
  for (int64_t start = 0; start < n; start += kRowBlock) {
    RowBlock b{start, std::min(start + kRowBlock, n), false, false};
    for (int64_t t = b.start; t < b.end; ++t) {
      b.text |= r[t] == 0;
      b.image |= r[t] == 1;
    }
    blocks.push_back(b);
  }
  return blocks;
}

template <typename scalar_t>
void route_forward_rows(const scalar_t* p, int64_t ldp, const int8_t* route, const int32_t* nbr,
                        int64_t begin, int64_t end, int64_t r_t, int64_t r_i, int64_t kk,
                        at::opmath_type<scalar_t>* z) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ldz = r_t + r_i;
  for (int64_t t = begin; t < end; ++t) {
    acc_t* zt = z + t * ldz;
    const scalar_t* pt = p + t * ldp;
    if (route[t] == 0) {
      for (int64_t j = 0; j < r_t; ++j) zt[j] = static_cast<acc_t>(pt[j]);
    } else {
      for (int64_t j = 0; j < r_t; ++j) zt[j] = acc_t(0);
    }
    acc_t* zi = zt + r_t;
    for (int64_t j = 0; j < r_i; ++j) zi[j] = acc_t(0);
    for (int64_t tap = 0; tap < kk; ++tap) {
      const int64_t s = nbr[t * kk + tap];
      if (s < 0) continue;
      const scalar_t* ps = p + s * ldp + r_t + tap * r_i;
      for (int64_t j = 0; j < r_i; ++j) zi[j] += static_cast<acc_t>(ps[j]);
    }
  }
}

template <typename scalar_t>
void route_backward_rows(const scalar_t* dz, int64_t ldz, const int8_t* route,
                         const int32_t* nbr_t, int64_t begin, int64_t end, int64_t r_t,
                         int64_t r_i, int64_t kk, scalar_t* dp) {
  const int64_t ldp = r_t + kk * r_i;
  for (int64_t s = begin; s < end; ++s) {
    scalar_t* dps = dp + s * ldp;
    const scalar_t* dzs = dz + s * ldz;
    if (route[s] == 0) {
      for (int64_t j = 0; j < r_t; ++j) dps[j] = dzs[j];
    } else {
      for (int64_t j = 0; j < r_t; ++j) dps[j] = scalar_t(0);
    }
    for (int64_t tap = 0; tap < kk; ++tap) {
      scalar_t* dst = dps + r_t + tap * r_i;
      const int64_t t = nbr_t[s * kk + tap];
      if (t < 0) {
        for (int64_t j = 0; j < r_i; ++j) dst[j] = scalar_t(0);
      } else {
        const scalar_t* src = dz + t * ldz + r_t;
        for (int64_t j = 0; j < r_i; ++j) dst[j] = src[j];
      }
    }
  }
}

void route_forward_cpu(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                       int64_t r_t, int64_t r_i, at::Tensor& z) {
  const int64_t n = p.size(0), kk = nbr.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.scalar_type(), "moss_route_forward_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const int8_t* rr = route.data_ptr<int8_t>();
    const int32_t* nn = nbr.data_ptr<int32_t>();
    auto* zz = z.data_ptr<at::opmath_type<scalar_t>>();
    const int64_t ldp = p.stride(0);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      route_forward_rows(pp, ldp, rr, nn, begin, end, r_t, r_i, kk, zz);
    });
  });
}

void route_backward_cpu(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                        int64_t r_t, int64_t r_i, at::Tensor& dp) {
  const int64_t n = dz.size(0), kk = nbr_t.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dz.scalar_type(), "moss_route_backward_cpu", [&] {
    const scalar_t* dd = dz.data_ptr<scalar_t>();
    const int8_t* rr = route.data_ptr<int8_t>();
    const int32_t* nn = nbr_t.data_ptr<int32_t>();
    scalar_t* out = dp.data_ptr<scalar_t>();
    const int64_t ldz = dz.stride(0);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      route_backward_rows(dd, ldz, rr, nn, begin, end, r_t, r_i, kk, out);
    });
  });
}

void check_cpu_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "x: the cpu backend supports float32, float64 and bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
    const at::Tensor& image_B, const at::Tensor& route, const at::Tensor& nbr,
    double text_scale, double image_scale) {
  check_cpu_dtype(x);
  TORCH_CHECK(route.is_contiguous() && route.scalar_type() == at::kChar,
              "route: expected a contiguous int8 tensor");
  const Device dev{row_blocks(route), route_forward_cpu, route_backward_cpu};
  return linear_forward(dev, x, weight, bias, text_A, text_B, image_A, image_B, route, nbr,
                        text_scale, image_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
             const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
             const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
             const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
             bool need_dweight, bool need_dbias) {
  check_cpu_dtype(x);
  TORCH_CHECK(route.is_contiguous() && route.scalar_type() == at::kChar,
              "route: expected a contiguous int8 tensor");
  const Device dev{row_blocks(route), route_forward_cpu, route_backward_cpu};
  return linear_backward(dev, dy, x, weight, text_A, text_B, image_A, image_B, z, route, nbr_t,
                         text_scale, image_scale, need_dx, need_dweight, need_dbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(moss, CPU, m) {
  m.impl("_ext_linear_fwd", &forward_cpu);
  m.impl("_ext_linear_bwd", &backward_cpu);
}

}  // namespace moss
