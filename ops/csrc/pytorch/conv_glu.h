// Copyright (c) transnext-mm contributors. All rights reserved.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace transnext_mm {

// The convolutional GLU's gate, GELU(depthwise_conv3x3(gate) + bias) * value, from the fc1 output
// hidden = [gate | value] of shape (B, H*W, 2h) (tokens of a row-major H x W grid); weight
// (h, 1, 3, 3), bias (h). Returns (B, H*W, h); given fc2's weight (C, h) (and bias (C)), fc2's
// output (B, H*W, C) instead. CPU, fp32 / fp64.
at::Tensor conv_glu_gate_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& bias, int64_t height, int64_t width,
                                 const c10::optional<at::Tensor>& fc2_weight,
                                 const c10::optional<at::Tensor>& fc2_bias);

// Its backward: from the output gradient grad (B, H*W, h) (given fc2's weight (C, h), fc2's
// output gradient (B, H*W, C)) and the forward's inputs, the gradients of hidden (B, H*W, 2h),
// weight and bias, and with_output ? the gate's output (recomputed on the way) : an empty
// (0, H*W, h) tensor.
std::vector<at::Tensor> conv_glu_gate_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               int64_t height, int64_t width, bool with_output,
                                               const c10::optional<at::Tensor>& fc2_weight);

// fc2_weight / fc2_bias: undefined, or fc2's (C, h) weight (and (C) bias, or undefined) to
// return fc2's output (B, H*W, C) instead of the gate's.
at::Tensor conv_glu_gate_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& fc2_weight,
                                     const at::Tensor& fc2_bias, int64_t height, int64_t width);

// fc2_weight: undefined, or fc2's (C, h) weight when grad is fc2's output gradient (B, H*W, C).
std::vector<at::Tensor> conv_glu_gate_backward_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& fc2_weight, int64_t height,
                                                   int64_t width, bool with_output);

}  // namespace transnext_mm
