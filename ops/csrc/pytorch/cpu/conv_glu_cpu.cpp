// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernel of the convolutional GLU's gate: for each token of a channels-last grid,
//   out = GELU(bias + depthwise_conv3x3(gate)) * value,   [gate | value] = the fc1 output row,
// in one pass. PyTorch runs this as a depthwise conv on a strided channels-last view (oneDNN
// reorders it), a GELU and a product, three round trips through memory of tensors that do not
// fit in cache at stage 1; here each output row reads its 3x3 neighbourhood from cache and the
// 9 taps accumulate in an L1-resident buffer, vectorised over channels.
//
// The backward works the same way in two passes over image rows. Pass 1 recomputes each token's
// pre-activation from its 3x3 neighbourhood, writes the value's gradient GELU(pre) * grad into
// the value half of grad_hidden and keeps grad_pre = grad * value * GELU'(pre), and accumulates
// the conv weight's and bias's gradients from the neighbourhood it has just read, into one
// partial per image row (summed afterwards in row order: the result does not depend on the
// number of threads). Pass 2 writes the gate's gradient, the transposed 3x3 conv of grad_pre,
// into the gate half. grad_hidden comes out as one (B, H*W, 2h) tensor, ready for fc1's backward.
// Pass 1 can also write the forward's output (for fc2's weight gradient when the output was not
// saved), which costs one store per value instead of another pass over the fc1 output.
//
// Given fc2's weight, grad is the gradient of fc2's output instead, and pass 1 computes the image
// rows' output gradients grad_rows @ fc2_weight itself, a few rows at a time, into a per-thread
// buffer that stays in cache (on a large map the (B, H*W, h) product written to memory and read
// back costs several times its arithmetic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pytorch/conv_glu.h"
#include "pytorch/cpu/vector_math.h"

namespace transnext_mm {
namespace {

// Tokens per product of the backward's fc2 weight with the output gradient (see below).
constexpr int64_t kProductTokens = 128;

// visit(tap, token) for each 3x3 tap of token (y, x) whose neighbour lies inside the image: the
// neighbour (y + dy, x + dx) with Sign = 1 (the conv), (y - dy, x - dx) with Sign = -1 (its
// transpose); tap = (dy + 1) * 3 + (dx + 1).
template <int Sign, typename Visit>
TNX_ALWAYS_INLINE void for_each_tap(int64_t y, int64_t x, int64_t height, int64_t width,
                                    Visit&& visit) {
  for (int64_t dy = -1; dy <= 1; ++dy) {
    const int64_t yy = y + Sign * dy;
    if (yy < 0 || yy >= height) continue;
    for (int64_t dx = -1; dx <= 1; ++dx) {
      const int64_t xx = x + Sign * dx;
      if (xx < 0 || xx >= width) continue;
      visit((dy + 1) * 3 + (dx + 1), yy * width + xx);
    }
  }
}

// acc += a * b over h channels.
template <typename T>
TNX_ALWAYS_INLINE void mul_add_row(T* __restrict__ acc, const T* __restrict__ a,
                                   const T* __restrict__ b, int64_t h) {
#pragma omp simd
  for (int64_t c = 0; c < h; ++c) acc[c] += a[c] * b[c];
}

// acc (h) = bias + depthwise_conv3x3(gate) at token (y, x): the gate pre-activation. hidden: the
// element's (H*W, 2h) fc1 output (gate half first); taps: (9, h) weights, tap-major.
template <typename T>
TNX_ALWAYS_INLINE void pre_activation(const T* hidden, const T* taps, const T* bias, T* acc,
                                      int64_t y, int64_t x, int64_t height, int64_t width,
                                      int64_t h) {
  std::copy(bias, bias + h, acc);
  for_each_tap<1>(y, x, height, width, [&](int64_t tap, int64_t token) {
    mul_add_row(acc, taps + tap * h, hidden + token * 2 * h, h);
  });
}

// One image row y of one batch element: out, the element's (H*W, h) output; acc: h scratch
// values.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_impl(const T* hidden, const T* taps, const T* bias, T* out, T* acc,
                                     int64_t y, int64_t height, int64_t width, int64_t h) {
  for (int64_t x = 0; x < width; ++x) {
    pre_activation(hidden, taps, bias, acc, y, x, height, width, h);
    const T* __restrict__ value = hidden + (y * width + x) * 2 * h + h;
    T* __restrict__ o = out + (y * width + x) * h;
#pragma omp simd
    for (int64_t c = 0; c < h; ++c) o[c] = gelu(acc[c]) * value[c];
  }
}

// Pass 1 of the backward for image row y (see the top of the file). grad_row: the row's (W, h)
// output gradient; grad_hidden: the element's (H*W, 2h) input gradient (the value half is written
// here);
// grad_pre: its (H*W, h) buffer; wpart (9, h) and bpart (h): this row's partials (zeroed here);
// acc: h scratch values; out: the element's (H*W, h) forward output, or null.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_backward_impl(const T* hidden, const T* grad_row, const T* taps,
                                              const T* bias, T* grad_hidden, T* grad_pre, T* wpart,
                                              T* bpart, T* acc, T* out, int64_t y, int64_t height,
                                              int64_t width, int64_t h) {
  const int64_t row_stride = 2 * h;
  const T inv_sqrt2 = T(0.70710678118654752440), inv_sqrt_2pi = T(0.39894228040143267794);
  std::fill(wpart, wpart + 9 * h, T(0));
  std::fill(bpart, bpart + h, T(0));
  for (int64_t x = 0; x < width; ++x) {
    pre_activation(hidden, taps, bias, acc, y, x, height, width, h);
    const int64_t token = y * width + x;
    const T* __restrict__ value = hidden + token * row_stride + h;
    const T* __restrict__ g = grad_row + x * h;
    T* __restrict__ gv = grad_hidden + token * row_stride + h;
    T* __restrict__ gp = grad_pre + token * h;
    // The output row, or acc itself when it is not wanted (element c is read before it is
    // written, in the same iteration).
    T* o = out == nullptr ? acc : out + token * h;
#pragma omp simd
    for (int64_t c = 0; c < h; ++c) {
      const T pre = acc[c];
      const T cdf = T(0.5) * (T(1) + erf_approx(pre * inv_sqrt2));
      const T pdf = inv_sqrt_2pi * exp_approx(T(-0.5) * pre * pre);
      const T activation = pre * cdf;
      gv[c] = g[c] * activation;
      o[c] = activation * value[c];
      const T d = g[c] * value[c] * (cdf + pre * pdf);
      gp[c] = d;
      bpart[c] += d;
    }
    // The tap weights' gradient: grad_pre times the gate value each tap read.
    for_each_tap<1>(y, x, height, width, [&](int64_t tap, int64_t nb) {
      mul_add_row(wpart + tap * h, gp, hidden + nb * row_stride, h);
    });
  }
}

