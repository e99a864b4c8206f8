// The CUDA backend of moss::_ext_linear_fwd / _ext_linear_bwd: linear_impl.h's composition on
// the GPU (cuBLAS GEMMs through ATen, the kernels of route_cuda.cu), and its registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "linear_impl.h"
#include "route_cuda.h"

namespace moss {
namespace {

struct CudaDev {
  c10::cuda::CUDAGuard guard(const at::Tensor& x) const { return c10::cuda::CUDAGuard(x.device()); }

  void check_dtype(const at::Tensor& x) const {
    const auto t = x.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                "x: the cuda backend supports float32, float16 and bfloat16, got ", t);
  }

  // MOSS_KERNELS_POISON=1 (the tests, bench/gpu_check.sh): outputs start as NaN instead of
  // stale memory, so an element a kernel fails to write shows.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    static const bool poison = [] {
      const char* v = std::getenv("MOSS_KERNELS_POISON");
      return v != nullptr && std::string(v) == "1";
    }();
    return poison ? at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options)
                  : at::empty(sizes, options);
  }

  // cuBLAS's fp16 x fp16 -> fp32 GEMM (fp32 accumulation, no fp16 rounding of the result).
  at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) const {
    return at::mm(a, b, at::kFloat);
  }

  void route_forward(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                     int64_t r_t, int64_t r_i, at::Tensor& z) const {
    route_forward_cuda(p, route, nbr, r_t, r_i, z);
  }
  void route_backward(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                      int64_t r_t, int64_t r_i, at::Tensor& dp) const {
    route_backward_cuda(dz, route, nbr_t, r_t, r_i, dp);
  }
  void pack_up(const at::Tensor& text_B, const at::Tensor& image_B, at::Tensor& b_cat,
               at::Tensor& bad) const {
    pack_up_cuda(text_B, image_B, b_cat, bad);
  }
  void pack_down(const at::Tensor& text_A, const at::Tensor& image_A, at::Tensor& a_all,
                 at::Tensor& bad) const {
    pack_down_cuda(text_A, image_A, a_all, bad);
  }
  void poison(at::Tensor& out, const at::Tensor& route, const at::Tensor& bad) const {
    poison_cuda(out, route, bad);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(moss, CUDA, m) {
  m.impl("_ext_linear_fwd", &composition::forward_op<CudaDev>);
  m.impl("_ext_linear_bwd", &composition::backward_op<CudaDev>);
}

}  // namespace moss
