// Copyright (c) transnext-mm contributors. All rights reserved.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace transnext_mm {

// The attention core's inputs of length-scaled cosine attention, in one pass over the rows:
//   q_hat = q / max(|q|, 1e-12),  q_out = (q_hat + query_embedding) * scale,
//   k_out = k / max(|k|, 1e-12),  token_weight = q_hat @ learnable_tokens + learnable_bias.
// q, k: (B, heads, N, d), read in place when stored (B, N, heads, d); query_embedding
// (heads, 1, d); scale (heads, N, 1); learnable_tokens (heads, d, T), T <= 16; learnable_bias
// (heads, 1, T). Returns {q_out, k_out} as (B, heads, N, d) stored (B, N, heads, d), and
// token_weight (B, heads, N, T) contiguous. CPU, fp32 / fp64.
std::vector<at::Tensor> cosine_queries_keys_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& query_embedding,
                                                    const at::Tensor& scale,
                                                    const at::Tensor& learnable_tokens,
                                                    const at::Tensor& learnable_bias);

// Its backward from the output gradients grad_q, grad_k (B, heads, N, d) and grad_token_weight
// (B, heads, N, T): the gradients of q, k (as (B, heads, N, d) stored (B, N, heads, d)),
// query_embedding, scale, learnable_tokens and learnable_bias.
std::vector<at::Tensor> cosine_queries_keys_backward(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_token_weight,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_embedding,
    const at::Tensor& scale, const at::Tensor& learnable_tokens);

std::vector<at::Tensor> cosine_queries_keys_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_token_weight,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_embedding,
    const at::Tensor& scale, const at::Tensor& learnable_tokens);

std::vector<at::Tensor> cosine_queries_keys_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& query_embedding,
                                                        const at::Tensor& scale,
                                                        const at::Tensor& learnable_tokens,
                                                        const at::Tensor& learnable_bias);

}  // namespace transnext_mm
