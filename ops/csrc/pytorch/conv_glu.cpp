// Copyright (c) transnext-mm contributors. All rights reserved.
#include "pytorch/conv_glu.h"

#include <c10/util/Exception.h>

namespace transnext_mm {

namespace {

void check_gate_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t height, int64_t width) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(2) % 2 == 0,
              "conv_glu_gate: hidden must be (B, H*W, 2*channels), got ", hidden.sizes());
  const int64_t h = hidden.size(2) / 2;
  TORCH_CHECK(height >= 0 && width >= 0 && hidden.size(1) == height * width,
              "conv_glu_gate: hidden has ", hidden.size(1), " tokens but height*width = ", height,
              "*", width);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == h && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "conv_glu_gate: weight must have shape (", h, ", 1, 3, 3), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h, "conv_glu_gate: bias must have shape (", h,
              "), got ", bias.sizes());
  for (const auto& t : {weight, bias}) {
    TORCH_CHECK(t.device() == hidden.device() && t.scalar_type() == hidden.scalar_type(),
                "conv_glu_gate: weight and bias must match hidden's device and dtype (",
                hidden.device(), ", ", hidden.scalar_type(), ")");
  }
  TORCH_CHECK(hidden.device().is_cpu(), "conv_glu_gate: CPU kernel only, got device ",
              hidden.device());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kDouble,
              "conv_glu_gate: CPU kernel for float32 / float64, got ", hidden.scalar_type());
}

// fc2's weight (C, h) as given (contiguous), or an undefined tensor.
at::Tensor checked_fc2_weight(const c10::optional<at::Tensor>& fc2_weight,
                              const at::Tensor& hidden) {
  if (!fc2_weight.has_value()) return at::Tensor();
  const at::Tensor& fc2 = *fc2_weight;
  const int64_t h = hidden.size(2) / 2;
  TORCH_CHECK(fc2.dim() == 2 && fc2.size(1) == h, "conv_glu_gate: fc2_weight must have shape (C, ",
              h, "), got ", fc2.sizes());
  TORCH_CHECK(fc2.device() == hidden.device() && fc2.scalar_type() == hidden.scalar_type(),
              "conv_glu_gate: fc2_weight must match hidden's device and dtype (", hidden.device(),
              ", ", hidden.scalar_type(), ")");
  return fc2.contiguous();
}

}  // namespace

at::Tensor conv_glu_gate_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& bias, int64_t height, int64_t width,
                                 const c10::optional<at::Tensor>& fc2_weight,
                                 const c10::optional<at::Tensor>& fc2_bias) {
  check_gate_inputs(hidden, weight, bias, height, width);
  const at::Tensor fc2 = checked_fc2_weight(fc2_weight, hidden);
  at::Tensor fc2_b;
  if (fc2_bias.has_value()) {
    fc2_b = *fc2_bias;
    TORCH_CHECK(fc2.defined(), "conv_glu_gate: fc2_bias needs fc2_weight");
    TORCH_CHECK(fc2_b.dim() == 1 && fc2_b.size(0) == fc2.size(0),
                "conv_glu_gate: fc2_bias must have shape (", fc2.size(0), "), got ", fc2_b.sizes());
    TORCH_CHECK(fc2_b.device() == hidden.device() && fc2_b.scalar_type() == hidden.scalar_type(),
                "conv_glu_gate: fc2_bias must match hidden's device and dtype (", hidden.device(),
                ", ", hidden.scalar_type(), ")");
    fc2_b = fc2_b.contiguous();
  }
  return conv_glu_gate_forward_cpu(hidden.contiguous(), weight.contiguous(), bias.contiguous(), fc2,
                                   fc2_b, height, width);
}

std::vector<at::Tensor> conv_glu_gate_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               int64_t height, int64_t width, bool with_output,
                                               const c10::optional<at::Tensor>& fc2_weight) {
  check_gate_inputs(hidden, weight, bias, height, width);
  const int64_t h = hidden.size(2) / 2;
  const at::Tensor fc2 = checked_fc2_weight(fc2_weight, hidden);
  const int64_t grad_channels = fc2.defined() ? fc2.size(0) : h;
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == hidden.size(0) && grad.size(1) == hidden.size(1) &&
                  grad.size(2) == grad_channels,
              "conv_glu_gate: grad must have shape (", hidden.size(0), ", ", hidden.size(1), ", ",
              grad_channels, ")", fc2.defined() ? " (fc2's output gradient)" : "", ", got ",
              grad.sizes());
  TORCH_CHECK(grad.device() == hidden.device() && grad.scalar_type() == hidden.scalar_type(),
              "conv_glu_gate: grad must match hidden's device and dtype (", hidden.device(), ", ",
              hidden.scalar_type(), ")");
  return conv_glu_gate_backward_cpu(grad.contiguous(), hidden.contiguous(), weight.contiguous(),
                                    bias.contiguous(), fc2, height, width, with_output);
}

}  // namespace transnext_mm
