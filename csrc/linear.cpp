// The argument checks shared by the CPU and CUDA kernels (linear.h).
#include "linear.h"

namespace moss {

void check_forward_args(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& text_A,
                        const at::Tensor& text_B, const at::Tensor& image_A,
                        const at::Tensor& image_B, const at::Tensor& route,
                        const at::Tensor& window) {
  TORCH_CHECK(x.dim() == 2, "x: expected [N, D_in], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "weight: expected [D_out, ", x.size(1), "], got ", weight.sizes());
  const auto d_in = x.size(1), d_out = weight.size(0);
  TORCH_CHECK(text_A.dim() == 2 && text_A.size(1) == d_in, "text_A: expected [R_T, ", d_in,
              "], got ", text_A.sizes());
  TORCH_CHECK(text_B.dim() == 2 && text_B.size(0) == d_out && text_B.size(1) == text_A.size(0),
              "text_B: expected [", d_out, ", ", text_A.size(0), "], got ", text_B.sizes());
  TORCH_CHECK(image_A.dim() == 4 && image_A.size(1) == d_in && image_A.size(2) == image_A.size(3),
              "image_A: expected [R_I, ", d_in, ", K, K], got ", image_A.sizes());
  TORCH_CHECK(image_B.dim() == 2 && image_B.size(0) == d_out &&
                  image_B.size(1) == image_A.size(0),
              "image_B: expected [", d_out, ", ", image_A.size(0), "], got ", image_B.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "bias: expected [", d_out,
                "], got ", bias->sizes());
  }
  for (const at::Tensor* t : {&weight, &text_A, &text_B, &image_A, &image_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "weights and adapters must have x's dtype ", x.scalar_type(), " and device ",
                x.device(), ", got ", t->scalar_type(), " on ", t->device());
  }
  const auto kk = image_A.size(2) * image_A.size(3);
  TORCH_CHECK(route.scalar_type() == at::kChar && route.dim() == 1 && route.size(0) == x.size(0) &&
                  route.is_contiguous() && route.device() == x.device(),
              "route: expected a contiguous int8 [", x.size(0), "] tensor on ", x.device(),
              ", got ", route.scalar_type(), " ", route.sizes());
  TORCH_CHECK(window.scalar_type() == at::kInt && window.dim() == 2 &&
                  window.size(0) == x.size(0) && window.size(1) == kk &&
                  window.is_contiguous() && window.device() == x.device(),
              "nbr/nbr_t: expected a contiguous int32 [", x.size(0), ", ", kk, "] tensor on ",
              x.device(), ", got ", window.scalar_type(), " ", window.sizes());
}

void check_adapter_input(const at::Tensor& x, const c10::optional<at::Tensor>& x_adapter) {
  if (!x_adapter.has_value()) return;
  TORCH_CHECK(x_adapter->sizes() == x.sizes() && x_adapter->scalar_type() == x.scalar_type() &&
                  x_adapter->device() == x.device(),
              "x_adapter: expected x's shape ", x.sizes(), ", dtype ", x.scalar_type(),
              " and device ", x.device(), ", got ", x_adapter->sizes(), " ",
              x_adapter->scalar_type(), " on ", x_adapter->device());
}

void check_dropout_mask(const at::Tensor& x, const c10::optional<at::Tensor>& x_adapter,
                        const c10::optional<at::Tensor>& dropout_mask) {
  if (!dropout_mask.has_value()) return;
  TORCH_CHECK(!x_adapter.has_value(),
              "dropout_mask: the adapters read x through it, so x_adapter must be None");
  const int64_t width = (x.size(1) + 63) / 64 * 8;  // packed bits, whole 64-bit words a row
  TORCH_CHECK(dropout_mask->scalar_type() == at::kByte && dropout_mask->dim() == 2 &&
                  dropout_mask->size(0) == x.size(0) && dropout_mask->size(1) == width &&
                  dropout_mask->device() == x.device() && dropout_mask->is_contiguous(),
              "dropout_mask: expected a contiguous uint8 [", x.size(0), ", ", width,
              "] tensor of packed bits on ", x.device(), ", got ", dropout_mask->scalar_type(),
              " ", dropout_mask->sizes(), " on ", dropout_mask->device());
}

const at::Tensor& backward_adapter_input(const c10::optional<at::Tensor>& x,
                                         const c10::optional<at::Tensor>& x_adapter,
                                         bool need_dweight, bool need_dx_adapter) {
  TORCH_CHECK(x.has_value() || (x_adapter.has_value() && !need_dweight),
              "x: the backward reads it for dW, and for the adapters' gradients when x_adapter "
              "is None; got None");
  TORCH_CHECK(!need_dx_adapter || x_adapter.has_value(),
              "need_dx_adapter: true, but x_adapter is None (the adapters read x, and dx carries "
              "their input gradient)");
  if (x.has_value()) check_adapter_input(*x, x_adapter);
  return x_adapter.has_value() ? *x_adapter : *x;
}

void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& z, int64_t r) {
  const int64_t n = x.size(0), d_out = weight.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == n && dy.size(1) == d_out &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "dy: expected ", x.scalar_type(), " [", n, ", ", d_out, "] on ", x.device(),
              ", got ", dy.scalar_type(), " ", dy.sizes(), " on ", dy.device());
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == n && z.size(1) == r && z.scalar_type() == acc &&
                  z.is_contiguous() && z.device() == x.device(),
              "z: expected a contiguous ", acc, " [", n, ", ", r, "] tensor on ", x.device(),
              ", got ", z.scalar_type(), " ", z.sizes());
}

}  // namespace moss
