// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernel of the convolutional GLU's gate: for each token of a channels-last grid,
//   out = GELU(bias + depthwise_conv3x3(gate)) * value,   [gate | value] = the fc1 output row,
// in one pass. PyTorch runs this as a depthwise conv on a strided channels-last view (oneDNN
// reorders it), a GELU and a product, three round trips through memory of tensors that do not
// fit in cache at stage 1; here each output row reads its 3x3 neighbourhood from cache, and each
// block of 8 channels sums its 9 taps and goes through the GELU in registers. The fp32 GELU's erf
// is a rational function (vector_math.h), which needs no exponential.
//
// The backward works the same way in two passes over image rows. Pass 1 recomputes each token's
// pre-activation from its 3x3 neighbourhood, writes the value's gradient GELU(pre) * grad into
// the value half of grad_hidden and keeps grad_pre = grad * value * GELU'(pre), and accumulates
// the conv weight's and bias's gradients from the neighbourhood it has just read, into one
// partial per image row (summed afterwards in row order: the result does not depend on the
// number of threads). Pass 2 writes the gate's gradient, the transposed 3x3 conv of grad_pre,
// into the gate half. grad_hidden comes out as one (B, H*W, 2h) tensor, ready for fc1's backward.
// The passes interleave: pass 2 of row y follows pass 1 of row y + 1, so grad_pre lives in a
// per-thread ring of three rows that stays in cache; the rows just outside a thread's range are
// recomputed for their grad_pre only (halo rows, whose other results go to scratch buffers).
// Pass 1 can also write the forward's output (for fc2's weight gradient when the output was not
// saved), which costs one store per value instead of another pass over the fc1 output.
//
// Given fc2's weight, the forward returns fc2's output, and the backward takes the gradient of
// fc2's output as grad. On maps with long rows (at least kProductTokens tokens) each row's gate
// output goes through fc2 from a per-thread buffer, and pass 1 computes each row's output
// gradient grad_row @ fc2_weight itself, into another: there the (B, H*W, h) tensors written to
// memory and read back cost several times their arithmetic. Shorter rows would make products far
// below peak, and their maps stay in cache anyway: one product of the whole tensor follows the
// forward / precedes the backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "pytorch/conv_glu.h"
#include "pytorch/cpu/vector_math.h"

