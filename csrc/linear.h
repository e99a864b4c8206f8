// What every device's kernels of moss::_ext_linear_fwd / _ext_linear_bwd share: the argument
// checks. See moss_kernels/reference.py for the math the kernels compute, csrc/cpu/ and
// csrc/cuda/ for the two implementations.
#pragma once

#include <ATen/ATen.h>

namespace moss {

// The dtype sums are kept in: float64 for float64 inputs, float32 for every other dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// TORCH_CHECKs whose messages name the offending argument (the Python layer validates first;
// these guard direct calls of the torch.ops).
void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& text_A,
                        const at::Tensor& text_B, const at::Tensor& image_A,
                        const at::Tensor& image_B, const at::Tensor& route,
                        const at::Tensor& window);

// x_adapter, when given, is what the adapters read instead of x: x's shape, dtype and device.
void check_adapter_input(const at::Tensor& x, const c10::optional<at::Tensor>& x_adapter);

// dropout_mask, when given (LoRA dropout: the adapters read x * keep * scale): uint8 [N,
// 8 * ceil(D_in / 64)] bits (moss_kernels/dropout.py), x's device, contiguous, no x_adapter.
void check_dropout_mask(const at::Tensor& x, const c10::optional<at::Tensor>& x_adapter,
                        const c10::optional<at::Tensor>& dropout_mask);

// The backward's x and x_adapter, checked (x may be absent when x_adapter is given and dW is not
// asked for: nothing else reads it): the one the adapters read, x_adapter if given, else x.
const at::Tensor& backward_adapter_input(const c10::optional<at::Tensor>& x,
                                         const c10::optional<at::Tensor>& x_adapter,
                                         bool need_dweight, bool need_dx_adapter);

// The backward's own arguments: dy [N, D_out] in x's dtype, z [N, R_T + R_I] contiguous in the
// accumulation dtype (float64 for float64, else float32), as the forward returned it.
void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& z, int64_t r);

}  // namespace moss
