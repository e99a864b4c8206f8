// The CUDA kernels (csrc/cuda/route_kernels.cuh) and their launchers (route_launch.h) compiled
// by the host compiler, as host code, inside a namespace of their own: their symbols then differ
// from the host stubs nvcc makes for the same kernels in the GPU build (which live in this
// library too), so a linker can never take one for the other. Every header they include is
// included first, so only their own declarations land in it. A host Launch sets the shim's
// blockIdx / threadIdx / blockDim / gridDim (cuda_shim.h) and calls the kernel per thread.
// Used by the cuda-emulated test backend (linear_emulated.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>

namespace emulation {
#include "cuda_shim.h"  // before the kernels
#include "../cuda/route_launch.h"
}  // namespace emulation
