// pybind11 module flashrt_core._kernels. Arguments are raw device pointers (Python
// ints, 0 = none), sizes, dtype codes (dtype_codes.h) and the cudaStream_t as an int:
// no torch headers, so one build serves any torch version. Importing the module
// touches no GPU. std::invalid_argument surfaces as ValueError, launch failures as
// RuntimeError naming the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <string>

#include "dtype_codes.h"
#include "expert_bindings.h"
#include "launchers.h"

namespace py = pybind11;
using flashrt::DecodeAttentionArgs;
using flashrt::RopeArgs;
using flashrt::RowNormArgs;

namespace {

constexpr const char* kVersion = "1";

template <typename P = void>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

void* stream_ptr(uintptr_t s) { return reinterpret_cast<void*>(s); }

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "flashrt CUDA kernels (raw-pointer bindings; see flashrt_core.ops for the tensor API)";

  m.def("version", [] { return std::string(kVersion); });
  m.def("compiled_archs", [] { return std::string(flashrt::compiled_archs()); });
  m.def("dtype_codes", [] {
    return std::map<std::string, int>{{"float32", flashrt::kFloat32},     {"bfloat16", flashrt::kBFloat16},
                                      {"float16", flashrt::kFloat16},     {"float8_e4m3fn", flashrt::kFloat8E4M3},
                                      {"uint8", flashrt::kUInt8},         {"int32", flashrt::kInt32}};
  });

  m.def(
      "row_norm",
      [](uintptr_t x, uintptr_t residual, uintptr_t gate, uintptr_t weight, uintptr_t mod_scale, uintptr_t shift,
         uintptr_t out, uintptr_t out_scale, int64_t rows, int64_t dim, double eps, double weight_offset,
         bool layer_norm, int act_dtype, int param_dtype, int out_dtype, uintptr_t stream) {
        RowNormArgs a;
        a.x = ptr(x);
        a.residual = ptr(residual);
        a.gate = ptr(gate);
        a.weight = ptr(weight);
        a.mod_scale = ptr(mod_scale);
        a.shift = ptr(shift);
        a.out = ptr(out);
        a.out_scale = ptr<const float>(out_scale);
        a.rows = rows;
        a.dim = dim;
        a.eps = static_cast<float>(eps);
        a.weight_offset = static_cast<float>(weight_offset);
        a.layer_norm = layer_norm;
        a.act_dtype = act_dtype;
        a.param_dtype = param_dtype;
        a.out_dtype = out_dtype;
        flashrt::row_norm(a, stream_ptr(stream));
      },
      py::kw_only(), py::arg("x"), py::arg("residual"), py::arg("gate"), py::arg("weight"), py::arg("mod_scale"),
      py::arg("shift"), py::arg("out"), py::arg("out_scale"), py::arg("rows"), py::arg("dim"), py::arg("eps"),
      py::arg("weight_offset"), py::arg("layer_norm"), py::arg("act_dtype"), py::arg("param_dtype"),
      py::arg("out_dtype"), py::arg("stream"));

  m.def(
      "gelu_tanh",
      [](uintptr_t in, uintptr_t out, uintptr_t out_scale, int64_t rows, int64_t features, bool gated, int act_dtype,
         int out_dtype, uintptr_t stream) {
        flashrt::gelu_tanh(ptr(in), ptr(out), ptr<const float>(out_scale), rows, features, gated, act_dtype,
                           out_dtype, stream_ptr(stream));
      },
      py::kw_only(), py::arg("inp"), py::arg("out"), py::arg("out_scale"), py::arg("rows"), py::arg("features"),
      py::arg("gated"), py::arg("act_dtype"), py::arg("out_dtype"), py::arg("stream"));

