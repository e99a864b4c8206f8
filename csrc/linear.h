// The MOSS linear forward/backward composed from ATen GEMMs and two routing kernels.
//
// linear.cpp holds the composition, written once for every device; a device supplies
//   * its row blocks: contiguous token ranges with flags saying whether they hold a text and/or
//     an image token (the CPU cuts N into blocks of kRowBlock rows by reading the route; the
//     CUDA path, which must not read device memory from the host, uses one block with both
//     flags set), and
//   * its routing kernels (cpu/route_cpu.cpp, cuda/route_cuda.cu).
// See moss_kernels/reference.py for the math these compute.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace moss {

struct RowBlock {
  int64_t start, end;  // token rows [start, end)
  bool text, image;    // holds a text (route 0) / image (route 1) token
};

// z[N, R_T + R_I] (acc dtype) <- route and convolve the tap products p[N, R_T + KK*R_I].
using RouteForwardFn = void (*)(const at::Tensor& p, const at::Tensor& route,
                                const at::Tensor& nbr, int64_t r_t, int64_t r_i, at::Tensor& z);
// dp[N, R_T + KK*R_I] <- gather dz[N, R_T + R_I] through the transposed window table.
using RouteBackwardFn = void (*)(const at::Tensor& dz, const at::Tensor& route,
                                 const at::Tensor& nbr_t, int64_t r_t, int64_t r_i,
                                 at::Tensor& dp);

struct Device {
  std::vector<RowBlock> blocks;
  RouteForwardFn route_forward;
  RouteBackwardFn route_backward;
};

std::tuple<at::Tensor, at::Tensor> linear_forward(
    const Device& dev, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& text_A, const at::Tensor& text_B,
    const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& route,
    const at::Tensor& nbr, double text_scale, double image_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_backward(const Device& dev, const at::Tensor& dy, const at::Tensor& x,
                const at::Tensor& weight, const at::Tensor& text_A, const at::Tensor& text_B,
                const at::Tensor& image_A, const at::Tensor& image_B, const at::Tensor& z,
                const at::Tensor& route, const at::Tensor& nbr_t, double text_scale,
                double image_scale, bool need_dx, bool need_dweight, bool need_dbias);

// Argument checks shared by every device (TORCH_CHECK messages name the argument).
void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& text_A,
                        const at::Tensor& text_B, const at::Tensor& image_A,
                        const at::Tensor& image_B, const at::Tensor& route,
                        const at::Tensor& window);

}  // namespace moss