// Pass 2 for image row y: the gate half of grad_hidden, sum over taps of w[tap] * grad_pre at the
// token the tap reaches from the opposite side.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_input_grad_impl(const T* grad_pre, const T* taps, T* grad_hidden,
                                                int64_t y, int64_t height, int64_t width,
                                                int64_t h) {
  for (int64_t x = 0; x < width; ++x) {
    T* o = grad_hidden + (y * width + x) * 2 * h;
    std::fill(o, o + h, T(0));
    for_each_tap<-1>(y, x, height, width, [&](int64_t tap, int64_t nb) {
      mul_add_row(o, taps + tap * h, grad_pre + nb * h, h);
    });
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

#define TNX_DEFINE_GATE_ROW_BACKWARD(T)                                                            \
  TNX_CPU_CLONES void gate_row_backward(const T* hidden, const T* grad_row, const T* taps,         \
                                        const T* bias, T* grad_hidden, T* grad_pre, T* wpart,      \
                                        T* bpart, T* acc, T* out, int64_t y, int64_t height,       \
                                        int64_t width, int64_t h) {                                \
    gate_row_backward_impl(hidden, grad_row, taps, bias, grad_hidden, grad_pre, wpart, bpart, acc, \
                           out, y, height, width, h);                                              \
  }                                                                                                \
  TNX_CPU_CLONES void gate_row_input_grad(const T* grad_pre, const T* taps, T* grad_hidden,        \
                                          int64_t y, int64_t height, int64_t width, int64_t h) {   \
    gate_row_input_grad_impl(grad_pre, taps, grad_hidden, y, height, width, h);                    \
  }
TNX_DEFINE_GATE_ROW_BACKWARD(float)
TNX_DEFINE_GATE_ROW_BACKWARD(double)
#undef TNX_DEFINE_GATE_ROW_BACKWARD

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

std::vector<at::Tensor> conv_glu_gate_backward_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& fc2_weight, int64_t height,
                                                   int64_t width, bool with_output) {
  const int64_t B = hidden.size(0), h = hidden.size(2) / 2, tokens = height * width;
  const bool project = fc2_weight.defined();  // grad is fc2's output gradient (B, H*W, C)
  const int64_t grad_channels = grad.size(2);
  auto grad_hidden = at::empty_like(hidden);
  auto out = at::empty({with_output ? B : 0, tokens, h}, hidden.options());
  auto grad_pre = at::empty({B, tokens, h}, hidden.options());
  // One (9 taps + bias) x h partial per image row of each element.
  auto partials = at::empty({B * height, 10, h}, hidden.options());
  const auto taps = weight.reshape({h, 9}).t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "conv_glu_gate_backward_cpu", [&] {
    const scalar_t *hid = hidden.data_ptr<scalar_t>(), *g = grad.data_ptr<scalar_t>(),
                   *tap = taps.data_ptr<scalar_t>(), *b = bias.data_ptr<scalar_t>();
    scalar_t *gh = grad_hidden.data_ptr<scalar_t>(), *gp = grad_pre.data_ptr<scalar_t>(),
             *part = partials.data_ptr<scalar_t>();
    scalar_t* o = with_output ? out.data_ptr<scalar_t>() : nullptr;
    // The products cover a few image rows at once where rows are short (at least
    // kProductTokens tokens: one product per 16- or 32-token row runs far below peak).
    const int64_t product_rows = std::max<int64_t>(1, kProductTokens / std::max<int64_t>(width, 1));
    at::parallel_for(0, B * height, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(h), rows_grad(project ? product_rows * width * h : 0);
      const auto options = at::TensorOptions().dtype(hidden.scalar_type());
      // Views of raw buffers (not fc2_weight itself: these threads do not share the caller's
      // grad mode, and at::mm_out refuses an output for an input that requires grad).
      const at::Tensor fc2_view =
          project ? at::from_blob(fc2_weight.data_ptr(), {grad_channels, h}, options)
                  : at::Tensor();
      int64_t rows_begin = 0, rows_end = 0;  // the tasks whose products rows_grad holds
      for (int64_t task = begin; task < end; ++task) {
        const int64_t batch = task / height, y = task % height;
        const scalar_t* grad_row = g + (batch * tokens + y * width) * grad_channels;
        if (project) {
          if (task >= rows_end) {
            // The block of product_rows rows (of this element) that holds this row: fixed
            // blocks, so that a row's product does not depend on the thread count (a block
            // split between two threads' ranges is computed by both).
            rows_begin = batch * height + y / product_rows * product_rows;
            rows_end = std::min(rows_begin + product_rows, (batch + 1) * height);
            const int64_t n = (rows_end - rows_begin) * width;
            at::Tensor products = at::from_blob(rows_grad.data(), {n, h}, options);
            at::mm_out(products,
                       at::from_blob(const_cast<scalar_t*>(g + rows_begin * width * grad_channels),
                                     {n, grad_channels}, options),
                       fc2_view);
          }
          grad_row = rows_grad.data() + (task - rows_begin) * width * h;
        }
        scalar_t* row_part = part + task * 10 * h;
        gate_row_backward(hid + batch * tokens * 2 * h, grad_row, tap, b,
                          gh + batch * tokens * 2 * h, gp + batch * tokens * h, row_part,
                          row_part + 9 * h, acc.data(), o == nullptr ? o : o + batch * tokens * h,
                          y, height, width, h);
      }
    });
    at::parallel_for(0, B * height, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t batch = task / height, y = task % height;
        gate_row_input_grad(gp + batch * tokens * h, tap, gh + batch * tokens * 2 * h, y, height,
                            width, h);
      }
    });
  });
  // The rows' partials summed in row order, (10, h) -> the conv's (h, 1, 3, 3) weight and (h)
  // bias gradients.
  auto total = at::zeros({10, h}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "conv_glu_gate_backward_cpu_sum", [&] {
    const scalar_t* part = partials.data_ptr<scalar_t>();
    scalar_t* t = total.data_ptr<scalar_t>();
    at::parallel_for(0, 10 * h, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = 0; row < B * height; ++row) {
        const scalar_t* p = part + row * 10 * h;
        for (int64_t i = begin; i < end; ++i) t[i] += p[i];
      }
    });
  });
  auto grad_weight = total.narrow(0, 0, 9).t().reshape({h, 1, 3, 3}).contiguous();
  auto grad_bias = total.select(0, 9).clone();  // its own storage (not a view of total)
  return {grad_hidden, grad_weight, grad_bias, out};
}

}  // namespace transnext_mm
