// The CUDA launches of route_kernels.cuh (through route_launch.h), for linear_cuda.cpp: the
// current stream, every launch checked; the caller holds the device guard.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "route_cuda.h"
#include "route_launch.h"

namespace moss {
namespace {

constexpr int kThreads = 256;

struct CudaLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t items, const at::Tensor& /*out*/, Args... args) const {
    // Enough blocks to fill the GPU several times over; the loops stride past the rest.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads,
                                                                  sms * 32));
    kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void route_forward_cuda(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                        int64_t r_t, int64_t r_i, at::Tensor& z) {
  route_forward(CudaLaunch{}, p, route, nbr, r_t, r_i, z);
}

void route_backward_cuda(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                         int64_t r_t, int64_t r_i, at::Tensor& dp) {
  route_backward(CudaLaunch{}, dz, route, nbr_t, r_t, r_i, dp);
}

void pack_up_cuda(const at::Tensor& text_B, const at::Tensor& image_B, at::Tensor& b_cat,
                  at::Tensor& bad) {
  pack_up(CudaLaunch{}, text_B, image_B, b_cat, bad);
}

void pack_down_cuda(const at::Tensor& text_A, const at::Tensor& image_A, at::Tensor& a_all,
                    at::Tensor& bad) {
  pack_down(CudaLaunch{}, text_A, image_A, a_all, bad);
}

void poison_cuda(at::Tensor& out, const at::Tensor& route, const at::Tensor& bad) {
  poison(CudaLaunch{}, out, route, bad);
}

void decode_taps_cuda(const at::Tensor& p, at::Tensor& ring, const at::Tensor& kind,
                      const at::Tensor& pos, const at::Tensor& width, int64_t r_t,
                      int64_t k, at::Tensor& z) {
  decode_taps(CudaLaunch{}, p, ring, kind, pos, width, r_t, k, z);
}

}  // namespace moss