namespace transnext_mm {
namespace {

// Rows of at least this many tokens get their own products with fc2's weight (see the top of the
// file).
constexpr int64_t kProductTokens = 128;

// Whether fc2 (given) goes through each row's own product, in the forward and the backward.
bool fc2_per_row(const at::Tensor& fc2_weight, int64_t width) {
  return fc2_weight.defined() && width >= kProductTokens;
}

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

// The in-image taps of one token: the value each reads (a row of h channels: the gate half of
// an fc1 output row, or a row of grad_pre) and its weight row, in the order they are summed.
template <typename T>
struct TokenTaps {
  const T* source[9];
  const T* weight[9];
  int count = 0;
  TNX_ALWAYS_INLINE void add(const T* source_row, const T* weight_row) {
    source[count] = source_row;
    weight[count++] = weight_row;
  }
  // The number of taps: Count where the caller knows it at compile time (9), else count.
  template <int Count>
  TNX_ALWAYS_INLINE int size() const {
    return Count > 0 ? Count : count;
  }
};

// The conv's taps of token (y, x) over hidden (the element's (H*W, 2h) fc1 output); taps: (9, h)
// weights, tap-major.
template <typename T>
TNX_ALWAYS_INLINE TokenTaps<T> conv_taps(const T* hidden, const T* taps, int64_t y, int64_t x,
                                         int64_t height, int64_t width, int64_t h) {
  TokenTaps<T> nb;
  for_each_tap<1>(y, x, height, width, [&](int64_t tap, int64_t token) TNX_INLINE_LAMBDA {
    nb.add(hidden + token * 2 * h, taps + tap * h);
  });
  return nb;
}

// f(count) with count a compile-time 9 for a token with all its taps (the loops over them
// unroll), else 0 (nb.count taps).
template <typename T, typename F>
TNX_ALWAYS_INLINE void with_tap_count(const TokenTaps<T>& nb, F&& f) {
  specialize_for<9>(nb.count == 9, f);
}

// acc + the sum over the taps of weight * source, at channels [c, c + lanes).
template <int Count, typename L, typename T>
TNX_ALWAYS_INLINE L tap_sum(L acc, const TokenTaps<T>& nb, int64_t c) {
  for (int t = 0; t < nb.template size<Count>(); ++t)
    acc += load_lanes<L>(nb.weight[t] + c) * load_lanes<L>(nb.source[t] + c);
  return acc;
}

// f(lane, c) over the channels [0, h) in blocks of lanes: 8-float vectors then single floats for
// fp32, single doubles for fp64 (lane: a value of the lane type). Each block keeps its sums in
// registers from the first tap to the output.
template <typename T, typename F>
TNX_ALWAYS_INLINE void for_lanes(int64_t h, F&& f) {
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float>)
    for (; c + 8 <= h; c += 8) f(v8f{}, c);
  for (; c < h; ++c) f(T{}, c);
}

// The fc1 output row of token (y + 1, x + kAhead), which the row after this one reads first
// (the current token's own row where that lies outside the image): prefetched while the current
// token is computed, channel block by channel block, since a map at stage 1 does not fit in cache.
constexpr int64_t kAhead = 2;
template <typename T>
TNX_ALWAYS_INLINE const T* row_ahead(const T* hidden, int64_t y, int64_t x, int64_t height,
                                     int64_t width, int64_t h) {
  const bool inside = y + 1 < height && x + kAhead < width;
  return hidden + (inside ? (y + 1) * width + x + kAhead : y * width + x) * 2 * h;
}
template <typename L, typename T>
TNX_ALWAYS_INLINE void prefetch_lanes(const T* ahead, int64_t c, int64_t h) {
  if constexpr (sizeof(L) > sizeof(T)) {
    __builtin_prefetch(ahead + c);
    __builtin_prefetch(ahead + h + c);
  }
}

// Exact (erf) GELU, as torch.nn.GELU(), and its factors Phi(x) (the normal cdf) and phi(x).
template <typename L>
TNX_ALWAYS_INLINE L normal_cdf(L x) {
  return splat<L>(0.5) + splat<L>(0.5) * erf_rational(x * splat<L>(0.70710678118654752440));
}
template <typename L>
TNX_ALWAYS_INLINE L normal_pdf(L x) {
  return splat<L>(0.39894228040143267794) * exp_nonpositive(splat<L>(-0.5) * x * x);
}

// One image row y of one batch element: out_row, the row's (W, h) output.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_impl(const T* hidden, const T* taps, const T* bias, T* out_row,
                                     int64_t y, int64_t height, int64_t width, int64_t h) {
  for (int64_t x = 0; x < width; ++x) {
    const auto nb = conv_taps(hidden, taps, y, x, height, width, h);
    const T* value = hidden + (y * width + x) * 2 * h + h;
    const T* ahead = row_ahead(hidden, y, x, height, width, h);
    T* o = out_row + x * h;
    with_tap_count(nb, [&](auto count) TNX_INLINE_LAMBDA {
      for_lanes<T>(h, [&](auto lane, int64_t c) TNX_INLINE_LAMBDA {
        using L = decltype(lane);
        prefetch_lanes<L>(ahead, c, h);
        const L pre = tap_sum<count()>(load_lanes<L>(bias + c), nb, c);
        store_lanes(o + c, pre * normal_cdf(pre) * load_lanes<L>(value + c));
      });
    });
  }
}

