// The CUDA launches of the routing and packing kernels (route_cuda.cu, compiled by nvcc), for
// linear_cuda.cpp (compiled by the host compiler); what each computes: route_launch.h.
#pragma once

#include <ATen/ATen.h>

namespace moss {

void route_forward_cuda(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                        int64_t r_t, int64_t r_i, at::Tensor& z);
void route_backward_cuda(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                         int64_t r_t, int64_t r_i, at::Tensor& dp);
void pack_up_cuda(const at::Tensor& text_B, const at::Tensor& image_B, at::Tensor& b_cat,
                  at::Tensor& bad);
void pack_down_cuda(const at::Tensor& text_A, const at::Tensor& image_A, at::Tensor& a_all,
                    at::Tensor& bad);
void poison_cuda(at::Tensor& out, const at::Tensor& route, const at::Tensor& bad);
void decode_taps_cuda(const at::Tensor& p, at::Tensor& ring, const at::Tensor& kind,
                      const at::Tensor& pos, const at::Tensor& width, int64_t r_t,
                      int64_t k, at::Tensor& z);

}  // namespace moss
