// Decode-style ("flash-decoding") attention for a handful of query tokens against a
// KV cache, in one launch. Built for the Pi0.5 action-expert step: 10 tokens x 8 query
// heads sharing one KV head (head_dim 256) against ~570 cached keys.
//
// Grid (key split, query-row tile, kv head). The T*G query rows of one KV head (G query
// heads per KV head) are cut in tiles of 8 rows, one row per warp; a block scores its 8
// rows against one block of 32 keys (lane = key), then accumulates P.V with lanes over
// head_dim. Partial (max, sum, unnormalized output) go to the workspace; the last
// block of each (tile, kv head) to finish (an atomic ticket) merges the splits and
// writes the output, then resets its ticket so the next launch (graph replay) starts
// clean. K and V tiles are staged in shared memory as fp32 with rows padded by 4 floats
// (float4 reads by 8 lanes of a phase hit 32 distinct banks); 16-bit V is fetched
// into registers while the scores are computed.
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace flashrt {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerTile = kThreads / 32;  // one query row per warp
constexpr int kKeysPerBlock = 32;            // one key per lane
constexpr int kMaxHeadDim = 256;
constexpr int kPad = 4;
// chunks of 8 elements of one K/V tile each thread moves
constexpr int kTileChunksPerThread = kKeysPerBlock * kMaxHeadDim / kChunk / kThreads;
// float4 groups of one output row per lane
constexpr int kOutGroupsPerLane = kMaxHeadDim / 4 / 32;

struct Layout {
  int64_t rows;    // T * G query rows per kv head
  int64_t tiles;   // ceil(rows / kRowsPerTile)
  int64_t splits;  // ceil(keys / kKeysPerBlock)
  int64_t partial_stride;  // floats per partial row: head_dim outputs, m, l, 2 pad (float4 rows)
};

__host__ __device__ inline Layout make_layout(int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads,
                                              int64_t head_dim, int64_t keys) {
  Layout l;
  l.rows = tokens * (num_q_heads / num_kv_heads);
  l.tiles = (l.rows + kRowsPerTile - 1) / kRowsPerTile;
  l.splits = (keys + kKeysPerBlock - 1) / kKeysPerBlock;
  l.partial_stride = head_dim + 4;
  return l;
}

// Workspace: [kv_heads * tiles] ticket counters (as uint32, padded to 4 floats), then
// partials [kv_heads][tiles][splits][kRowsPerTile][head_dim + 4].
__host__ __device__ inline int64_t ticket_floats(int64_t num_kv_heads, const Layout& l) {
  return ((num_kv_heads * l.tiles + 3) / 4) * 4;
}

// One 8-element chunk of a K/V row kept in its storage type (bf16: 4 registers),
// converted to fp32 only when staged into shared memory.
template <typename T>
struct RawChunk {
  alignas(16) T v[kChunk];
};

template <typename T>
__device__ __forceinline__ void load_raw(const T* p, bool live, bool vec, RawChunk<T>& r) {
  if (live && vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(r.v)[0] = reinterpret_cast<const float4*>(p)[0];
      reinterpret_cast<float4*>(r.v)[1] = reinterpret_cast<const float4*>(p)[1];
    } else {
      *reinterpret_cast<uint4*>(r.v) = *reinterpret_cast<const uint4*>(p);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) r.v[i] = live ? p[i] : from_float<T>(0.f);
  }
}

// Chunk i of this thread in a [kKeysPerBlock, head_dim] tile: key j, offset d0.
__device__ __forceinline__ void tile_chunk(int i, int head_dim, int& j, int& d0) {
  const int chunks_per_key = head_dim / kChunk;
  const int c = threadIdx.x + i * kThreads;
  j = c / chunks_per_key;
  d0 = (c - j * chunks_per_key) * kChunk;
}

template <typename T>
__device__ __forceinline__ void store_raw(T* p, bool vec, const RawChunk<T>& r) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = reinterpret_cast<const float4*>(r.v)[0];
      reinterpret_cast<float4*>(p)[1] = reinterpret_cast<const float4*>(r.v)[1];
    } else {
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(r.v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) p[i] = r.v[i];
  }
}

