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

}  // namespace simd
}  // namespace moss
