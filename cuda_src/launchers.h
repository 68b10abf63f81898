// Host-side entry points of the kernels, called by bindings.cpp. Plain C++ types only
// (pointers, sizes, dtype codes, the stream as void*), so the binding file needs no
// CUDA headers. Every launcher validates its arguments (std::invalid_argument), checks
// the launch (std::runtime_error naming the kernel), never synchronizes and never
// allocates: all are legal inside CUDA-graph capture.
#pragma once

#include <cstdint>

namespace flashrt {

// One fused row kernel covers RMSNorm / LayerNorm with the optional stages
//   h = x                          (residual == null)
//   h = residual + x [* gate]      (residual != null; h is written back to residual)
//   y = normalize(h) [* (weight_offset + weight)] [* (1 + mod_scale)] [+ shift]
// normalize = h * rsqrt(mean(h^2) + eps) (RMS) or (h - mean) * rsqrt(var + eps) (layer).
// out == null: residual update only (gated_add). x/residual/out are [rows, D]; weight,
// gate, mod_scale, shift are [D] of `param_dtype`.
struct RowNormArgs {
  const void* x = nullptr;
  void* residual = nullptr;
  const void* gate = nullptr;
  const void* weight = nullptr;
  const void* mod_scale = nullptr;
  const void* shift = nullptr;
  void* out = nullptr;
  const float* out_scale = nullptr;  // device float; required iff out_dtype is FP8
  int64_t rows = 0;
  int64_t dim = 0;
  float eps = 1e-6f;
  float weight_offset = 0.f;
  bool layer_norm = false;
  int act_dtype = 0;
  int param_dtype = 0;
  int out_dtype = 0;
};
void row_norm(const RowNormArgs& a, void* stream);

// out[r, j] = gelu_tanh(in[r, j]) * in[r, F + j] (gated) or gelu_tanh(in[r, j]).
// in is [rows, 2F] (gated) or [rows, F]; out [rows, F] in act dtype or FP8.
void gelu_tanh(const void* in, void* out, const float* out_scale, int64_t rows, int64_t features, bool gated,
               int act_dtype, int out_dtype, void* stream);

// Split of the fused QKV projection with RoPE (rotate-half convention) on q and k:
//   qkv [T, (Hq + 2 Hkv) * Dh]  ->  q_out [T, Hq, Dh] (times q_scale),
//   k_cache/v_cache [S_max, Hkv, Dh] rows cache_offset .. cache_offset + T.
// cos/sin: fp32 [max_pos, Dh/2]; positions: int32 [T]. A position outside
// [0, max_pos) yields NaN for that token's q and k (the kernel cannot raise).
// In-place RoPE of x [T, H, Dh] is the call with qkv = q_out = x, Hkv = 0.
struct RopeArgs {
  const void* qkv = nullptr;
  void* q_out = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int32_t* positions = nullptr;
  int64_t tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_pos = 0;
  int64_t cache_rows = 0;
  int64_t cache_offset = 0;
  float q_scale = 1.f;
  int act_dtype = 0;
};
void qkv_rope_split(const RopeArgs& a, void* stream);

// out = saturate_e4m3(x * (1 / *scale)), flat over n elements.
void quantize_fp8(const void* x, void* out, const float* scale, int64_t n, int act_dtype, void* stream);

// *out = max(|x|) over n elements (NaN propagates); with accumulate, max(*out, ...).
void absmax(const void* x, float* out, int64_t n, bool accumulate, int act_dtype, void* stream);

// x += dt * v in place, flat over n elements; v may have another float dtype.
void euler_step(void* x, const void* v, float dt, int64_t n, int x_dtype, int v_dtype, void* stream);

// uint8 images [V, H, W, C] -> patches [V * (H/p) * (W/p), C * p * p] in (c, kh, kw)
// order, value = x / 255 * 2 - 1 (in double, rounded to fp32), stored in out_dtype.
void images_to_patches(const uint8_t* images, void* out, int64_t views, int64_t height, int64_t width,
                       int64_t channels, int64_t patch, int out_dtype, void* stream);

// Decode-style attention for few queries against a KV cache sharing KV heads (GQA):
//   q [T, Hq, Dh], k/v [S, Hkv, Dh] (rows 0..S-1 of the cache), out [T, Hq, Dh];
//   out = softmax(q k^T * scale + bias) v per head, bias fp32 [T, S] with row stride
//   bias_row_stride (0: one row [S] shared by all queries) or null.
// Work split over key blocks; partial results go to `workspace` (fp32, see
// decode_attention_workspace_floats) and are merged by the last block of each
// (kv head, query tile), so the whole op is one launch.
//
// Fused-QKV mode (qkv != null): the epilogue of the fused QKV projection is folded in,
// i.e. the launch is qkv_rope_split followed by attention over keys 0..S-1 with
// S = fresh_offset + T. q is read from qkv [T, (Hq + 2 Hkv) * Dh] and rotated (kept in
// fp32), keys fresh_offset.. come from qkv too (k rotated, rounded to the cache dtype),
// and those T fresh k / v rows are also written to k/v (the caches) by the blocks of
// query tile 0. `q` is unused; head_dim must be a multiple of 16.
struct DecodeAttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  float* workspace = nullptr;  // zero-filled before first use; every launch leaves its tickets at 0
  int64_t workspace_floats = 0;
  int64_t tokens = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t keys = 0;
  int64_t bias_row_stride = 0;
  float scale = 1.f;
  int act_dtype = 0;
  // fused-QKV mode
  const void* qkv = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int32_t* positions = nullptr;
  int64_t max_pos = 0;
  int64_t fresh_offset = 0;
  int64_t cache_rows = 0;
};
int64_t decode_attention_workspace_floats(int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t keys);
void decode_attention(const DecodeAttentionArgs& a, void* stream);

// Architectures the extension was compiled for (e.g. "90"), as nvcc saw them.
const char* compiled_archs();

}  // namespace flashrt