// Fresh key u (fused-QKV mode): its k chunk at d0, rotated and rounded to T as the
// cache would hold it (the partner chunk is half a row away).
template <typename T>
__device__ __forceinline__ void load_fresh_k(const DecodeAttentionArgs& a, int64_t u, int64_t kvh, int64_t d0,
                                             bool vec, RawChunk<T>& r) {
  const int64_t D = a.head_dim;
  const int64_t half = D / 2;
  const T* row = static_cast<const T*>(a.qkv) + u * (a.num_q_heads + 2 * a.num_kv_heads) * D +
                 (a.num_q_heads + kvh) * D;
  const bool first = d0 < half;
  float x[kChunk];
  float partner[kChunk];
  float c[kChunk];
  float s[kChunk];
  load_chunk(row + d0, kChunk, vec, x);
  load_chunk(row + (first ? d0 + half : d0 - half), kChunk, vec, partner);
  load_rope_angles(a.cos, a.sin, a.positions[u], a.max_pos, half, first ? d0 : d0 - half, kChunk, vec, c, s);
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    r.v[i] = from_float<T>(first ? rope_first(x[i], partner[i], c[i], s[i]) : rope_second(partner[i], x[i], c[i], s[i]));
}

// This thread's chunks of the K (or V) tile of keys key0.. for one kv head, from the
// cache or, for fresh keys in fused-QKV mode, from qkv (then also written to the cache
// by the blocks of query tile 0).
template <typename T>
__device__ __forceinline__ void load_tile(const DecodeAttentionArgs& a, bool is_v, int64_t kvh, int64_t key0,
                                          bool vec, RawChunk<T> (&regs)[kTileChunksPerThread]) {
  const int64_t D = a.head_dim;
  T* cache = static_cast<T*>(const_cast<void*>(is_v ? a.v : a.k));
  const int64_t cache_row_stride = a.num_kv_heads * D;
#pragma unroll
  for (int i = 0; i < kTileChunksPerThread; ++i) {
    int j, d0;
    tile_chunk(i, static_cast<int>(D), j, d0);
    const int64_t key = key0 + j;
    T* cached = cache + key * cache_row_stride + kvh * D + d0;
    if (j >= kKeysPerBlock || key >= a.keys) {
      load_raw(cached, false, vec, regs[i]);  // zeros
    } else if (a.qkv != nullptr && key >= a.fresh_offset) {
      const int64_t u = key - a.fresh_offset;
      if (is_v) {
        const T* row = static_cast<const T*>(a.qkv) + u * (a.num_q_heads + 2 * a.num_kv_heads) * D;
        load_raw(row + (a.num_q_heads + a.num_kv_heads + kvh) * D + d0, true, vec, regs[i]);
      } else {
        load_fresh_k(a, u, kvh, d0, vec, regs[i]);
      }
      if (blockIdx.y == 0) store_raw(cached, vec, regs[i]);
    } else {
      load_raw(cached, true, vec, regs[i]);
    }
  }
}

// q row of this warp into shared memory (fp32, times scale): from q, or in fused-QKV
// mode from qkv, rotated.
template <typename T>
__device__ __forceinline__ void load_q_row(const DecodeAttentionArgs& a, int64_t t, int64_t q_head, bool live,
                                           bool vec, float* q_row) {
  const int64_t D = a.head_dim;
  const int lane = threadIdx.x & 31;
  if (a.qkv == nullptr) {
    for (int64_t c = lane; c < D / kChunk; c += 32) {
      float f[kChunk];
      load_chunk(static_cast<const T*>(a.q) + (t * a.num_q_heads + q_head) * D + c * kChunk, live ? kChunk : 0,
                 vec, f);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) q_row[c * kChunk + i] = f[i] * a.scale;
    }
    return;
  }
  const int64_t half = D / 2;
  const T* row = static_cast<const T*>(a.qkv) + t * (a.num_q_heads + 2 * a.num_kv_heads) * D + q_head * D;
  for (int64_t c = lane; c < half / kChunk; c += 32) {
    float x1[kChunk] = {};
    float x2[kChunk] = {};
    float cs[kChunk] = {};
    float sn[kChunk] = {};
    if (live) {
      load_chunk(row + c * kChunk, kChunk, vec, x1);
      load_chunk(row + half + c * kChunk, kChunk, vec, x2);
      load_rope_angles(a.cos, a.sin, a.positions[t], a.max_pos, half, c * kChunk, kChunk, vec, cs, sn);
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      q_row[c * kChunk + i] = rope_first(x1[i], x2[i], cs[i], sn[i]) * a.scale;
      q_row[half + c * kChunk + i] = rope_second(x1[i], x2[i], cs[i], sn[i]) * a.scale;
    }
  }
}

