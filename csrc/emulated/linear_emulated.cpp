// The `cuda-emulated` test backend: the CUDA backend's own source (csrc/cuda/linear_impl.h,
// decode_impl.h and the kernels of route_kernels.cuh) compiled by the host compiler and run on
// CPU tensors, one (block, thread) at a time, so that CI executes every line of it without a
// GPU. What differs from the GPU is only this file: the launcher, a guard that does nothing,
// fp32-accumulating products done as fp32 GEMMs, and outputs poisoned with NaN before the
// kernels write them.
//
// The launcher runs a grid of at most `max_blocks` blocks of `threads` threads (small by default,
// so that the grid-stride loops take several strides), and with `check_writes` it first runs
// each (block, thread) alone on a NaN-filled output and counts what it wrote: every element must
// be written by exactly one thread (the guarantee that makes the GPU kernels race-free).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <mutex>

#include "../cuda/decode_impl.h"
#include "../cuda/linear_impl.h"
#include "emulated.h"
#include "host_kernels.h"

namespace moss {
namespace {

struct LaunchSettings {
  int64_t max_blocks = 5;
  int64_t threads = 64;
  bool check_writes = false;
};

std::mutex settings_mutex;
LaunchSettings settings;  // shared by every thread (autograd runs backwards on its own)

LaunchSettings current() {
  std::lock_guard<std::mutex> lock(settings_mutex);
  return settings;
}

template <typename Kernel, typename... Args>
void run_threads(Kernel kernel, int64_t blocks, int64_t threads, int64_t only, Args... args) {
  emulation::moss::gridDim.x = static_cast<unsigned int>(blocks);
  emulation::moss::blockDim.x = static_cast<unsigned int>(threads);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = 0; t < threads; ++t) {
      if (only >= 0 && b * threads + t != only) continue;
      emulation::moss::blockIdx.x = static_cast<unsigned int>(b);
      emulation::moss::threadIdx.x = static_cast<unsigned int>(t);
      kernel(args...);
    }
  }
}

struct EmulatedLaunch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, int64_t items, const at::Tensor& out, Args... args) const {
    const LaunchSettings s = current();
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((items + s.threads - 1) / s.threads,
                                                                  s.max_blocks));
    if (s.check_writes && out.defined()) {
      at::Tensor writes = at::zeros({out.numel()}, out.options().dtype(at::kInt));
      for (int64_t thread = 0; thread < blocks * s.threads; ++thread) {
        out.fill_(std::numeric_limits<double>::quiet_NaN());
        run_threads(kernel, blocks, s.threads, thread, args...);
        writes.add_(out.reshape(-1).isnan().logical_not().to(at::kInt));
      }
      const int64_t wrong = writes.ne(1).sum().item<int64_t>();
      TORCH_CHECK(wrong == 0, "cuda-emulated: ", wrong, " of ", out.numel(), " output elements "
                  "were not written by exactly one (block, thread) of a ", blocks, " x ",
                  s.threads, " launch");
    }
    run_threads(kernel, blocks, s.threads, -1, args...);
  }
};

struct NoGuard {};

struct EmulatedDev {
  NoGuard guard(const at::Tensor&) const { return {}; }

  void check_dtype(const at::Tensor& x) const {
    const auto t = x.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                "x: the cuda-emulated backend supports float32, float16 and bfloat16 (those of "
                "the cuda backend), got ", t);
  }

  // Poisoned: an element a kernel fails to write shows up as NaN in the results.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }

  at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) const {
    return at::mm(a.to(at::kFloat), b.to(at::kFloat));
  }

  void route_forward(const at::Tensor& p, const at::Tensor& route, const at::Tensor& nbr,
                     int64_t r_t, int64_t r_i, at::Tensor& z) const {
    emulation::moss::route_forward(EmulatedLaunch{}, p, route, nbr, r_t, r_i, z);
  }
  void route_backward(const at::Tensor& dz, const at::Tensor& route, const at::Tensor& nbr_t,
                      int64_t r_t, int64_t r_i, at::Tensor& dp) const {
    emulation::moss::route_backward(EmulatedLaunch{}, dz, route, nbr_t, r_t, r_i, dp);
  }
  void pack_up(const at::Tensor& text_B, const at::Tensor& image_B, at::Tensor& b_cat,
               at::Tensor& bad) const {
    emulation::moss::pack_up(EmulatedLaunch{}, text_B, image_B, b_cat, bad);
  }
  void pack_down(const at::Tensor& text_A, const at::Tensor& image_A, at::Tensor& a_all,
                 at::Tensor& bad) const {
    emulation::moss::pack_down(EmulatedLaunch{}, text_A, image_A, a_all, bad);
  }
  void poison(at::Tensor& out, const at::Tensor& route, const at::Tensor& bad) const {
    emulation::moss::poison(EmulatedLaunch{}, out, route, bad);
  }
  void decode_taps(const at::Tensor& p, at::Tensor& ring, const at::Tensor& kind,
                   const at::Tensor& pos, const at::Tensor& width, int64_t r_t, int64_t k,
                   at::Tensor& z) const {
    emulation::moss::decode_taps(EmulatedLaunch{}, p, ring, kind, pos, width, r_t, k, z);
  }
};

}  // namespace

std::vector<int64_t> emulated_configure(int64_t max_blocks, int64_t threads, bool check_writes) {
  TORCH_CHECK(max_blocks >= 1 && threads >= 1, "max_blocks and threads: expected >= 1, got ",
              max_blocks, " and ", threads);
  std::lock_guard<std::mutex> lock(settings_mutex);
  std::vector<int64_t> previous{settings.max_blocks, settings.threads, settings.check_writes};
  settings = LaunchSettings{max_blocks, threads, check_writes};
  return previous;
}

TORCH_LIBRARY_IMPL(moss, CPU, m) {
  m.impl("_emulated_linear_fwd", &composition::forward_op<EmulatedDev>);
  m.impl("_emulated_linear_bwd", &composition::backward_op<EmulatedDev>);
  m.impl("_emulated_decode", &composition::decode_op<EmulatedDev>);
}

}  // namespace moss
