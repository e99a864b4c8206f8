// 64-byte vectors written once and compiled for the CPU at hand.
//
// Vec<A> is a GCC/Clang vector extension type of 64 bytes (16 float or 8 double lanes). The
// compiler lowers it to one zmm register with AVX-512, two ymm with AVX2 and four xmm with SSE2
// or NEON, so the register-blocked loops of rank_kernels.h need no intrinsics. Functions marked
// MOSS_CPU_CLONES are compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the
// baseline) and the loader picks the best one the CPU supports (GNU ifunc, Linux x86-64 only;
// elsewhere one baseline build). Everything they call must be inlined into them (MOSS_INLINE),
// otherwise it would be compiled for the baseline only; that is also why the clones take a range
// of work and are called from inside at::parallel_for's lambda rather than containing it.
// MSVC has no vector extensions: build with MOSS_BUILD_EXT=0 there (the reference backend runs).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MOSS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOSS_CPU_CLONES
#endif
#define MOSS_INLINE inline __attribute__((always_inline))
// Returning a Vec from an (always inlined) function is flagged for the baseline clone's ABI;
// nothing crosses a call boundary, so the warning does not apply (torch builds with it off too).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moss {
namespace simd {

template <typename A>
struct VecType;
template <>
struct VecType<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecType<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename A>
using Vec = typename VecType<A>::type;
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The first n (<= kLanes) elements at p, converted to A; the other lanes are 0. Partial and
// converting loads go through a plain array and one whole-vector copy: writing a vector's
// lanes one by one would make the compiler keep it (and, inlined, a kernel's accumulators) in
// memory instead of registers.
template <typename A, typename S>
MOSS_INLINE Vec<A> load(const S* p, int64_t n = kLanes<A>) {
  Vec<A> v;
  if (std::is_same<A, S>::value && n == kLanes<A>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    A lanes[kLanes<A>] = {};
    for (int64_t i = 0; i < n; ++i) lanes[i] = static_cast<A>(p[i]);
    std::memcpy(&v, lanes, sizeof v);
  }
  return v;
}

// Stores the first n lanes of v at p, converted to S (c10::BFloat16 rounds to nearest even).
template <typename A, typename S>
MOSS_INLINE void store(S* p, const Vec<A>& v, int64_t n = kLanes<A>) {
  if (std::is_same<A, S>::value && n == kLanes<A>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    A lanes[kLanes<A>];
    std::memcpy(lanes, &v, sizeof v);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(lanes[i]);
  }
}

// A dropout mask packed in bits: bit c % 8 of byte c / 8 keeps element c of a row (the
// format of moss_kernels/dropout.py; bits past the row's end are 0). keep_bits(bits, c) is lanes
// c .. c + kLanes<A> - 1 of the row as a vector condition, for c a multiple of kLanes<A>:
// two bytes broadcast, one AND, one compare (GCC turns a byte -> lane conversion into a
// scalar loop; this it vectorises).
template <typename A>
struct KeepLanes;
template <>
struct KeepLanes<float> {
  typedef int32_t type __attribute__((vector_size(64)));
  static constexpr type bit = {1 << 0, 1 << 1, 1 << 2,  1 << 3,  1 << 4,  1 << 5,  1 << 6,  1 << 7,
                               1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};
};
template <>
struct KeepLanes<double> {
  typedef int64_t type __attribute__((vector_size(64)));
  static constexpr type bit = {1, 2, 4, 8, 16, 32, 64, 128};
};

template <typename A>
MOSS_INLINE Vec<A> kept(const Vec<A>& v, const uint8_t* bits, int64_t c) {
  using K = KeepLanes<A>;
  uint16_t word = 0;
  std::memcpy(&word, bits + c / 8, kLanes<A> / 8);
  const typename K::type m = static_cast<typename K::type>(
      (typename K::type{} + static_cast<int32_t>(word)) & K::bit);
  return m != 0 ? v : Vec<A>{};
}

// A dropped-out input: x[c + i] * scale where its bit is set, else 0, for i < n, rounded to S
// first as the materialised input would be (for float and double that changes nothing).
template <typename A, typename S>
MOSS_INLINE Vec<A> load_kept(const S* x, const uint8_t* bits, int64_t c, A scale,
                             int64_t n = kLanes<A>) {
  Vec<A> v = load<A>(x + c, n) * scale;
  if (!std::is_same<A, S>::value) {
    S rounded[kLanes<A>];
    store<A>(rounded, v);
    v = load<A>(rounded);
  }
  return kept<A>(v, bits, c);
}

}  // namespace simd
}  // namespace moss
