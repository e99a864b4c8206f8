// moss::_ext_decode on CPU: one incremental decode step of a MOSS linear layer, in one call
// (the math: moss_kernels/decode.py; the composition: csrc/cuda/decode_impl.h, shared with the
// GPU). Why one op: the step is a handful of tiny GEMVs and gathers, and as ~25 PyTorch calls
// from Python per layer per token it cost 2.4x PEFT LoRA's decode on the dev CPU (#16). Here it
// is three GEMVs (ATen, MKL) and the GPU's own decode_taps kernel run as a single thread: the
// rank-space work is B * (R_T + K*K*R_I) values, far too little to share out, and running the
// GPU's kernel source keeps one definition of the step's rank space.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cuda/decode_impl.h"
#include "../emulated/host_kernels.h"

namespace moss {
namespace cpu {
namespace {

// One block of one thread: the kernel's grid-stride loop covers every item.
struct SerialLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t, const at::Tensor&, Args... args) const {
    namespace shim = emulation::moss;
    shim::gridDim = shim::blockDim = shim::EmulatedDim3{};
    shim::blockIdx = shim::threadIdx = shim::EmulatedDim3{0, 0, 0};
    kernel(args...);
  }
};

struct NoGuard {};

struct CpuDev {
  NoGuard guard(const at::Tensor&) const { return {}; }
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }
  at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) const {
    return at::mm(a.to(at::kFloat), b.to(at::kFloat));
  }
  void decode_taps(const at::Tensor& p, at::Tensor& ring, const at::Tensor& kind,
                   const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k,
                   at::Tensor& z) const {
    emulation::moss::decode_taps(SerialLaunch{}, p, ring, kind, pos, width, r_t, k, z);
  }
};

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) { m.impl("_ext_decode", &composition::decode_op<cpu::CpuDev>); }

}  // namespace moss
