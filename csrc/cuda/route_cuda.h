// The CUDA routing kernels' launchers (moss_linear_cuda.cu), used by linear_cuda.cpp.
#pragma once

#include <ATen/ATen.h>

namespace moss {

// z[N, R_T + R_I] (acc dtype) <- route and convolve the tap products p[N, R_T + KK*R_I].
void route_forward_cuda(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                        int64_t r_t, int64_t r_i, at::Tensor& z);
// dp[N, R_T + KK*R_I] <- gather dz[N, R_T + R_I] through the transposed window table.
void route_backward_cuda(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                         int64_t r_t, int64_t r_i, at::Tensor& dp);

}  // namespace moss
