// moss::_ext_dropout on CPU: LoRA dropout from a counter-based hash, in one pass.
//
//   y[i] = keep(seed, i) ? x[i] / (1 - p) : 0,   keep(seed, i) = hash(seed, i) >= p * 2^32
//
// i is the element's index in x's contiguous layout. The mask is a pure function of (seed, i),
// so nothing is stored: the backward is the same call on dy with the same seed (dropout is a
// diagonal linear map, its own adjoint), and a recomputation under gradient checkpointing,
// which replays the RNG state the seed was drawn from, rebuilds the same mask.
// Why not F.dropout: on CPU its bernoulli_ costs ~5 ns an element, and the mask it keeps
// costs a multiply and a pass of its own, forward and backward; at d 512 that was a third of a
// MOSS training step (bench/results/README.md, #15). This hash costs about a cycle an element
// in 16-lane integer vectors, and the whole op is one read and one write.
// The hash (moss_kernels/dropout.py holds the same in torch ops, which the tests compare):
//   key = fmix32(seed_lo ^ fmix32(seed_hi + 0x9E3779B9 * (i_hi + 1)))
//   hash = fmix32(fmix32(i_lo ^ key) + key)
// fmix32 is MurmurHash3's finaliser, a bijection of 32-bit words with full avalanche; two
// rounds keyed by the seed keep consecutive indices' masks independent.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace moss {
namespace cpu {
namespace {

MOSS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

uint32_t block_key(uint64_t seed, uint32_t i_hi) {
  return fmix32(static_cast<uint32_t>(seed) ^
                fmix32(static_cast<uint32_t>(seed >> 32) + 0x9E3779B9u * (i_hi + 1u)));
}

// Elements [begin, end) of one 2^32-element block (the same i_hi, hence the same key).
template <typename S>
MOSS_INLINE void dropout_rows(const S* x, S* y, int64_t begin, int64_t end, uint32_t key,
                              uint32_t threshold, float scale_f, double scale_d) {
  using A = at::opmath_type<S>;
  const A scale = std::is_same<A, double>::value ? A(scale_d) : A(scale_f);
  const uint32_t lo0 = static_cast<uint32_t>(begin);
  const int64_t n = end - begin;
  x += begin;
  y += begin;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = fmix32(fmix32((lo0 + static_cast<uint32_t>(j)) ^ key) + key);
    y[j] = static_cast<S>(h >= threshold ? static_cast<A>(x[j]) * scale : A(0));
  }
}

#define MOSS_DROPOUT_CLONE(S)                                                                 \
  MOSS_CPU_CLONES void dropout_range(const S* x, S* y, int64_t b, int64_t e, uint32_t key,    \
                                     uint32_t thr, float sf, double sd) {                     \
    dropout_rows<S>(x, y, b, e, key, thr, sf, sd);                                            \
  }
MOSS_DROPOUT_CLONE(float)
MOSS_DROPOUT_CLONE(double)
MOSS_DROPOUT_CLONE(c10::BFloat16)
#undef MOSS_DROPOUT_CLONE

at::Tensor dropout_cpu(const at::Tensor& x_in, const at::Tensor& seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a probability in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed: expected one int64 value on the CPU, got ", seed.scalar_type(), " of shape ",
              seed.sizes(), " on ", seed.device());
  const auto t = x_in.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "x: the cpu dropout supports float32, float64 and bfloat16, got ", t);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  // keep when hash >= p * 2^32: a keep probability of 1 - p to within 2^-32.
  const uint32_t threshold =
      static_cast<uint32_t>(std::min<long long>(std::llround(std::ldexp(p, 32)), 0xFFFFFFFFLL));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t, "moss_dropout_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t b, int64_t e) {
      while (b < e) {  // split where the index's upper word (and so the key) changes
        const int64_t block_end = std::min(e, ((b >> 32) + 1) << 32);
        dropout_range(xp, yp, b, block_end, block_key(s, static_cast<uint32_t>(b >> 32)),
                      threshold, static_cast<float>(scale), scale);
        b = block_end;
      }
    });
  });
  return y;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) { m.impl("_ext_dropout", &cpu::dropout_cpu); }

}  // namespace moss