  m.def(
      "qkv_rope_split",
      [](uintptr_t qkv, uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cos, uintptr_t sin,
         uintptr_t positions, int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t max_pos, int64_t cache_rows, int64_t cache_offset, double q_scale, int act_dtype, uintptr_t stream) {
        RopeArgs a;
        a.qkv = ptr(qkv);
        a.q_out = ptr(q_out);
        a.k_cache = ptr(k_cache);
        a.v_cache = ptr(v_cache);
        a.cos = ptr<const float>(cos);
        a.sin = ptr<const float>(sin);
        a.positions = ptr<const int32_t>(positions);
        a.tokens = tokens;
        a.num_q_heads = num_q_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_dim = head_dim;
        a.max_pos = max_pos;
        a.cache_rows = cache_rows;
        a.cache_offset = cache_offset;
        a.q_scale = static_cast<float>(q_scale);
        a.act_dtype = act_dtype;
        flashrt::qkv_rope_split(a, stream_ptr(stream));
      },
      py::kw_only(), py::arg("qkv"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
      py::arg("sin"), py::arg("positions"), py::arg("tokens"), py::arg("num_q_heads"), py::arg("num_kv_heads"),
      py::arg("head_dim"), py::arg("max_pos"), py::arg("cache_rows"), py::arg("cache_offset"), py::arg("q_scale"),
      py::arg("act_dtype"), py::arg("stream"));

  m.def(
      "quantize_fp8",
      [](uintptr_t x, uintptr_t out, uintptr_t scale, int64_t n, int act_dtype, uintptr_t stream) {
        flashrt::quantize_fp8(ptr(x), ptr(out), ptr<const float>(scale), n, act_dtype, stream_ptr(stream));
      },
      py::kw_only(), py::arg("x"), py::arg("out"), py::arg("scale"), py::arg("n"), py::arg("act_dtype"),
      py::arg("stream"));

  m.def(
      "absmax",
      [](uintptr_t x, uintptr_t out, int64_t n, bool accumulate, int act_dtype, uintptr_t stream) {
        flashrt::absmax(ptr(x), ptr<float>(out), n, accumulate, act_dtype, stream_ptr(stream));
      },
      py::kw_only(), py::arg("x"), py::arg("out"), py::arg("n"), py::arg("accumulate"), py::arg("act_dtype"),
      py::arg("stream"));

  m.def(
      "euler_step",
      [](uintptr_t x, uintptr_t v, double dt, int64_t n, int x_dtype, int v_dtype, uintptr_t stream) {
        flashrt::euler_step(ptr(x), ptr(v), static_cast<float>(dt), n, x_dtype, v_dtype, stream_ptr(stream));
      },
      py::kw_only(), py::arg("x"), py::arg("v"), py::arg("dt"), py::arg("n"), py::arg("x_dtype"), py::arg("v_dtype"),
      py::arg("stream"));

  m.def(
      "images_to_patches",
      [](uintptr_t images, uintptr_t out, int64_t views, int64_t height, int64_t width, int64_t channels,
         int64_t patch, int out_dtype, uintptr_t stream) {
        flashrt::images_to_patches(ptr<const uint8_t>(images), ptr(out), views, height, width, channels, patch,
                                   out_dtype, stream_ptr(stream));
      },
      py::kw_only(), py::arg("images"), py::arg("out"), py::arg("views"), py::arg("height"), py::arg("width"),
      py::arg("channels"), py::arg("patch"), py::arg("out_dtype"), py::arg("stream"));

  m.def("decode_attention_workspace_floats", &flashrt::decode_attention_workspace_floats, py::kw_only(),
        py::arg("tokens"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("keys"));

  m.def(
      "decode_attention",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t bias, uintptr_t out, uintptr_t workspace,
         int64_t workspace_floats, int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t keys, int64_t bias_row_stride, double scale, int act_dtype, uintptr_t qkv, uintptr_t cos,
         uintptr_t sin, uintptr_t positions, int64_t max_pos, int64_t fresh_offset, int64_t cache_rows,
         uintptr_t stream) {
        DecodeAttentionArgs a;
        a.q = ptr(q);
        a.k = ptr(k);
        a.v = ptr(v);
        a.bias = ptr<const float>(bias);
        a.out = ptr(out);
        a.workspace = ptr<float>(workspace);
        a.workspace_floats = workspace_floats;
        a.tokens = tokens;
        a.num_q_heads = num_q_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_dim = head_dim;
        a.keys = keys;
        a.bias_row_stride = bias_row_stride;
        a.scale = static_cast<float>(scale);
        a.act_dtype = act_dtype;
        a.qkv = ptr(qkv);
        a.cos = ptr<const float>(cos);
        a.sin = ptr<const float>(sin);
        a.positions = ptr<const int32_t>(positions);
        a.max_pos = max_pos;
        a.fresh_offset = fresh_offset;
        a.cache_rows = cache_rows;
        flashrt::decode_attention(a, stream_ptr(stream));
      },
      "qkv != 0 selects the fused-QKV mode (launchers.h)", py::kw_only(), py::arg("q"),
      py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("out"), py::arg("workspace"), py::arg("workspace_floats"),
      py::arg("tokens"), py::arg("num_q_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("keys"),
      py::arg("bias_row_stride"), py::arg("scale"), py::arg("act_dtype"), py::arg("qkv") = 0, py::arg("cos") = 0,
      py::arg("sin") = 0, py::arg("positions") = 0, py::arg("max_pos") = 0, py::arg("fresh_offset") = 0,
      py::arg("cache_rows") = 0, py::arg("stream"));

  bind_expert_kernels(m);  // small_m_linear, expert_decode_attention (expert_bindings.h)
}
