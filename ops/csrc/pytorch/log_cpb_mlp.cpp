// Copyright (c) transnext-mm contributors. All rights reserved.
#include "pytorch/log_cpb_mlp.h"

#include <c10/util/Exception.h>

namespace transnext_mm {

namespace {

void check_mlp_inputs(const at::Tensor& points, const at::Tensor& weight1, const at::Tensor& bias1,
                      const at::Tensor& weight2) {
  TORCH_CHECK(points.dim() == 2 && points.size(1) == 2, "log_cpb_mlp: points must be (P, 2), got ",
              points.sizes());
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == 2,
              "log_cpb_mlp: weight1 must be (hidden, 2), got ", weight1.sizes());
  const int64_t hidden = weight1.size(0);
  TORCH_CHECK(bias1.dim() == 1 && bias1.size(0) == hidden, "log_cpb_mlp: bias1 must have shape (",
              hidden, "), got ", bias1.sizes());
  TORCH_CHECK(weight2.dim() == 2 && weight2.size(1) == hidden,
              "log_cpb_mlp: weight2 must be (heads, ", hidden, "), got ", weight2.sizes());
  for (const auto& t : {weight1, bias1, weight2}) {
    TORCH_CHECK(t.device() == points.device() && t.scalar_type() == points.scalar_type(),
                "log_cpb_mlp: the weights must match the points' device and dtype (",
                points.device(), ", ", points.scalar_type(), ")");
  }
  TORCH_CHECK(points.device().is_cpu(), "log_cpb_mlp: CPU kernel only, got device ",
              points.device());
  TORCH_CHECK(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
              "log_cpb_mlp: CPU kernel for float32 / float64, got ", points.scalar_type());
}

}  // namespace

at::Tensor log_cpb_mlp_forward(const at::Tensor& points, const at::Tensor& weight1,
                               const at::Tensor& bias1, const at::Tensor& weight2,
                               const at::Tensor& bias2) {
  check_mlp_inputs(points, weight1, bias1, weight2);
  TORCH_CHECK(bias2.dim() == 1 && bias2.size(0) == weight2.size(0),
              "log_cpb_mlp: bias2 must have shape (", weight2.size(0), "), got ", bias2.sizes());
  TORCH_CHECK(bias2.device() == points.device() && bias2.scalar_type() == points.scalar_type(),
              "log_cpb_mlp: the weights must match the points' device and dtype (", points.device(),
              ", ", points.scalar_type(), ")");
  return log_cpb_mlp_forward_cpu(points.contiguous(), weight1.contiguous(), bias1.contiguous(),
                                 weight2.contiguous(), bias2.contiguous());
}

std::vector<at::Tensor> log_cpb_mlp_backward(const at::Tensor& grad, const at::Tensor& points,
                                             const at::Tensor& weight1, const at::Tensor& bias1,
                                             const at::Tensor& weight2) {
  check_mlp_inputs(points, weight1, bias1, weight2);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == points.size(0) && grad.size(1) == weight2.size(0),
              "log_cpb_mlp: grad must have shape (", points.size(0), ", ", weight2.size(0),
              "), got ", grad.sizes());
  TORCH_CHECK(grad.device() == points.device() && grad.scalar_type() == points.scalar_type(),
              "log_cpb_mlp: grad must match the points' device and dtype (", points.device(), ", ",
              points.scalar_type(), ")");
  return log_cpb_mlp_backward_cpu(grad.contiguous(), points.contiguous(), weight1.contiguous(),
                                  bias1.contiguous(), weight2.contiguous());
}

}  // namespace transnext_mm