template <typename T>
__device__ __forceinline__ void stage_tile(float* smem, int64_t head_dim, const RawChunk<T> (&regs)[kTileChunksPerThread]) {
  const int64_t stride = head_dim + kPad;
#pragma unroll
  for (int i = 0; i < kTileChunksPerThread; ++i) {
    int j, d0;
    tile_chunk(i, static_cast<int>(head_dim), j, d0);
    if (j < kKeysPerBlock) {
      float4* dst = reinterpret_cast<float4*>(smem + j * stride + d0);
      const RawChunk<T>& r = regs[i];
      dst[0] = make_float4(to_float(r.v[0]), to_float(r.v[1]), to_float(r.v[2]), to_float(r.v[3]));
      dst[1] = make_float4(to_float(r.v[4]), to_float(r.v[5]), to_float(r.v[6]), to_float(r.v[7]));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_attention_kernel(const DecodeAttentionArgs a, bool vec) {
  extern __shared__ float4 smem4[];
  float* q_s = reinterpret_cast<float*>(smem4);            // [kRowsPerTile][head_dim]
  float* kv_s = q_s + kRowsPerTile * a.head_dim;           // [kKeysPerBlock][head_dim + kPad]
  __shared__ unsigned ticket_s;

  const int64_t D = a.head_dim;
  const int64_t G = a.num_q_heads / a.num_kv_heads;
  const Layout lay = make_layout(a.tokens, a.num_q_heads, a.num_kv_heads, D, a.keys);
  const int64_t split = blockIdx.x;
  const int64_t tile = blockIdx.y;
  const int64_t kvh = blockIdx.z;
  const int64_t key0 = split * kKeysPerBlock;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t row = tile * kRowsPerTile + warp;  // query row within this kv head
  const bool row_live = row < lay.rows;
  const int64_t t = row / G;
  const int64_t q_head = kvh * G + row % G;

  // Issue K and V tile loads first (both in flight), then Q. fp32 tiles would not fit
  // the register budget twice: V is loaded after the scores there.
  constexpr bool kPrefetchV = sizeof(T) < 4;
  RawChunk<T> k_regs[kTileChunksPerThread];
  RawChunk<T> v_regs[kTileChunksPerThread];
  load_tile(a, false, kvh, key0, vec, k_regs);
  if constexpr (kPrefetchV) load_tile(a, true, kvh, key0, vec, v_regs);
  load_q_row<T>(a, t, q_head, row_live, vec, q_s + warp * D);
  stage_tile(kv_s, D, k_regs);
  __syncthreads();

  // Scores: lane j <-> key key0 + j.
  const int64_t key = key0 + lane;
  float score = -INFINITY;
  if (key < a.keys && row_live) {
    const float4* qr = reinterpret_cast<const float4*>(q_s + warp * D);
    const float4* kr = reinterpret_cast<const float4*>(kv_s + lane * (D + kPad));
    float dot = 0.f;
    for (int64_t g = 0; g < D / 4; ++g) {
      const float4 qv = qr[g];
      const float4 kv = kr[g];
      dot += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
    }
    score = dot + (a.bias ? a.bias[t * a.bias_row_stride + key] : 0.f);
  }
  float m = score;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float p = m == -INFINITY ? 0.f : expf(score - m);  // masked block: all zero
  const float l = warp_sum(p);

  if constexpr (!kPrefetchV) load_tile(a, true, kvh, key0, vec, v_regs);
  __syncthreads();  // everyone is done reading K
  stage_tile(kv_s, D, v_regs);
  __syncthreads();

  float acc[kOutGroupsPerLane][4] = {};
#pragma unroll 4
  for (int j = 0; j < kKeysPerBlock; ++j) {
    const float pj = __shfl_sync(0xffffffffu, p, j);
    const float4* vr = reinterpret_cast<const float4*>(kv_s + j * (D + kPad));
#pragma unroll
    for (int i = 0; i < kOutGroupsPerLane; ++i) {
      const int64_t g = lane + 32 * i;
      if (g < D / 4) {
        const float4 vv = vr[g];
        acc[i][0] += pj * vv.x;
        acc[i][1] += pj * vv.y;
        acc[i][2] += pj * vv.z;
        acc[i][3] += pj * vv.w;
      }
    }
  }

  float* workspace = a.workspace;
  unsigned* tickets = reinterpret_cast<unsigned*>(workspace);
  float* partials = workspace + ticket_floats(a.num_kv_heads, lay);
  const int64_t tile_base = ((kvh * lay.tiles + tile) * lay.splits) * kRowsPerTile;
  float* mine = partials + (tile_base + split * kRowsPerTile + warp) * lay.partial_stride;
#pragma unroll
  for (int i = 0; i < kOutGroupsPerLane; ++i) {
    const int64_t g = lane + 32 * i;
    if (g < D / 4) reinterpret_cast<float4*>(mine)[g] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  }
  if (lane == 0) {
    mine[D] = m;
    mine[D + 1] = l;
  }

  // Last block of this (tile, kv head) merges all splits.
  __threadfence();
  __syncthreads();
  unsigned* ticket = tickets + kvh * lay.tiles + tile;
  if (threadIdx.x == 0) ticket_s = atomicAdd(ticket, 1u);
  __syncthreads();
  if (ticket_s != lay.splits - 1) return;
  __threadfence();
  if (threadIdx.x == 0) *ticket = 0u;  // ready for the next launch
  if (!row_live) return;

  float m_max = -INFINITY;
  for (int64_t s = lane; s < lay.splits; s += 32)
    m_max = fmaxf(m_max, __ldcg(partials + (tile_base + s * kRowsPerTile + warp) * lay.partial_stride + D));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, o));

  float out_acc[kOutGroupsPerLane][4] = {};
  float l_total = 0.f;
  for (int64_t s = 0; s < lay.splits; ++s) {
    const float* part = partials + (tile_base + s * kRowsPerTile + warp) * lay.partial_stride;
    const float ms = __ldcg(part + D);
    const float w = ms == -INFINITY ? 0.f : expf(ms - m_max);
    l_total += w * __ldcg(part + D + 1);
#pragma unroll
    for (int i = 0; i < kOutGroupsPerLane; ++i) {
      const int64_t g = lane + 32 * i;
      if (g < D / 4) {
        const float4 o = __ldcg(reinterpret_cast<const float4*>(part) + g);
        out_acc[i][0] += w * o.x;
        out_acc[i][1] += w * o.y;
        out_acc[i][2] += w * o.z;
        out_acc[i][3] += w * o.w;
      }
    }
  }
  // A row whose keys are all masked has l_total = 0 and becomes NaN, as softmax does.
  const float inv_l = 1.f / l_total;
  T* out = static_cast<T*>(a.out) + (t * a.num_q_heads + q_head) * D;
#pragma unroll
  for (int i = 0; i < kOutGroupsPerLane; ++i) {
    const int64_t g = lane + 32 * i;
    if (g < D / 4) {
#pragma unroll
      for (int e = 0; e < 4; ++e) out[g * 4 + e] = from_float<T>(out_acc[i][e] * inv_l);
    }
  }
}

}  // namespace