// Pass 1 of the backward for image row y (see the top of the file). grad_row: the row's (W, h)
// output gradient; value_grad_row: the value half of the row's (W, 2h) slice of grad_hidden;
// grad_pre_row: the row's (W, h) grad_pre; wpart (9, h) and bpart (h): this row's partials
// (zeroed here); out_row: the row's (W, h) forward output, or null.
template <typename T>
TNX_ALWAYS_INLINE void gate_row_backward_impl(const T* hidden, const T* grad_row, const T* taps,
                                              const T* bias, T* value_grad_row, T* grad_pre_row,
                                              T* wpart, T* bpart, T* out_row, int64_t y,
                                              int64_t height, int64_t width, int64_t h) {
  std::fill(wpart, wpart + 9 * h, T(0));
  std::fill(bpart, bpart + h, T(0));
  for (int64_t x = 0; x < width; ++x) {
    const auto nb = conv_taps(hidden, taps, y, x, height, width, h);
    const T* value = hidden + (y * width + x) * 2 * h + h;
    const T* ahead = row_ahead(hidden, y, x, height, width, h);
    const T* g = grad_row + x * h;
    T* gv = value_grad_row + x * 2 * h;
    T* gp = grad_pre_row + x * h;
    T* o = out_row == nullptr ? nullptr : out_row + x * h;
    with_tap_count(nb, [&](auto count) TNX_INLINE_LAMBDA {
      for_lanes<T>(h, [&](auto lane, int64_t c) TNX_INLINE_LAMBDA {
        using L = decltype(lane);
        prefetch_lanes<L>(ahead, c, h);
        const L pre = tap_sum<count()>(load_lanes<L>(bias + c), nb, c);
        const L cdf = normal_cdf(pre), activation = pre * cdf;
        const L grad = load_lanes<L>(g + c), val = load_lanes<L>(value + c);
        store_lanes(gv + c, grad * activation);
        if (o != nullptr) store_lanes(o + c, activation * val);
        const L d = grad * val * (cdf + pre * normal_pdf(pre));
        store_lanes(gp + c, d);
        store_lanes(bpart + c, load_lanes<L>(bpart + c) + d);
        // The tap weights' gradient: grad_pre times the gate value each tap read.
        for (int t = 0; t < nb.template size<count()>(); ++t) {
          T* w = wpart + (nb.weight[t] - taps) + c;
          store_lanes(w, load_lanes<L>(w) + d * load_lanes<L>(nb.source[t] + c));
        }
      });
    });
  }
}

// Pass 2 for one image row: its gate gradients (the gate half of its (W, 2h) slice of
// grad_hidden, gate_grad_row), the sum over taps of w[tap] * grad_pre at the token the tap
// reaches from the opposite side. grad_pre_rows: the (W, h) grad_pre of the rows above, at and
// below this one (null outside the image).
template <typename T>
TNX_ALWAYS_INLINE void gate_row_input_grad_impl(const T* const* grad_pre_rows, const T* taps,
                                                T* gate_grad_row, int64_t width, int64_t h) {
  for (int64_t x = 0; x < width; ++x) {
    // The taps in the order of for_each_tap<-1>: tap (dy, dx) reads (y - dy, x - dx).
    TokenTaps<T> nb;
    for (int64_t dy = -1; dy <= 1; ++dy) {
      const T* source = grad_pre_rows[1 - dy];
      if (source == nullptr) continue;
      for (int64_t dx = -1; dx <= 1; ++dx) {
        const int64_t xx = x - dx;
        if (xx < 0 || xx >= width) continue;
        nb.add(source + xx * h, taps + ((dy + 1) * 3 + (dx + 1)) * h);
      }
    }
    T* o = gate_grad_row + x * 2 * h;
    with_tap_count(nb, [&](auto count) TNX_INLINE_LAMBDA {
      for_lanes<T>(h, [&](auto lane, int64_t c) TNX_INLINE_LAMBDA {
        using L = decltype(lane);
        store_lanes(o + c, tap_sum<count()>(splat<L>(0), nb, c));
      });
    });
  }
}

#define TNX_DEFINE_GATE_ROW(T)                                                            \
  TNX_CPU_CLONES void gate_row(const T* hidden, const T* taps, const T* bias, T* out_row, \
                               int64_t y, int64_t height, int64_t width, int64_t h) {     \
    gate_row_impl(hidden, taps, bias, out_row, y, height, width, h);                      \
  }
