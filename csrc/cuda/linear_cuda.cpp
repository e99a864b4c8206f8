// The CUDA backend of moss::_ext_linear_fwd / _ext_linear_bwd and of the decode step
// moss::_ext_decode: linear_impl.h's and decode_impl.h's compositions on the GPU (cuBLAS GEMMs
// through ATen, the kernels of route_cuda.cu), and their registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "decode_impl.h"
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
  void decode_taps(const at::Tensor& p, at::Tensor& ring, const at::Tensor& kind,
                   const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k,
                   at::Tensor& z) const {
    decode_taps_cuda(p, ring, kind, pos, width, r_t, k, z);
  }
};

// The ops' schemas carry a dropout mask for the CPU kernels; moss_kernels hands the CUDA backend
// the masked input as x_adapter instead (one elementwise pass, as F.dropout's), so none arrives.
void no_mask(const c10::optional<at::Tensor>& dropout_mask) {
  TORCH_CHECK(!dropout_mask.has_value(),
              "dropout_mask: the cuda kernels take the masked input as x_adapter (moss_kernels "
              "passes it so); got a mask");
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x_adapter, const c10::optional<at::Tensor>& dropout_mask,
    double, const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
    const at::Tensor& image_B, const at::Tensor& route, const at::Tensor& nbr, double text_scale,
    double image_scale) {
  no_mask(dropout_mask);
  return composition::forward_op<CudaDev>(x, weight, bias, x_adapter, text_A, text_B, image_A,
                                          image_B, route, nbr, text_scale, image_scale);
}

composition::Grads backward_cuda(
    const at::Tensor& dy, const c10::optional<at::Tensor>& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& x_adapter, const c10::optional<at::Tensor>& dropout_mask,
    double, const at::Tensor& text_A, const at::Tensor& text_B, const at::Tensor& image_A,
    const at::Tensor& image_B, const at::Tensor& z, const at::Tensor& route,
    const at::Tensor& nbr_t, double text_scale, double image_scale, bool need_dx,
    bool need_dweight, bool need_dbias, bool need_dx_adapter) {
  no_mask(dropout_mask);
  return composition::backward_op<CudaDev>(dy, x, weight, x_adapter, text_A, text_B, image_A,
                                           image_B, z, route, nbr_t, text_scale, image_scale,
                                           need_dx, need_dweight, need_dbias, need_dx_adapter);
}

}  // namespace

TORCH_LIBRARY_IMPL(moss, CUDA, m) {
  m.impl("_ext_linear_fwd", &forward_cuda);
  m.impl("_ext_linear_bwd", &backward_cuda);
  m.impl("_ext_decode", &composition::decode_op<CudaDev>);
}

}  // namespace moss
