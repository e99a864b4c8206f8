// The CUDA routing kernels (rank space) and their launchers; linear_cuda.cpp composes them with
// cuBLAS GEMMs and explains why the GEMMs are not hand-written.
//
//   route_fwd:  z[t, j]  = P[t, j] if route[t] == 0 (j < R_T);  sum_tap P[nbr[t,tap], ...] else
//   route_bwd:  dP[s, c] = dz[s, c] if route[s] == 0 (c < R_T); dz[nbr_t[s,tap], R_T + j] else
//
// One thread per output element, grid-stride; every output is written by exactly one thread
// (gathers, no atomics: deterministic). The plan's tables are read on the device, so nothing
// synchronises with the host. Launched on the current stream, every launch checked; the caller
// holds the device guard.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include "route_cuda.h"

namespace moss {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  // Enough blocks to fill the GPU several times over; the loops stride past the rest.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 32));
}

template <typename scalar_t, typename acc_t>
__global__ void route_fwd_kernel(const scalar_t* __restrict__ p, int64_t ldp,
                                 const int8_t* __restrict__ route,
                                 const int32_t* __restrict__ nbr, int64_t n, int64_t r_t,
                                 int64_t r_i, int64_t kk, acc_t* __restrict__ z) {
  const int64_t width = r_t + r_i;
  const int64_t total = n * width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = idx / width, j = idx % width;
    acc_t v = acc_t(0);
    if (j < r_t) {
      if (route[t] == 0) v = static_cast<acc_t>(p[t * ldp + j]);
    } else {
      for (int64_t tap = 0; tap < kk; ++tap) {  // column R_T + tap*R_I + (j - R_T)
        const int64_t s = nbr[t * kk + tap];
        if (s >= 0) v += static_cast<acc_t>(p[s * ldp + j + tap * r_i]);
      }
    }
    z[idx] = v;
  }
}

template <typename scalar_t>
__global__ void route_bwd_kernel(const scalar_t* __restrict__ dz, int64_t ldz,
                                 const int8_t* __restrict__ route,
                                 const int32_t* __restrict__ nbr_t, int64_t n, int64_t r_t,
                                 int64_t r_i, int64_t kk, scalar_t* __restrict__ dp) {
  const int64_t width = r_t + kk * r_i;
  const int64_t total = n * width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t s = idx / width, c = idx % width;
    scalar_t v = scalar_t(0);
    if (c < r_t) {
      if (route[s] == 0) v = dz[s * ldz + c];
    } else {
      const int64_t tap = (c - r_t) / r_i, j = (c - r_t) % r_i;
      const int64_t t = nbr_t[s * kk + tap];
      if (t >= 0) v = dz[t * ldz + r_t + j];
    }
    dp[idx] = v;
  }
}

}  // namespace

void route_forward_cuda(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                        int64_t r_t, int64_t r_i, at::Tensor& z) {
  const int64_t n = p.size(0), kk = nbr.size(1), total = n * (r_t + r_i);
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "moss_route_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    route_fwd_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), p.stride(0), route.data_ptr<int8_t>(), nbr.data_ptr<int32_t>(),
        n, r_t, r_i, kk, z.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void route_backward_cuda(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                         int64_t r_t, int64_t r_i, at::Tensor& dp) {
  const int64_t n = dz.size(0), kk = nbr_t.size(1), total = n * (r_t + kk * r_i);
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "moss_route_bwd_cuda", [&] {
    route_bwd_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        dz.data_ptr<scalar_t>(), dz.stride(0), route.data_ptr<int8_t>(),
        nbr_t.data_ptr<int32_t>(), n, r_t, r_i, kk, dp.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moss
