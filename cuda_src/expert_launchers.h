// Host entry points of the action-expert kernels (small_m_linear.cu,
// decode_attention.cu). Plain C++ only, so expert_bindings.h can include this without
// CUDA headers. Every launcher validates its arguments (std::invalid_argument), never
// allocates, never synchronizes and is legal inside CUDA-graph capture.
#pragma once

#include <cstdint>

namespace flashrt {
namespace expert {

// y = epilogue(prologue(x) @ W^T * w_scale) for M <= 64 rows, at weight-bandwidth speed.
//
// W [N, K] row-major, bf16 or FP8 E4M3 with a float scale per output row (W8A16: the
// weights are widened to bf16 in registers; x stays bf16). x [M, K] bf16 or fp32 with a
// row stride; the prologue's output is rounded to bf16 before the dot products.
enum Prologue : int {
  kPrologueNone = 0,
  kPrologueRmsNorm = 1,     // x * rsqrt(mean(x^2) + eps) * (1 + norm_weight[k])
  kPrologueAdaRmsNorm = 2,  // x * rsqrt(mean(x^2) + eps) * (1 + norm_weight[k]) + norm_shift[k]
};

enum Epilogue : int {
  kEpilogueStore = 0,          // out[m, n] = acc (+ bias[n]), bf16
  kEpilogueGatedResidual = 1,  // residual[m, n] += gate[n] * acc (gate null: 1), in place
  kEpilogueGeluTanhMul = 2,    // out[m, j] = gelu_tanh(acc[gate_j]) * acc[up_j]; W packed (pack_gate_up)
  kEpilogueQkvRope = 3,        // RoPE'd q -> q_out, RoPE'd k / v -> KV cache; W packed (pack_qkv_rope)
};

struct SmallMLinearArgs {
  const void* x = nullptr;
  int64_t x_row_stride = 0;  // elements
  int x_dtype = 0;           // bf16 or fp32
  const void* w = nullptr;
  int w_dtype = 0;                   // bf16 or FP8 E4M3
  const float* w_scale = nullptr;    // [N]; required iff FP8
  int64_t m = 0, n = 0, k = 0;

  int prologue = kPrologueNone;
  const void* norm_weight = nullptr;  // [K]: RMS weight, or the adaRMS scale
  const void* norm_shift = nullptr;   // [K]: adaRMS shift
  float eps = 1e-6f;
  int param_dtype = 0;  // dtype of norm_weight / norm_shift / bias / gate (fp32 or bf16)

  int epilogue = kEpilogueStore;
  void* out = nullptr;  // bf16; store: [M, N], gelu: [M, N / 2]
  int64_t out_row_stride = 0;
  const void* bias = nullptr;  // store only, [N]
  void* residual = nullptr;    // gated residual: [M, N], bf16 or fp32
  int64_t residual_row_stride = 0;
  int residual_dtype = 0;
  const void* gate = nullptr;  // [N] or null

  // qkv_rope: W rows = Hq q heads, Hkv k heads, Hkv v heads of head_dim rows each,
  // every head in pack_qkv_rope order. q_out [M, Hq, D]; caches [cache_rows, Hkv, D];
  // token m goes to cache row *cache_offset + m (rows outside the cache are skipped).
  // cos / sin fp32 [max_pos, D / 2]; a position outside [0, max_pos) yields NaN.
  void* q_out = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* cache_offset = nullptr;
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0, max_pos = 0, cache_rows = 0;
  float q_scale = 1.f;

  // Launch shape (0 = automatic): blocks splitting K (a thread-block cluster reduces
  // their partial sums through distributed shared memory), and the cap on blocks per
  // split. pdl: programmatic dependent launch; the kernel then reads W and w_scale
  // before the previous kernel in the stream has finished (everything else after).
  int split_k = 0;
  int max_groups = 0;
  bool pdl = false;
};
void small_m_linear(const SmallMLinearArgs& a, void* stream);

// Whether small_m_linear takes this shape with the automatic split (M, N, K divisibility,
// the x tile in shared memory: a norm prologue keeps all of K in one block).
bool small_m_linear_supported(int64_t m, int64_t n, int64_t k, int w_dtype, int prologue);

// out[M, Hq, D] = softmax(q k^T * scale + bias) v, q [M, Hq, D] bf16, k / v rows
// [keys, Hkv, D] bf16 with `kv_row_stride` elements between keys; bias fp32 [keys]
// (bias_row_stride 0) or [M, bias_row_stride] rows, or null. A query row whose keys are
// all masked (-inf) gets zeros. All query rows of one KV head see each K/V tile once;
// keys are split over a cluster of blocks whose partial results are merged through
// distributed shared memory: one launch, no workspace.
struct DecodeAttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  int64_t tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, keys = 0;
  int64_t kv_row_stride = 0;
  int64_t bias_row_stride = 0;
  float scale = 1.f;
  int splits = 0;         // key splits (cluster size); 0 = automatic
  int rows_per_block = 0;  // 16, 32 or 64 query rows per block; 0 = automatic
  bool pdl = false;
  // Keys [0, stable_keys) of k / v and the bias are written by no kernel that may still
  // be running (under PDL, the previous kernels in the stream): they are read before
  // waiting for the previous kernel.
  int64_t stable_keys = 0;
};
void decode_attention(const DecodeAttentionArgs& a, void* stream);

// The flow-matching step outside the expert layers, one launch (velocity_euler_embed.cu):
//   x_t[H, A] += dt * (round_bf16(norm(res)) @ w_out^T + b_out)      (when res is given)
//   out[H, D]  = round_bf16(x_t @ w_in^T + b_in)                     (when w_in is given)
// res / out bf16 rows with their strides, everything else fp32 and contiguous; norm is
// RMS (1 + norm_weight) or adaRMS (1 + norm_weight, + norm_shift). H <= 64, D % 128 == 0
// and <= 1024, A % 4 == 0 and <= 32; res and out may be the same rows (res is read
// before out is written). With pdl only res and x_t are read after the PDL wait.
struct VelocityEulerEmbedArgs {
  const void* res = nullptr;
  int64_t res_row_stride = 0;
  int prologue = kPrologueRmsNorm;
  const float* norm_weight = nullptr;
  const float* norm_shift = nullptr;
  float eps = 1e-6f;
  const float* w_out = nullptr;
  const float* b_out = nullptr;
  float dt = 0.f;
  float* x_t = nullptr;
  const float* w_in = nullptr;
  const float* b_in = nullptr;
  void* out = nullptr;
  int64_t out_row_stride = 0;
  int64_t rows = 0, dim = 0, actions = 0;
  bool pdl = false;
};
void velocity_euler_embed(const VelocityEulerEmbedArgs& a, void* stream);
bool velocity_euler_embed_supported(int64_t rows, int64_t dim, int64_t actions);

}  // namespace expert
}  // namespace flashrt
