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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define TNX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TNX_CPU_CLONES
#endif
#if defined(__GNUC__)
#define TNX_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define TNX_ALWAYS_INLINE inline
#endif

namespace transnext_mm {

// 8-float vectors (GCC vector extensions): AVX / AVX-512 in the target clones, SSE pairs in the
// baseline. They never cross a non-inlined call, so the AVX argument-passing ABI note does not
// apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));

TNX_ALWAYS_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
TNX_ALWAYS_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
TNX_ALWAYS_INLINE float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x <= 0 up to rounding (a softmax's score minus its row's maximum or log-sum-exp,
// the -x^2 of erf and of the normal density): Cody-Waite range reduction x = n ln 2 + r and a
// degree-6 polynomial in r (~1e-7 relative error). One clamp: below -87 the result is exp(-87).
// 2^n comes from the bits of the rounding sum itself: t + 1.5 * 2^23 + 127 holds n + 127 in its
// low mantissa bits, which shifted up by 23 are 2^n's exponent field (valid for -127 < n < 128).
// Larger arguments give meaningless values; the softmax loops compute them only for the lanes of
// out-of-image window entries, which they replace by 0.
TNX_ALWAYS_INLINE float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float rounded = x * 1.44269504088896341f + 12583039.0f;  // 1.5 * 2^23 + 127
  const float n = rounded - 12583039.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4, split for accuracy
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>(std::bit_cast<uint32_t>(rounded) << 23);
}
TNX_ALWAYS_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// erf: Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, below float rounding of GELU's
// 0.5 * (1 + erf)).
TNX_ALWAYS_INLINE float erf_approx(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  return std::copysign(1.0f - p * t * exp_nonpositive(-a * a), x);
}
TNX_ALWAYS_INLINE double erf_approx(double x) { return std::erf(x); }

// Exact (erf) GELU, as torch.nn.GELU().
template <typename T>
TNX_ALWAYS_INLINE T gelu(T x) {
  return T(0.5) * x * (T(1) + erf_approx(x * T(0.70710678118654752440)));
}

}  // namespace transnext_mm