TNX_DEFINE_GATE_ROW(float)
TNX_DEFINE_GATE_ROW(double)
#undef TNX_DEFINE_GATE_ROW

#define TNX_DEFINE_GATE_ROW_BACKWARD(T)                                                            \
  TNX_CPU_CLONES void gate_row_backward(const T* hidden, const T* grad_row, const T* taps,         \
                                        const T* bias, T* value_grad_row, T* grad_pre_row,         \
                                        T* wpart, T* bpart, T* out_row, int64_t y, int64_t height, \
                                        int64_t width, int64_t h) {                                \
    gate_row_backward_impl(hidden, grad_row, taps, bias, value_grad_row, grad_pre_row, wpart,      \
                           bpart, out_row, y, height, width, h);                                   \
  }                                                                                                \
  TNX_CPU_CLONES void gate_row_input_grad(const T* const* grad_pre_rows, const T* taps,            \
                                          T* gate_grad_row, int64_t width, int64_t h) {            \
    gate_row_input_grad_impl(grad_pre_rows, taps, gate_grad_row, width, h);                        \
  }
TNX_DEFINE_GATE_ROW_BACKWARD(float)
TNX_DEFINE_GATE_ROW_BACKWARD(double)
#undef TNX_DEFINE_GATE_ROW_BACKWARD

}  // namespace

at::Tensor conv_glu_gate_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& fc2_weight,
                                     const at::Tensor& fc2_bias, int64_t height, int64_t width) {
  const int64_t B = hidden.size(0), h = hidden.size(2) / 2, tokens = height * width;
  // fc2: applied to each row's gate output in cache (project), or to the whole gate output at
  // the end.
  const bool project = fc2_per_row(fc2_weight, width);
  const int64_t channels = project ? fc2_weight.size(0) : h;
  auto out = at::empty({B, tokens, channels}, hidden.options());
  const auto taps = weight.reshape({h, 9}).t().contiguous();  // (9, h): one vector per tap
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "conv_glu_gate_forward_cpu", [&] {
      const scalar_t *hid = hidden.data_ptr<scalar_t>(), *tap = taps.data_ptr<scalar_t>(),
                     *b = bias.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, B * height, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> row_out(project ? width * h : 0);
        const auto options = at::TensorOptions().dtype(hidden.scalar_type());
        // Views of raw buffers (these threads do not share the caller's grad mode).
        at::Tensor row_view, fc2_t, fc2_b;
        if (project) {
          row_view = at::from_blob(row_out.data(), {width, h}, options);
          fc2_t = at::from_blob(fc2_weight.data_ptr(), {channels, h}, options).t();
          if (fc2_bias.defined()) fc2_b = at::from_blob(fc2_bias.data_ptr(), {channels}, options);
        }
        for (int64_t task = begin; task < end; ++task) {
          const int64_t batch = task / height, y = task % height;
          gate_row(hid + batch * tokens * 2 * h, tap, b,
                   project ? row_out.data() : o + task * width * h, y, height, width, h);
          if (!project) continue;
          at::Tensor rows = at::from_blob(o + task * width * channels, {width, channels}, options);
          if (fc2_b.defined())
            at::addmm_out(rows, fc2_b, row_view, fc2_t);
          else
            at::mm_out(rows, row_view, fc2_t);
        }
      });
    });
  }
  if (!fc2_weight.defined() || project) return out;
  const auto gate = out.view({B * tokens, h});
  const auto fc2_t = fc2_weight.detach().t();
  return (fc2_bias.defined() ? at::addmm(fc2_bias.detach(), gate, fc2_t) : at::mm(gate, fc2_t))
      .view({B, tokens, fc2_weight.size(0)});
}

