// moss_kernels._C: the one TORCH_LIBRARY registration file of the extension.
//
// The public ops (moss::linear_fwd, moss::linear_bwd) are defined in Python
// (moss_kernels/linear.py) so that the package works without this extension; the compiled
// backends add their kernels to the same `moss` namespace from here, as a fragment, with one
// TORCH_LIBRARY_IMPL per device beside its kernels (cpu/, cuda/).
// Importing the module is what registers them (and binds the CPU decode step: below).
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "cpu/decode_cpu.h"
#include "cpu/simd.h"
#include "emulated/emulated.h"

#ifndef MOSS_TORCH_VERSION
#error "MOSS_TORCH_VERSION must be defined by setup.py"
#endif
// Passed unquoted (-DMOSS_TORCH_VERSION=2.13.0) because ninja command lines eat quotes.
#define MOSS_STR_(x) #x
#define MOSS_STR(x) MOSS_STR_(x)

namespace moss {

// "key=value;..." describing how this binary was built; parsed by moss_kernels/_ext.py and
// compared with the running torch so that a stale build is reported instead of crashing.
std::string build_info() {
  std::string info = "torch=" MOSS_STR(MOSS_TORCH_VERSION) ";";
#if defined(__clang__)
  info += "compiler=clang " __clang_version__ ";";
#elif defined(__GNUC__)
  info += "compiler=gcc " __VERSION__ ";";
#elif defined(_MSC_VER)
  info += "compiler=msvc " + std::to_string(_MSC_VER) + ";";
#endif
#ifdef _OPENMP
  info += "openmp=" + std::to_string(_OPENMP) + ";";
#else
  info += "openmp=no;";
#endif
#ifdef MOSS_WITH_CUDA
  info += "cuda=" MOSS_STR(MOSS_WITH_CUDA) ";";
#else
  info += "cuda=no;";
#endif
#ifdef NDEBUG
  info += "debug=no;";
#else
  info += "debug=yes;";
#endif
  return info;
}

TORCH_LIBRARY_FRAGMENT(moss, m) {
  m.def("_C_build_info() -> str", &build_info);
  // The compiled backends' kernels, one schema for every device (csrc/cpu, csrc/cuda); the
  // math and argument order are those of moss_kernels/reference.py forward() and backward().
  // x_adapter (None: x) is what the adapters read; the backward's x may be None when
  // x_adapter is given and dW is not asked for (nothing else reads it then). dropout_mask (bool,
  // x's shape; only with x_adapter None) makes it x * dropout_mask * dropout_scale, read where
  // the kernels read x (the CPU kernels; CUDA's take it materialised, as x_adapter).
  m.def(
      "_ext_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? x_adapter, "
      "Tensor? dropout_mask, float dropout_scale, Tensor text_A, Tensor text_B, Tensor image_A, "
      "Tensor image_B, Tensor route, Tensor nbr, float text_scale, float image_scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "_ext_linear_bwd(Tensor dy, Tensor? x, Tensor weight, Tensor? x_adapter, "
      "Tensor? dropout_mask, float dropout_scale, Tensor text_A, Tensor text_B, Tensor image_A, "
      "Tensor image_B, Tensor z, Tensor route, Tensor nbr_t, float text_scale, "
      "float image_scale, bool need_dx, bool need_dweight, bool need_dbias, "
      "bool need_dx_adapter) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // LoRA dropout's keep mask from a counter-based hash of (seed, element index), x's shape:
  // csrc/cpu/dropout_cpu.cpp.
  m.def("_ext_dropout_mask(Tensor x, Tensor seed, float p) -> Tensor");
  // One incremental decode step of a MOSS linear layer, updating its ring of tap products in
  // place (csrc/cuda/decode_impl.h, for CPU and CUDA; the math: moss_kernels/decode.py).
  m.def(
      "_ext_decode(Tensor x, Tensor weight, Tensor? bias, Tensor a_all, Tensor b_cat, "
      "Tensor(a!) ring, Tensor kind, Tensor pos, Tensor width, int r_text, int kernel_size) "
      "-> Tensor");
  // The `cuda-emulated` test backend (csrc/emulated/): the CUDA backend's source run on CPU
  // tensors, under ops of its own (the schemas above), and its launch settings.
  m.def(
      "_emulated_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? x_adapter, "
      "Tensor text_A, Tensor text_B, Tensor image_A, Tensor image_B, Tensor route, Tensor nbr, "
      "float text_scale, float image_scale) -> (Tensor, Tensor)");
  m.def(
      "_emulated_linear_bwd(Tensor dy, Tensor? x, Tensor weight, Tensor? x_adapter, "
      "Tensor text_A, Tensor text_B, Tensor image_A, Tensor image_B, Tensor z, Tensor route, "
      "Tensor nbr_t, float text_scale, float image_scale, bool need_dx, bool need_dweight, "
      "bool need_dbias, bool need_dx_adapter) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_emulated_decode(Tensor x, Tensor weight, Tensor? bias, Tensor a_all, Tensor b_cat, "
      "Tensor(a!) ring, Tensor kind, Tensor pos, Tensor width, int r_text, int kernel_size) "
      "-> Tensor");
  m.def("_emulated_configure(int max_blocks, int threads, bool check_writes) -> int[]",
        &emulated_configure);
}

}  // namespace moss

// The module: importing it loads the library and runs the registrations above (the pattern of
// pytorch/extension-cpp); its one Python function is the CPU decode step, bound straight.
//
// Why a direct binding beside the op: a decode step of a small model is a few tens of us a
// layer, and a call through torch.ops (arguments boxed against the schema, then the Autograd
// and ADInplaceOrView fallbacks for an op that mutates `ring`) cost 10-20 us more than F.linear
// in the model (#16, bench/results/README.md). moss_kernels.decode.decode_step, which serves
// only inputs that need no gradient, calls this (refusing any that would need one: the kernel
// has no autograd, and past the dispatcher nothing would warn); torch.compile and the tests
// still go through moss::_ext_decode, the same kernel. ValueError and TypeError keep their
// types, other errors are RuntimeErrors; the C++ stack is left out.
PYBIND11_MODULE(_C, m) {
  m.def(
      "_decode_cpu",
      [](const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
         const at::Tensor& a_all, const at::Tensor& b_cat, at::Tensor ring,
         const at::Tensor& kind, const at::Tensor& pos, const at::Tensor& width, int64_t r_t,
         int64_t k) {
        try {
          TORCH_CHECK(!at::GradMode::is_enabled() ||
                          !(x.requires_grad() || weight.requires_grad() || a_all.requires_grad() ||
                            b_cat.requires_grad() || (bias && bias->requires_grad())),
                      "moss_kernels._C._decode_cpu has no autograd: with gradients, call "
                      "moss_kernels.decode.moss_decode (it runs the differentiable reference)");
          pybind11::gil_scoped_release released;
          return moss::cpu::decode(x, weight, bias, a_all, b_cat, ring, kind, pos, width, r_t,
                                   k);
        } catch (const c10::ValueError& e) {
          throw pybind11::value_error(e.what_without_backtrace());
        } catch (const c10::TypeError& e) {
          throw pybind11::type_error(e.what_without_backtrace());
        } catch (const c10::Error& e) {
          throw std::runtime_error(e.what_without_backtrace());
        }
      },
      "moss::_ext_decode on CPU tensors, without the dispatcher (inputs needing no gradient)");
  m.def(
      "_set_vector_bytes",
      [](int64_t bytes) {
        if (bytes != 0 && bytes != 32 && bytes != 64) {
          throw pybind11::value_error("bytes: expected 32 or 64 (0: the CPU's own), got " +
                                      std::to_string(bytes));
        }
        const int previous = moss::simd::vector_bytes_setting();
        moss::simd::vector_bytes_setting() =
            bytes == 0 ? moss::simd::detected_vector_bytes() : static_cast<int>(bytes);
        return previous;
      },
      "The CPU kernels' vector width in bytes (csrc/cpu/simd.h), set for the tests; returns the "
      "previous one");
}