int64_t decode_attention_workspace_floats(int64_t tokens, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t keys) {
  require(num_kv_heads > 0 && num_q_heads > 0 && num_q_heads % num_kv_heads == 0, "decode_attention",
          "num_q_heads must be a multiple of num_kv_heads");
  const Layout l = make_layout(tokens, num_q_heads, num_kv_heads, head_dim, keys);
  return ticket_floats(num_kv_heads, l) + num_kv_heads * l.tiles * l.splits * kRowsPerTile * l.partial_stride;
}

void decode_attention(const DecodeAttentionArgs& a, void* stream) {
  const bool fused = a.qkv != nullptr;
  const char* name = fused ? "qkv_rope_attention" : "decode_attention";
  require((fused || a.q) && a.k && a.v && a.out && a.workspace, name, "null pointer");
  require(a.head_dim > 0 && a.head_dim % kChunk == 0 && a.head_dim <= kMaxHeadDim, name,
          "head_dim must be a multiple of 8 and at most 256");
  require(a.tokens >= 0 && a.keys > 0, name, "needs at least one key");
  require(a.bias_row_stride >= 0, name, "bias row stride must be >= 0");
  if (fused) {
    require(a.cos && a.sin && a.positions, name, "RoPE tables or positions are null");
    require(a.head_dim % (2 * kChunk) == 0, name, "head_dim must be a multiple of 16");
    require(a.fresh_offset >= 0 && a.fresh_offset + a.tokens == a.keys && a.keys <= a.cache_rows, name,
            "keys must be fresh_offset + tokens and fit the cache");
  }
  const int64_t need =
      decode_attention_workspace_floats(a.tokens, a.num_q_heads, a.num_kv_heads, a.head_dim, a.keys);
  require(a.workspace_floats >= need, name,
          "workspace has " + std::to_string(a.workspace_floats) + " floats, needs " + std::to_string(need));
  if (a.tokens == 0) return;
  const Layout l = make_layout(a.tokens, a.num_q_heads, a.num_kv_heads, a.head_dim, a.keys);
  require(l.tiles <= 65535 && a.num_kv_heads <= 65535, name, "too many query rows or KV heads");
  bool vec = true;
  for (const void* p : {a.q, a.k, a.v, a.qkv, static_cast<const void*>(a.cos), static_cast<const void*>(a.sin)})
    vec = vec && (p == nullptr || aligned16(p));
  const dim3 grid(static_cast<unsigned>(l.splits), static_cast<unsigned>(l.tiles),
                  static_cast<unsigned>(a.num_kv_heads));
  const size_t smem = (kRowsPerTile * a.head_dim + kKeysPerBlock * (a.head_dim + kPad)) * sizeof(float);
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(a.act_dtype, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    decode_attention_kernel<T><<<grid, kThreads, smem, st>>>(a, vec);
  });
  check_launch(name);
}

}  // namespace flashrt
