// Copyright (c) transnext-mm contributors. All rights reserved.
#include <torch/extension.h>

#include "pytorch/aggregated_attention.h"
#include "pytorch/conv_glu.h"
#include "pytorch/cosine_qk.h"
#include "pytorch/log_cpb_mlp.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "transnext_mm compiled ops: aggregated attention (CPU, and CUDA when built with it) and "
      "the convolutional GLU gate, the cosine-attention inputs and the log-CPB MLP (CPU)";
  m.def("aggregated_attention_forward", &transnext_mm::aggregated_attention_forward,
        "Aggregated attention forward; returns (out, lse)");
  m.def("aggregated_attention_backward", &transnext_mm::aggregated_attention_backward,
        "Aggregated attention backward; returns the 8 input gradients");
  m.def("aggregated_attention_table_forward", &transnext_mm::aggregated_attention_table_forward,
        "Aggregated attention forward with the pooled bias in table form; returns (out, lse)");
  m.def("aggregated_attention_table_backward", &transnext_mm::aggregated_attention_table_backward,
        "Aggregated attention backward with the pooled bias in table form; returns the 8 input "
        "gradients, the table's in place of bias_pool's");
  m.def("conv_glu_gate_forward", &transnext_mm::conv_glu_gate_forward,
        "GELU(depthwise_conv3x3(gate) + bias) * value from the fc1 output [gate | value]; with "
        "fc2_weight (C, h) (and fc2_bias), fc2's output (B, H*W, C) instead",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("height"), py::arg("width"),
        py::arg("fc2_weight") = py::none(), py::arg("fc2_bias") = py::none());
  m.def("conv_glu_gate_backward", &transnext_mm::conv_glu_gate_backward,
        "ConvGLU gate backward; returns the gradients of hidden, weight and bias, and with_output "
        "? the forward's output : an empty tensor. With fc2_weight (C, h), grad is the gradient "
        "of fc2's output (B, H*W, C)",
        py::arg("grad"), py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("height"),
        py::arg("width"), py::arg("with_output") = false, py::arg("fc2_weight") = py::none());
  m.def("log_cpb_mlp_forward", &transnext_mm::log_cpb_mlp_forward,
        "The log-CPB MLP fc2(relu(fc1(points))) for 2-d points");
  m.def("log_cpb_mlp_backward", &transnext_mm::log_cpb_mlp_backward,
        "The log-CPB MLP's backward; returns the gradients of its two weights and biases");
  m.def("cosine_queries_keys_forward", &transnext_mm::cosine_queries_keys_forward,
        "Scaled cosine queries, normalised keys and token weights of aggregated attention");
  m.def("cosine_queries_keys_backward", &transnext_mm::cosine_queries_keys_backward,
        "Their backward; returns the gradients of q, k, query_embedding, scale, "
        "learnable_tokens and learnable_bias");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
