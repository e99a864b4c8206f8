// Lets the host compiler compile CUDA device code that uses no shared memory, barriers or warp
// intrinsics (csrc/cuda/route_kernels.cuh): `__global__` is dropped, and blockIdx / threadIdx /
// blockDim / gridDim are thread-local variables that the emulated launcher sets before it calls
// the kernel once per (block, thread). For such code that runs it exactly as a GPU would: every
// thread's work is independent of the others', so any order of them gives the same result.
#pragma once

#ifdef __CUDACC__
#error "cuda_shim.h is for the host compiler; nvcc compiles route_kernels.cuh as it is"
#endif

#define __global__

namespace moss {

struct EmulatedDim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// What the kernels read as CUDA's built-in variables (namespace moss, where they live).
inline thread_local EmulatedDim3 blockIdx, threadIdx, blockDim, gridDim;

}  // namespace moss
