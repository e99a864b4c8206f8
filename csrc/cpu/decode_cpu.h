// moss::_ext_decode's CPU kernel (decode_cpu.cpp), also bound straight to Python as
// moss_kernels._C._decode_cpu (csrc/moss_ops.cpp says why).
#pragma once

#include <ATen/ATen.h>

namespace moss {
namespace cpu {

at::Tensor decode(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& a_all,
                  const at::Tensor& b_cat, at::Tensor& ring, const at::Tensor& kind,
                  const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k);

}  // namespace cpu
}  // namespace moss
