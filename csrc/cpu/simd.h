// Vectors written once and compiled for the CPU at hand.
//
// Vec<A, V> is a GCC/Clang vector extension type of V bytes (V = 64: 16 float or 8 double lanes;
// V = 32: 8 or 4), so the register-blocked loops of rank_kernels.h need no intrinsics. Functions
// marked MOSS_CPU_CLONES are compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA,
// and the baseline) and the loader picks the best one the CPU supports (GNU ifunc, Linux x86-64
// only; elsewhere one baseline build). Everything they call must be inlined into them
// (MOSS_INLINE), otherwise it would be compiled for the baseline only; that is also why the
// clones take a range of work and are called from inside at::parallel_for's lambda rather than
// containing it.
//
// The vector width must be the clone's own: a 64-byte vector is one zmm register with AVX-512,
// but GCC lowers it for AVX2 into pieces moved through the stack and general registers, and the
// AVX-512-sized register tiles spill there too: on an AVX2 machine (AMD EPYC, Zen 3) the
// `moss bench --quick` layer ran at 4.3x F.linear's forward, 1.5x with 32-byte vectors. One
// body is compiled for every clone and cannot tell at compile time which clone it is in, so the
// kernels are templates on V, each clone compiles both widths, and calls the one
// vector_bytes() names (a cached run-time test, once per range of work). Every sum runs in the
// same order at both widths (the decode step's dot products over lanes of 64 bytes at either
// width), but GCC may fuse a multiply-add into an FMA in one width's code and not the other's
// (-ffp-contract=fast), so they agree to the last bits, not always bit for bit.
// MSVC has no vector extensions: build with MOSS_BUILD_EXT=0 there (the reference backend runs).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MOSS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MOSS_CPU_HAS_CLONES 1
#else
#define MOSS_CPU_CLONES
#endif
#define MOSS_INLINE inline __attribute__((always_inline))
// Returning a Vec from an (always inlined) function is flagged for the baseline clone's ABI;
// nothing crosses a call boundary, so the warning does not apply (torch builds with it off too).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moss {
namespace simd {

template <typename A, int V>
struct VecType {
  typedef A type __attribute__((vector_size(V)));
};
template <typename A, int V>
using Vec = typename VecType<A, V>::type;
template <typename A, int V>
constexpr int64_t kLanes = V / sizeof(A);
//: The widest vector any kernel uses (buffers are padded to whole ones of it).
constexpr int kMaxBytes = 64;

// The vector bytes of the clone that runs: 64 where the resolver picks x86-64-v4 (the same
// test), else 32 (AVX2; also the baseline SSE2, as pairs of registers, and NEON). The tests set
// it (moss_kernels._C._set_vector_bytes) to run the other width's kernels too: both are correct
// on every CPU, the other one only slower.
inline int detected_vector_bytes() {
#if defined(MOSS_CPU_HAS_CLONES)
  return __builtin_cpu_supports("x86-64-v4") ? 64 : 32;
#elif defined(__AVX512F__)
  return 64;  // a build for AVX-512 without clones
#else
  return 32;
#endif
}
inline std::atomic<int>& vector_bytes_setting() {
  static std::atomic<int> bytes{detected_vector_bytes()};
  return bytes;
}
inline int vector_bytes() { return vector_bytes_setting().load(std::memory_order_relaxed); }

// kernel<S, A, V>(...) with the running clone's vector width V, in a clone's body.
#define MOSS_BY_WIDTH(kernel, S, A, ...)                                                      \
  (::moss::simd::vector_bytes() == 64 ? kernel<S, A, 64>(__VA_ARGS__)                         \
                                      : kernel<S, A, 32>(__VA_ARGS__))

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The first n (<= kLanes) elements at p, converted to A; the other lanes are 0. Partial and
// converting loads go through a plain array and one whole-vector copy: writing a vector's
// lanes one by one would make the compiler keep it (and, inlined, a kernel's accumulators) in
// memory instead of registers.
template <typename A, int V, typename S>
MOSS_INLINE Vec<A, V> load(const S* p, int64_t n = kLanes<A, V>) {
  Vec<A, V> v;
  if (std::is_same<A, S>::value && n == kLanes<A, V>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    A lanes[kLanes<A, V>] = {};
    for (int64_t i = 0; i < n; ++i) lanes[i] = static_cast<A>(p[i]);
    std::memcpy(&v, lanes, sizeof v);
  }
  return v;
}

// Stores the first n lanes of v at p, converted to S (c10::BFloat16 rounds to nearest even).
template <typename A, int V, typename S>
MOSS_INLINE void store(S* p, const Vec<A, V>& v, int64_t n = kLanes<A, V>) {
  if (std::is_same<A, S>::value && n == kLanes<A, V>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    A lanes[kLanes<A, V>];
    std::memcpy(lanes, &v, sizeof v);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(lanes[i]);
  }
}

// A dropout mask packed in bits: bit c % 8 of byte c / 8 keeps element c of a row (the
// format of moss_kernels/dropout.py; bits past the row's end are 0). kept(v, bits, c) is v
// where lanes c .. c + kLanes - 1 of the row are kept, else 0, for c a multiple of kLanes: the
// lanes' bits broadcast, one AND, one compare (GCC turns a byte -> lane conversion into a
// scalar loop; this it vectorises).
template <typename A, int V>
struct KeepLanes {
  using Lane = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;  // as wide as A
  typedef Lane type __attribute__((vector_size(V)));
  template <size_t... i>
  static constexpr type bits(std::index_sequence<i...>) {
    return type{(Lane(1) << i)...};
  }
  static constexpr type bit = bits(std::make_index_sequence<kLanes<A, V>>{});
};

template <typename A, int V>
MOSS_INLINE Vec<A, V> kept(const Vec<A, V>& v, const uint8_t* bits, int64_t c) {
  using K = KeepLanes<A, V>;
  constexpr int64_t L = kLanes<A, V>;
  uint16_t word = 0;
  std::memcpy(&word, bits + c / 8, (L + 7) / 8);
  if (L < 8) word >>= c % 8;  // 4 double lanes: half a byte
  const typename K::type m = static_cast<typename K::type>(
      (typename K::type{} + static_cast<int32_t>(word)) & K::bit);
  return m != 0 ? v : Vec<A, V>{};
}

// A dropped-out input: x[c + i] * scale where its bit is set, else 0, for i < n, rounded to S
// first as the materialised input would be (for float and double that changes nothing).
template <typename A, int V, typename S>
MOSS_INLINE Vec<A, V> load_kept(const S* x, const uint8_t* bits, int64_t c, A scale,
                                int64_t n = kLanes<A, V>) {
  Vec<A, V> v = load<A, V>(x + c, n) * scale;
  if (!std::is_same<A, S>::value) {
    S rounded[kLanes<A, V>];
    store<A, V>(rounded, v);
    v = load<A, V>(rounded);
  }
  return kept<A, V>(v, bits, c);
}

}  // namespace simd
}  // namespace moss
