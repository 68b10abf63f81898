// pybind11 definitions of the action-expert kernels, added to the `_kernels` module by
// bindings.cpp (`bind_expert_kernels(m)`). Same conventions as the other bindings: raw
// device pointers as ints (0 = none), sizes, dtype codes, the cudaStream_t as an int.
// The tensor API is flashrt_core.ops.expert.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "expert_launchers.h"

inline void bind_expert_kernels(pybind11::module_& m) {
  namespace py = pybind11;
  using flashrt::expert::DecodeAttentionArgs;
  using flashrt::expert::SmallMLinearArgs;
  auto ptr = [](uintptr_t p) { return reinterpret_cast<void*>(p); };

  m.def(
      "small_m_linear",
      [ptr](uintptr_t x, int64_t x_row_stride, int x_dtype, uintptr_t w, int w_dtype, uintptr_t w_scale, int64_t m,
            int64_t n, int64_t k, int prologue, uintptr_t norm_weight, uintptr_t norm_shift, double eps,
            int param_dtype, int epilogue, uintptr_t out, int64_t out_row_stride, uintptr_t bias, uintptr_t residual,
            int64_t residual_row_stride, int residual_dtype, uintptr_t gate, uintptr_t q_out, uintptr_t k_cache,
            uintptr_t v_cache, uintptr_t cos, uintptr_t sin, uintptr_t positions, uintptr_t cache_offset,
            int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t max_pos, int64_t cache_rows,
            double q_scale, int split_k, int max_groups, bool pdl, uintptr_t stream) {
        SmallMLinearArgs a;
        a.x = ptr(x);
        a.x_row_stride = x_row_stride;
        a.x_dtype = x_dtype;
        a.w = ptr(w);
        a.w_dtype = w_dtype;
        a.w_scale = static_cast<const float*>(ptr(w_scale));
        a.m = m;
        a.n = n;
        a.k = k;
        a.prologue = prologue;
        a.norm_weight = ptr(norm_weight);
        a.norm_shift = ptr(norm_shift);
        a.eps = static_cast<float>(eps);
        a.param_dtype = param_dtype;
        a.epilogue = epilogue;
        a.out = ptr(out);
        a.out_row_stride = out_row_stride;
        a.bias = ptr(bias);
        a.residual = ptr(residual);
        a.residual_row_stride = residual_row_stride;
        a.residual_dtype = residual_dtype;
        a.gate = ptr(gate);
        a.q_out = ptr(q_out);
        a.k_cache = ptr(k_cache);
        a.v_cache = ptr(v_cache);
        a.cos = static_cast<const float*>(ptr(cos));
        a.sin = static_cast<const float*>(ptr(sin));
        a.positions = static_cast<const int32_t*>(ptr(positions));
        a.cache_offset = static_cast<const int32_t*>(ptr(cache_offset));
        a.num_q_heads = num_q_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_dim = head_dim;
        a.max_pos = max_pos;
        a.cache_rows = cache_rows;
        a.q_scale = static_cast<float>(q_scale);
        a.split_k = split_k;
        a.max_groups = max_groups;
        a.pdl = pdl;
        flashrt::expert::small_m_linear(a, ptr(stream));
      },
      py::kw_only(), py::arg("x"), py::arg("x_row_stride"), py::arg("x_dtype"), py::arg("w"), py::arg("w_dtype"),
      py::arg("w_scale"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("prologue"), py::arg("norm_weight"),
      py::arg("norm_shift"), py::arg("eps"), py::arg("param_dtype"), py::arg("epilogue"), py::arg("out"),
      py::arg("out_row_stride"), py::arg("bias"), py::arg("residual"), py::arg("residual_row_stride"),
      py::arg("residual_dtype"), py::arg("gate"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("cache_offset"), py::arg("num_q_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("max_pos"), py::arg("cache_rows"), py::arg("q_scale"),
      py::arg("split_k"), py::arg("max_groups"), py::arg("pdl"), py::arg("stream"));

  m.def("small_m_linear_supported", &flashrt::expert::small_m_linear_supported, py::kw_only(), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("w_dtype"), py::arg("prologue"));

  m.def(
      "expert_decode_attention",
      [ptr](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t bias, uintptr_t out, int64_t tokens, int64_t num_q_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t keys, int64_t kv_row_stride, int64_t bias_row_stride,
            double scale, int splits, int rows_per_block, bool pdl, int64_t stable_keys, uintptr_t stream) {
        DecodeAttentionArgs a;
        a.q = ptr(q);
        a.k = ptr(k);
        a.v = ptr(v);
        a.bias = static_cast<const float*>(ptr(bias));
        a.out = ptr(out);
        a.tokens = tokens;
        a.num_q_heads = num_q_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_dim = head_dim;
        a.keys = keys;
        a.kv_row_stride = kv_row_stride;
        a.bias_row_stride = bias_row_stride;
        a.scale = static_cast<float>(scale);
        a.splits = splits;
        a.rows_per_block = rows_per_block;
        a.pdl = pdl;
        a.stable_keys = stable_keys;
        flashrt::expert::decode_attention(a, ptr(stream));
      },
      py::kw_only(), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("out"), py::arg("tokens"),
      py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("keys"), py::arg("kv_row_stride"),
      py::arg("bias_row_stride"), py::arg("scale"), py::arg("splits"), py::arg("rows_per_block"), py::arg("pdl"),
      py::arg("stable_keys"), py::arg("stream"));

  m.def(
      "velocity_euler_embed",
      [ptr](uintptr_t res, int64_t res_row_stride, int prologue, uintptr_t norm_weight, uintptr_t norm_shift,
            double eps, uintptr_t w_out, uintptr_t b_out, double dt, uintptr_t x_t, uintptr_t w_in, uintptr_t b_in,
            uintptr_t out, int64_t out_row_stride, int64_t rows, int64_t dim, int64_t actions, bool pdl,
            uintptr_t stream) {
        flashrt::expert::VelocityEulerEmbedArgs a;
        auto f32 = [ptr](uintptr_t p) { return static_cast<const float*>(ptr(p)); };
        a.res = ptr(res);
        a.res_row_stride = res_row_stride;
        a.prologue = prologue;
        a.norm_weight = f32(norm_weight);
        a.norm_shift = f32(norm_shift);
        a.eps = static_cast<float>(eps);
        a.w_out = f32(w_out);
        a.b_out = f32(b_out);
        a.dt = static_cast<float>(dt);
        a.x_t = static_cast<float*>(ptr(x_t));
        a.w_in = f32(w_in);
        a.b_in = f32(b_in);
        a.out = ptr(out);
        a.out_row_stride = out_row_stride;
        a.rows = rows;
        a.dim = dim;
        a.actions = actions;
        a.pdl = pdl;
        flashrt::expert::velocity_euler_embed(a, ptr(stream));
      },
      py::kw_only(), py::arg("res"), py::arg("res_row_stride"), py::arg("prologue"), py::arg("norm_weight"),
      py::arg("norm_shift"), py::arg("eps"), py::arg("w_out"), py::arg("b_out"), py::arg("dt"), py::arg("x_t"),
      py::arg("w_in"), py::arg("b_in"), py::arg("out"), py::arg("out_row_stride"), py::arg("rows"), py::arg("dim"),
      py::arg("actions"), py::arg("pdl"), py::arg("stream"));

  m.def("velocity_euler_embed_supported", &flashrt::expert::velocity_euler_embed_supported, py::kw_only(),
        py::arg("rows"), py::arg("dim"), py::arg("actions"));
}
