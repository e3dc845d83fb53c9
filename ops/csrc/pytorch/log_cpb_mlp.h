// Copyright (c) transnext-mm contributors. All rights reserved.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace transnext_mm {

// The log-CPB MLP, out = fc2(relu(fc1(points))), for points (P, 2), fc1 weight (hidden, 2) and
// bias (hidden), fc2 weight (heads, hidden) and bias (heads). Returns (P, heads). CPU, fp32 /
// fp64.
at::Tensor log_cpb_mlp_forward(const at::Tensor& points, const at::Tensor& weight1,
                               const at::Tensor& bias1, const at::Tensor& weight2,
                               const at::Tensor& bias2);

// Its backward for the output gradient grad (P, heads): the gradients of weight1, bias1, weight2
// and bias2 (the points are constants: no gradient).
std::vector<at::Tensor> log_cpb_mlp_backward(const at::Tensor& grad, const at::Tensor& points,
                                             const at::Tensor& weight1, const at::Tensor& bias1,
                                             const at::Tensor& weight2);

at::Tensor log_cpb_mlp_forward_cpu(const at::Tensor& points, const at::Tensor& weight1,
                                   const at::Tensor& bias1, const at::Tensor& weight2,
                                   const at::Tensor& bias2);

std::vector<at::Tensor> log_cpb_mlp_backward_cpu(const at::Tensor& grad, const at::Tensor& points,
                                                 const at::Tensor& weight1, const at::Tensor& bias1,
                                                 const at::Tensor& weight2);

}  // namespace transnext_mm
