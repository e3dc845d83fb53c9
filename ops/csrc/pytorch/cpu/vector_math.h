// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Branch-free float math for the CPU kernels' inner loops: std::exp / std::erf do not vectorise,
// these do (GCC turns the loops that call them into AVX-512 / AVX2 code through target_clones).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define TNX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TNX_CPU_CLONES
#endif
#if defined(__GNUC__)
#define TNX_ALWAYS_INLINE __attribute__((always_inline)) inline
// After a lambda's parameter list: its body is inlined where it is called. A lambda called in a
// target clone is otherwise a function of its own, compiled for the baseline target (no AVX, no
// FMA), and GCC may leave it a call.
#define TNX_INLINE_LAMBDA __attribute__((always_inline))
#else
#define TNX_ALWAYS_INLINE inline
#define TNX_INLINE_LAMBDA
#endif

namespace transnext_mm {

// f(std::integral_constant<decltype(Value), Value>) where matches, else f(... 0): a kernel's loops
// unroll for the size it meets in practice (Value), and take the size as an argument elsewhere
// (0). f is called inside a target clone: pass a TNX_INLINE_LAMBDA.
template <auto Value, typename F>
TNX_ALWAYS_INLINE void specialize_for(bool matches, F&& f) {
  if (matches)
    f(std::integral_constant<decltype(Value), Value>{});
  else
    f(std::integral_constant<decltype(Value), decltype(Value){0}>{});
}

// 8-float vectors (GCC vector extensions): AVX / AVX-512 in the target clones, SSE pairs in the
// baseline. They never cross a non-inlined call, so the AVX argument-passing ABI note does not
// apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));

// load_lanes<L>(p) / store_lanes(p, v): the lanes (a v8f, or one element) at p, unaligned.
template <typename L, typename T>
TNX_ALWAYS_INLINE L load_lanes(const T* p) {
  L v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename L>
TNX_ALWAYS_INLINE void store_lanes(T* p, L v) {
  std::memcpy(p, &v, sizeof(v));
}

TNX_ALWAYS_INLINE v8f load8(const float* p) { return load_lanes<v8f>(p); }
TNX_ALWAYS_INLINE void store8(float* p, v8f v) { store_lanes(p, v); }
TNX_ALWAYS_INLINE float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Lanes of the branch-free math below: one float (in loops GCC vectorises), a v8f or one
// double, written once for all. splat: a value in every lane; lanes_max: per lane.
typedef int32_t v8i __attribute__((vector_size(32)));
template <typename L>
struct LaneTraits {
  using Element = L;
};
template <>
struct LaneTraits<v8f> {
  using Element = float;
};
template <typename L>
TNX_ALWAYS_INLINE L splat(double value) {
  return L{} + static_cast<typename LaneTraits<L>::Element>(value);
}
template <typename L>
TNX_ALWAYS_INLINE L lanes_max(L a, L b) {
  return a > b ? a : b;
}
// 2^n from the bits of t + 1.5 * 2^23 + 127 (which holds n + 127 in its low mantissa bits).
TNX_ALWAYS_INLINE float pow2_from_rounding(float rounded) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(rounded) << 23);
}
TNX_ALWAYS_INLINE v8f pow2_from_rounding(v8f rounded) {
  return reinterpret_cast<v8f>(reinterpret_cast<v8i>(rounded) << 23);
}

// exp(x) for x <= 0 up to rounding (a softmax's score minus its row's maximum or log-sum-exp,
// the -x^2 / 2 of the normal density): Cody-Waite range reduction x = n ln 2 + r and a degree-6
// polynomial in r (~1e-7 relative error). One clamp: below -87 the result is exp(-87). 2^n comes
// from the bits of the rounding sum itself (pow2_from_rounding, valid for -127 < n < 128).
// Larger arguments give meaningless values; the softmax loops compute them only for the lanes of
// out-of-image window entries, which they replace by 0.
template <typename L>
TNX_ALWAYS_INLINE L exp_nonpositive(L x) {
  x = lanes_max(x, splat<L>(-87.0f));
  const L rounded = x * 1.44269504088896341f + 12583039.0f;  // 1.5 * 2^23 + 127
  const L n = rounded - 12583039.0f;
  L r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4, split for accuracy
  L p = splat<L>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * pow2_from_rounding(rounded);
}
TNX_ALWAYS_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// erf as z P(z^2) / Q(z^2) on [-3.92, 3.92]: a rational fit of degree 5 / 5 in z^2 (fitted for
// this file by Lawson-weighted least squares on Chebyshev nodes; 1.6e-8 in exact arithmetic,
// below 4e-7 absolute in float). Beyond, exactly +-1 (erf is within 6e-8 of it there), so that
// GELU's x * Phi(x) is exactly 0 for every x below -5.55, however large |x|. No exponential, one
// division.
template <typename L>
TNX_ALWAYS_INLINE L erf_rational(L x) {
  // Coefficients from the highest power down (Horner's scheme).
  constexpr float kP[] = {2.03472564e-06f, 2.87475763e-04f, 3.86824459e-03f,
                          5.30602224e-02f, 1.92762375e-01f, 1.12837899f};
  constexpr float kQ[] = {3.80703532e-05f, 1.18809170e-03f, 1.51721332e-02f,
                          1.15083896e-01f, 5.04162908e-01f, 1.0f};
  const L u = x * x;
  L p = splat<L>(kP[0]), q = splat<L>(kQ[0]);
  for (int i = 1; i < 6; ++i) {
    p = p * u + kP[i];
    q = q * u + kQ[i];
  }
  // Beyond the fit the ratio is discarded (for huge |x| it is inf / inf).
  return x >= 3.92f ? splat<L>(1) : (x <= -3.92f ? splat<L>(-1) : x * p / q);
}
TNX_ALWAYS_INLINE double erf_rational(double x) { return std::erf(x); }

}  // namespace transnext_mm
