// The `cuda-emulated` test backend's launch settings (linear_emulated.cpp), exposed as the op
// moss::_emulated_configure (csrc/moss_ops.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace moss {

// Set the emulated launch shape (at most max_blocks blocks of `threads` threads; the kernels'
// grid-stride loops cover the rest) and whether every launch checks that each output element is
// written by exactly one (block, thread). Returns the previous settings, in the same order.
std::vector<int64_t> emulated_configure(int64_t max_blocks, int64_t threads, bool check_writes);

}  // namespace moss