std::vector<at::Tensor> conv_glu_gate_backward_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& fc2_weight, int64_t height,
                                                   int64_t width, bool with_output) {
  const int64_t B = hidden.size(0), h = hidden.size(2) / 2, tokens = height * width;
  // fc2's weight: multiplied into each row's gradient in pass 1 (project), or into the whole
  // gradient here.
  const bool project = fc2_per_row(fc2_weight, width);
  const int64_t grad_channels = project ? grad.size(2) : h;
  const at::Tensor output_grad =
      fc2_weight.defined() && !project
          ? at::mm(grad.reshape({-1, grad.size(2)}), fc2_weight.detach()).view({B, tokens, h})
          : grad;
  auto grad_hidden = at::empty_like(hidden);
  auto out = at::empty({with_output ? B : 0, tokens, h}, hidden.options());
  // One (9 taps + bias) x h partial per image row of each element.
  auto partials = at::empty({B * height, 10, h}, hidden.options());
  const auto taps = weight.reshape({h, 9}).t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "conv_glu_gate_backward_cpu", [&] {
    const scalar_t *hid = hidden.data_ptr<scalar_t>(), *g = output_grad.data_ptr<scalar_t>(),
                   *tap = taps.data_ptr<scalar_t>(), *b = bias.data_ptr<scalar_t>();
    scalar_t *gh = grad_hidden.data_ptr<scalar_t>(), *part = partials.data_ptr<scalar_t>();
    scalar_t* o = with_output ? out.data_ptr<scalar_t>() : nullptr;
    // Tasks are image rows (batch * height + y), in one range per thread.
    at::parallel_for(0, B * height, 1, [&](int64_t begin, int64_t end) {
      const int64_t row_values = width * h;
      std::vector<scalar_t> ring(3 * row_values), halo_value_grad(2 * row_values),
          halo_part(10 * h), row_grad(project ? row_values : 0);
      const auto options = at::TensorOptions().dtype(hidden.scalar_type());
      // Views of raw buffers (not fc2_weight itself: these threads do not share the caller's
      // grad mode, and at::mm_out refuses an output for an input that requires grad).
      at::Tensor row_grad_view, fc2_view;
      if (project) {
        row_grad_view = at::from_blob(row_grad.data(), {width, h}, options);
        fc2_view = at::from_blob(fc2_weight.data_ptr(), {grad_channels, h}, options);
      }
      auto grad_row_of = [&](int64_t task) -> const scalar_t* {
        const scalar_t* grad_row = g + task * width * grad_channels;
        if (!project) return grad_row;
        at::mm_out(row_grad_view,
                   at::from_blob(const_cast<scalar_t*>(grad_row), {width, grad_channels}, options),
                   fc2_view);
        return row_grad.data();
      };
      auto ring_row = [&](int64_t y) { return ring.data() + y % 3 * row_values; };
      // Pass 1 of one row; a halo row's results other than grad_pre go to scratch.
      auto pass1 = [&](int64_t task, bool halo) {
        const int64_t batch = task / height, y = task % height;
        scalar_t* row_part = halo ? halo_part.data() : part + task * 10 * h;
        gate_row_backward(hid + batch * tokens * 2 * h, grad_row_of(task), tap, b,
                          halo ? halo_value_grad.data() + h : gh + task * width * 2 * h + h,
                          ring_row(y), row_part, row_part + 9 * h,
                          halo || o == nullptr ? nullptr : o + task * row_values, y, height, width,
                          h);
      };
      auto pass2 = [&](int64_t task) {
        const int64_t y = task % height;
        const scalar_t* rows[3] = {y > 0 ? ring_row(y - 1) : nullptr, ring_row(y),
                                   y + 1 < height ? ring_row(y + 1) : nullptr};
        gate_row_input_grad(rows, tap, gh + task * width * 2 * h, width, h);
      };
      // Each element's rows in this range, [first, last): the halo row above, then pass 1 of
      // each row followed by pass 2 of the row above it, the halo row below, the last pass 2.
      for (int64_t first = begin; first < end;) {
        const int64_t last = std::min(end, (first / height + 1) * height);
        if (first % height > 0) pass1(first - 1, true);
        for (int64_t task = first; task < last; ++task) {
          pass1(task, false);
          if (task > first) pass2(task - 1);
        }
        if (last % height > 0) pass1(last, true);
        pass2(last - 1);
        first = last;
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
