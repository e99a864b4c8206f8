// moss::_ext_dropout_mask on CPU: LoRA dropout's keep mask from a counter-based hash.
//
//   keep[t, c] = hash(seed, i) >= p * 2^32,   i = t * D + c      (x [N, D]: only its shape is read)
//
// packed in bits as moss_kernels/dropout.py describes (bit c % 8 of byte c / 8 of row t; rows of
// 8 * ceil(D / 64) bytes, the bits past D zero). The mask is a pure function of (seed, i):
// a recomputation under gradient checkpointing, which replays the RNG state the seed was drawn
// from, rebuilds the same mask. The CPU backend of moss_linear reads it where its kernels read
// the adapters' input (docs/design.md section 3), so dropout costs no pass over x of its own.
// Why not bernoulli_: on CPU it costs ~5 ns an element; this hash about one cycle.
// The hash (moss_kernels/dropout.py holds the same in torch ops, which the tests compare):
//   key = fmix32(seed_lo ^ fmix32(seed_hi + 0x9E3779B9 * (i_hi + 1)))
//   hash = fmix32(fmix32(i_lo ^ key) + key)
// fmix32 is MurmurHash3's finaliser, a bijection of 32-bit words with full avalanche; two
// rounds keyed by the seed keep consecutive indices' masks independent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

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

// Rows [begin, end) of the mask of an [N, d] input, 64 columns (one uint64 word of `keep`,
// ldk bytes a row) at a time: the 64 hashes in a loop the compiler vectorises, then packed.
MOSS_INLINE void mask_rows(uint8_t* keep, int64_t ldk, int64_t d, uint64_t seed,
                           uint32_t threshold, int64_t begin, int64_t end) {
  uint32_t kept[64];
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
      const int64_t n = std::min<int64_t>(64, d - c0);
      const uint64_t i0 = static_cast<uint64_t>(t * d + c0);
      const uint32_t hi = static_cast<uint32_t>(i0 >> 32), lo = static_cast<uint32_t>(i0);
      if (((i0 + n - 1) >> 32) == hi) {  // one key for the word: always, below 2^32 elements
        const uint32_t key = block_key(seed, hi);
        for (int64_t j = 0; j < 64; ++j) {
          kept[j] = fmix32(fmix32((lo + static_cast<uint32_t>(j)) ^ key) + key) >= threshold;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const uint64_t i = i0 + j;
          const uint32_t key = block_key(seed, static_cast<uint32_t>(i >> 32));
          kept[j] = fmix32(fmix32(static_cast<uint32_t>(i) ^ key) + key) >= threshold;
        }
      }
      uint64_t word = 0;
      for (int64_t j = 0; j < n; ++j) word |= static_cast<uint64_t>(kept[j]) << j;
      std::memcpy(keep + t * ldk + c0 / 8, &word, sizeof word);
    }
  }
}

MOSS_CPU_CLONES void mask_range(uint8_t* keep, int64_t ldk, int64_t d, uint64_t seed,
                                uint32_t thr, int64_t b, int64_t e) {
  mask_rows(keep, ldk, d, seed, thr, b, e);
}

at::Tensor dropout_mask_cpu(const at::Tensor& x, const at::Tensor& seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a probability in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "seed: expected one int64 value on the CPU, got ", seed.scalar_type(), " of shape ",
              seed.sizes(), " on ", seed.device());
  TORCH_CHECK(x.dim() == 2, "x: expected [N, D], got ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1), ldk = (d + 63) / 64 * 8;
  at::Tensor keep = at::empty({n, ldk}, x.options().dtype(at::kByte));
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  // keep when hash >= p * 2^32: a keep probability of 1 - p to within 2^-32.
  const uint32_t threshold =
      static_cast<uint32_t>(std::min<long long>(std::llround(std::ldexp(p, 32)), 0xFFFFFFFFLL));
  uint8_t* kp = keep.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    mask_range(kp, ldk, d, s, threshold, b, e);
  });
  return keep;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(moss, CPU, m) { m.impl("_ext_dropout_mask", &cpu::dropout_mask_cpu); }

}  // namespace moss
