// Host entry points of the action-expert kernels (small_m_linear.cu,
// decode_attention.cu, expert_layer.cu). Plain C++ only, so expert_bindings.h can
// include this without CUDA headers. Every launcher validates its arguments (std::invalid_argument), never
// allocates, never synchronizes and is legal inside CUDA-graph capture.
#pragma once

#include <cstdint>
#include <string>

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

// Whole action-expert layers in one persistent launch (M <= 16 tokens, Pi0 / Pi0.5
// expert shapes: width 1024, head_dim 256). Per layer, with grid-wide barriers between:
//   res -> norm_in -> packed QKV (pack_qkv_rope) -> RoPE -> q (workspace), k / v -> cache
//   attention of q over cache rows [0, keys) (key_bias [keys] fp32, attn_scale)
//   res += gate_in * (attn @ o^T)
//   res -> norm_post -> packed gate|up (pack_gate_up) -> gelu_tanh(gate) * up (workspace)
//   res += gate_post * (h @ down^T)
// the same bf16 rounding points as the five small_m_linear / decode_attention calls. A
// producer warp per block streams every weight tile of the block (all layers, in
// order) into a shared-memory ring with bulk copies, independently of the barriers.
struct ExpertLayerPointers {
  const void* qkv = nullptr;      // bf16 [(Hq + 2 Hkv) * D, hidden], pack_qkv_rope order
  const void* o = nullptr;        // bf16 [hidden, Hq * D]
  const void* gate_up = nullptr;  // bf16 [2 F, hidden], pack_gate_up order
  const void* down = nullptr;     // bf16 [hidden, F]
  const float* norm_in_weight = nullptr;   // RMS weight or adaRMS scale [hidden]
  const float* norm_in_shift = nullptr;    // adaRMS shift [hidden]; null for RMS
  const float* gate_in = nullptr;          // [hidden] or null (1)
  const float* norm_post_weight = nullptr;
  const float* norm_post_shift = nullptr;
  const float* gate_post = nullptr;
  void* k_cache = nullptr;  // bf16 [cache_rows, Hkv, D]
  void* v_cache = nullptr;
};

struct ExpertLayerArgs {
  void* res = nullptr;  // bf16 [M, hidden], updated in place
  int64_t m = 0;
  const ExpertLayerPointers* layers = nullptr;
  int num_layers = 0;
  int64_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0, hidden = 0, mlp = 0;
  int norm = kPrologueRmsNorm;  // kPrologueRmsNorm or kPrologueAdaRmsNorm (every norm)
  float eps = 1e-6f;
  const float* cos = nullptr;  // fp32 [max_pos, D / 2]
  const float* sin = nullptr;
  int64_t max_pos = 0;
  const int32_t* positions = nullptr;     // [M]
  const int32_t* cache_offset = nullptr;  // [1]: cache row of token 0
  int64_t cache_rows = 0;
  const float* key_bias = nullptr;  // [keys]: 0 or a large negative number
  int64_t keys = 0;
  float q_scale = 1.f, attn_scale = 1.f;
  void* workspace = nullptr;  // expert_layer_workspace_bytes, zeroed once before first use
  int64_t workspace_bytes = 0;
  bool stop_after_kv = false;  // the last layer stops after writing its K / V (Pi0 state pass)
  // Launch shape (0 = automatic): ring slots (weight tiles buffered per block), tiles in
  // flight per block, keys per attention work unit (multiple of 32), blocks.
  int ring_slots = 0, in_flight = 0, attn_chunk = 0, grid = 0;
  bool pdl = false;
  bool cooperative = true;
  // Threads merging one attention output quad (1, 2, 4 or 8; 0 = 4): more lanes, fewer
  // dependent L2 round trips; the merge order (the last bits) depends on it.
  int merge_lanes = 0;
  // Grid barrier and split-K counters behind full __threadfence()s (else release /
  // acquire atomics and loads: the same order, fewer waits). Bit-identical either way.
  bool sc_fences = false;
  // Norm vectors, gates and key bias of every layer into L2 at the start (evict-last), K /
  // V a layer ahead (else K / V at the layer's start only). Bit-identical either way.
  bool prefetch = true;
  // Profiling: when set, thread 0 of each block stores clock64 at each phase boundary, the
  // cycles spent waiting for weights per phase, and clock64 when each GEMV phase had x
  // staged and had consumed its items ([grid][layers][24] int64).
  long long* trace = nullptr;
  int64_t trace_len = 0;
};
void expert_layer(const ExpertLayerArgs& a, void* stream);

// Bytes of the workspace for these shapes: sync counters, q, attention output, MLP
// activations, split-K and attention partials.
int64_t expert_layer_workspace_bytes(int64_t m, int64_t keys, int64_t num_q_heads, int64_t num_kv_heads,
                                     int64_t head_dim, int64_t hidden, int64_t mlp);

// Empty when expert_layer takes these shapes on the current device, else why not.
std::string expert_layer_unsupported(int64_t m, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t hidden, int64_t mlp, int num_layers);

}  // namespace expert
}  // namespace flashrt
