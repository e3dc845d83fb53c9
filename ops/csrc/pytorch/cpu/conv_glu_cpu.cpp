// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernel of the convolutional GLU's gate: for each token of a channels-last grid,
//   out = GELU(bias + depthwise_conv3x3(gate)) * value,   [gate | value] = the fc1 output row,
// in one pass. PyTorch runs this as a depthwise conv on a strided channels-last view (oneDNN
// reorders it), a GELU and a product, three round trips through memory of tensors that do not
// fit in cache at stage 1; here each output row reads its 3x3 neighbourhood from cache and the
// 9 taps accumulate in an L1-resident buffer, vectorised over channels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pytorch/conv_glu.h"
#include "pytorch/cpu/vector_math.h"

namespace transnext_mm {
namespace {

// One image row y of one batch element. hidden: the element's (H*W, 2h) fc1 output; taps: (9, h)
// weights, tap-major; out: the element's (H*W, h) output; acc: h scratch values.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_impl(const T* hidden, const T* taps, const T* bias, T* out, T* acc,
                                     int64_t y, int64_t height, int64_t width, int64_t h) {
  const int64_t row_stride = 2 * h;
  for (int64_t x = 0; x < width; ++x) {
    std::copy(bias, bias + h, acc);
    for (int64_t dy = -1; dy <= 1; ++dy) {
      const int64_t yy = y + dy;
      if (yy < 0 || yy >= height) continue;
      for (int64_t dx = -1; dx <= 1; ++dx) {
        const int64_t xx = x + dx;
        if (xx < 0 || xx >= width) continue;
        const T* __restrict__ src = hidden + (yy * width + xx) * row_stride;
        const T* __restrict__ w = taps + ((dy + 1) * 3 + (dx + 1)) * h;
#pragma omp simd
        for (int64_t c = 0; c < h; ++c) acc[c] += w[c] * src[c];
      }
    }
    const T* __restrict__ value = hidden + (y * width + x) * row_stride + h;
    T* __restrict__ o = out + (y * width + x) * h;
#pragma omp simd
    for (int64_t c = 0; c < h; ++c) o[c] = gelu(acc[c]) * value[c];
  }
}

#define TNX_DEFINE_GATE_ROW(T)                                                                \
  TNX_CPU_CLONES void gate_row(const T* hidden, const T* taps, const T* bias, T* out, T* acc, \
                               int64_t y, int64_t height, int64_t width, int64_t h) {         \
    gate_row_impl(hidden, taps, bias, out, acc, y, height, width, h);                         \
  }
TNX_DEFINE_GATE_ROW(float)
TNX_DEFINE_GATE_ROW(double)
#undef TNX_DEFINE_GATE_ROW

}  // namespace

at::Tensor conv_glu_gate_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& bias, int64_t height, int64_t width) {
  const int64_t B = hidden.size(0), h = hidden.size(2) / 2;
  auto out = at::empty({B, height * width, h}, hidden.options());
  if (out.numel() == 0) return out;
  const auto taps = weight.reshape({h, 9}).t().contiguous();  // (9, h): one vector per tap
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "conv_glu_gate_forward_cpu", [&] {
    const scalar_t *hid = hidden.data_ptr<scalar_t>(), *tap = taps.data_ptr<scalar_t>(),
                   *b = bias.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t tokens = height * width;
    at::parallel_for(0, B * height, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(h);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t batch = task / height, y = task % height;
        gate_row(hid + batch * tokens * 2 * h, tap, b, o + batch * tokens * h, acc.data(), y,
                 height, width, h);
      }
    });
  });
  return out;
}

}  // namespace transnext_mm
