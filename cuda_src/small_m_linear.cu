// small_m_linear: y = epilogue(prologue(x) @ W^T) for M <= 64 rows, built to stream W
// at memory bandwidth (the Pi0.5 action expert runs its GEMMs on 10 or 50 tokens).
//
// Work split. W is cut in tiles of 16 rows (output columns). A block owns one tile at a
// time and its 8 warps split that tile's K range; `split` blocks of a thread-block
// cluster split K further (N = 1024 alone does not fill 132 SMs) and add their partial
// sums through distributed shared memory, in rank order (deterministic). Blocks loop
// over tiles (grid sized to what is resident), so x is staged once per block.
//
// Tensor cores with W as the A operand: mma.m16n8k16 takes 16 W rows x 16 k and x^T
// (16 k x 8 tokens). The order of k inside a dot product is free, so each lane loads 16
// contiguous bytes of W rows g and g + 8 (g = lane / 4) at k offset 8 * (lane % 4) of a
// 32-wide chunk, and reads the matching 16 bytes of x from shared memory: both MMA
// fragments come from plain 16-byte loads, no shuffles. The accumulator then holds, per
// lane, rows g and g + 8 of the tile for two tokens: the epilogues that pair two rows
// (gate/up for GeGLU, d/d + D/2 for RoPE) get both in one thread when W is packed so
// that the pair sits 8 rows apart (pack_gate_up / pack_qkv_rope in flashrt_core.ops.expert).
//
// FP8 weights (W8A16): a 16-byte load holds 16 k of one row; it is widened to bf16 in
// registers (exact) and the per-row scale is applied to the fp32 sum in the epilogue.
//
// Pipeline: each lane keeps two stages of 4 chunks (8 x 16 B of W) in registers; the
// first two are issued before waiting on the previous kernel (PDL), so the weight
// stream starts while that kernel drains. After the wait, x (bf16) and the norm vectors
// arrive in one cp.async wave; the prologue (row RMS over the full K, norm, modulation,
// rounding to bf16) then runs in shared memory, once per block. Every memory round trip
// after the wait is on the critical path of a ~3 us kernel, so they are batched: one for
// x, one for the epilogue's loads (issued before its stores), RoPE positions read with x.
// Prologue and residual dtype are switches in that once-per-block / once-per-tile code;
// the per-chunk loop is specialised at compile time (weight format, token tiles,
// epilogue).
#include <cooperative_groups.h>

#include <cmath>

#include "expert_common.cuh"
#include "expert_launchers.h"

namespace flashrt {
namespace expert {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunksPerStage = 4;  // 16-byte loads per W row per lane in one stage
constexpr int kChunkBytes = 64;     // bytes of one W row per chunk: 4 lanes x 16 B
constexpr int kTileRows = 16;
constexpr int kMaxM = 64;
constexpr int kMaxSplit = 8;  // portable cluster size

struct LinearParams {
  const void* x;
  int64_t x_row_stride;
  int x_dtype;
  const uint8_t* w;
  int64_t w_row_bytes;
  const float* w_scale;
  int m, n, k;
  int split;        // blocks (cluster ranks) splitting K
  int k_block;      // K per block
  int k_warp;       // K per warp
  int warp_chunks;  // chunks per warp and tile
  int tiles;
  int xs_stride;  // bytes per staged x row

  int prologue;
  const void* norm_weight;
  const void* norm_shift;
  float eps;
  int param_dtype;

  void* out;
  int64_t out_row_stride;
  const void* bias;
  void* residual;
  int64_t residual_row_stride;
  int residual_dtype;
  const void* gate;

  void* q_out;
  void* k_cache;
  void* v_cache;
  const float* cos;
  const float* sin;
  const int32_t* positions;
  const int32_t* cache_offset;
  int num_q_heads, num_kv_heads, head_dim, max_pos;
  int64_t cache_rows;
  float q_scale;
};

template <bool kFp8>
struct Stage {
  uint4 w[kChunksPerStage][2];  // [chunk][row g, row g + 8]
};

__device__ __forceinline__ float load_param(const void* p, int dtype, int64_t i) {
  return dtype == kBFloat16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
                            : static_cast<const float*>(p)[i];
}

// Issues the loads of one stage: chunks [first, first + 4) of this warp's K range, for
// rows g and g + 8 of the tile whose row g starts at `w_lane`.
template <bool kFp8>
__device__ __forceinline__ void load_stage(Stage<kFp8>& st, const uint8_t* w_lane, int64_t row_bytes, int first,
                                           int chunks) {
#pragma unroll
  for (int i = 0; i < kChunksPerStage; ++i) {
    if (first + i < chunks) {
      const uint8_t* p = w_lane + (first + i) * kChunkBytes;
      st.w[i][0] = load_stream16(p);
      st.w[i][1] = load_stream16(p + 8 * row_bytes);
    }
  }
}

// acc[j] += W chunk x x^T for token tile j. `xs_lane` points at this lane's x bytes of
// chunk 0 in staged row g.
template <bool kFp8, int kMT>
__device__ __forceinline__ void mma_stage(float (&acc)[kMT][4], const Stage<kFp8>& st, const uint8_t* xs_lane,
                                          int xs_stride, int first, int chunks) {
#pragma unroll
  for (int i = 0; i < kChunksPerStage; ++i) {
    if (first + i >= chunks) continue;
    const uint4 r0 = st.w[i][0];
    const uint4 r1 = st.w[i][1];
    if constexpr (!kFp8) {
      // 32 k per chunk: lane holds k [8c, 8c + 8) of rows g, g + 8 and of token rows.
      const uint8_t* xc = xs_lane + (first + i) * 64;
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        const uint4 xv = load_shared16(xc + j * 8 * xs_stride);
        mma_bf16_16x8x16(acc[j], r0.x, r1.x, r0.y, r1.y, xv.x, xv.y);
        mma_bf16_16x8x16(acc[j], r0.z, r1.z, r0.w, r1.w, xv.z, xv.w);
      }
    } else {
      // 64 k per chunk: lane holds k [16c, 16c + 16): four MMAs of 4 k each.
      uint32_t a[4][2], b[4][2];  // [word][lo, hi] for rows g (a) and g + 8 (b)
      e4m3x4_to_bf16x4(r0.x, a[0][0], a[0][1]);
      e4m3x4_to_bf16x4(r0.y, a[1][0], a[1][1]);
      e4m3x4_to_bf16x4(r0.z, a[2][0], a[2][1]);
      e4m3x4_to_bf16x4(r0.w, a[3][0], a[3][1]);
      e4m3x4_to_bf16x4(r1.x, b[0][0], b[0][1]);
      e4m3x4_to_bf16x4(r1.y, b[1][0], b[1][1]);
      e4m3x4_to_bf16x4(r1.z, b[2][0], b[2][1]);
      e4m3x4_to_bf16x4(r1.w, b[3][0], b[3][1]);
      const uint8_t* xc = xs_lane + (first + i) * 128;
#pragma unroll
      for (int j = 0; j < kMT; ++j) {
        const uint4 x0 = load_shared16(xc + j * 8 * xs_stride);
        const uint4 x1 = load_shared16(xc + j * 8 * xs_stride + 16);
        mma_bf16_16x8x16(acc[j], a[0][0], b[0][0], a[0][1], b[0][1], x0.x, x0.y);
        mma_bf16_16x8x16(acc[j], a[1][0], b[1][0], a[1][1], b[1][1], x0.z, x0.w);
        mma_bf16_16x8x16(acc[j], a[2][0], b[2][0], a[2][1], b[2][1], x1.x, x1.y);
        mma_bf16_16x8x16(acc[j], a[3][0], b[3][0], a[3][1], b[3][1], x1.z, x1.w);
      }
    }
  }
}

// y = x * rms * (1 + w) [+ shift] on 8 consecutive features starting at `k` of the
// shared-memory norm vectors (weight, then shift, each K of param dtype).
__device__ __forceinline__ void apply_norm(const LinearParams& p, const uint8_t* norm_s, int64_t k, float rms,
                                           float (&f)[kChunk]) {
  const int elem = p.param_dtype == kBFloat16 ? 2 : 4;
  float w[kChunk];
  load_chunk_dyn(norm_s + k * elem, p.param_dtype, kChunk, true, w);
#pragma unroll
  for (int e = 0; e < kChunk; ++e) f[e] = f[e] * rms * (1.f + w[e]);
  if (p.prologue == kPrologueAdaRmsNorm) {
    float sh[kChunk];
    load_chunk_dyn(norm_s + (p.k + k) * elem, p.param_dtype, kChunk, true, sh);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) f[e] += sh[e];
  }
}

// Batches of loads issued together, so staging costs a few memory round trips, not one
// per chunk (the fp32 path; bf16 x goes through cp.async).
constexpr int kLoadBatch = 4;

// fp32 x: per-row RMS over all of K, then rows [0, 8 * kMT) of the block's K range
// normalized, rounded to bf16 and stored; rows >= M are zeros.
template <int kMT>
__device__ void stage_x_fp32(const LinearParams& p, uint8_t* xs, float* row_rms, const uint8_t* norm_s,
                             int64_t k_begin) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const auto* x = static_cast<const float*>(p.x);
  if (p.prologue != kPrologueNone) {
    for (int r = warp; r < p.m; r += kWarps) {
      float ss = 0.f;
      for (int64_t base = 0; base < p.k; base += 32 * kChunk * kLoadBatch) {
        float f[kLoadBatch][kChunk];
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b) {
          const int64_t kk = base + (b * 32 + lane) * kChunk;
          load_chunk(x + r * p.x_row_stride + kk, kk < p.k ? kChunk : 0, true, f[b]);
        }
#pragma unroll
        for (int b = 0; b < kLoadBatch; ++b)
#pragma unroll
          for (int e = 0; e < kChunk; ++e) ss += f[b][e] * f[b][e];
      }
      ss = warp_sum(ss);
      if (lane == 0) row_rms[r] = rsqrtf(ss / static_cast<float>(p.k) + p.eps);
    }
    __syncthreads();
  }
  const int pieces = p.k_block / kChunk;
  const int total = 8 * kMT * pieces;
  for (int base = threadIdx.x; base < total; base += kThreads * kLoadBatch) {
    float f[kLoadBatch][kChunk];
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int i = base + b * kThreads;
      const int r = i / pieces;
      const bool valid = i < total && r < p.m;
      load_chunk(x + r * p.x_row_stride + k_begin + (i % pieces) * kChunk, valid ? kChunk : 0, true, f[b]);
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int i = base + b * kThreads;
      if (i >= total) continue;
      const int r = i / pieces;
      const int64_t kk = static_cast<int64_t>(i % pieces) * kChunk;
      if (r < p.m && p.prologue != kPrologueNone) apply_norm(p, norm_s, k_begin + kk, row_rms[r], f[b]);
      store_chunk(reinterpret_cast<__nv_bfloat16*>(xs + r * p.xs_stride) + kk, kChunk, true, f[b]);
    }
  }
  __syncthreads();
}

// Stages rows [0, 8 * kMT) of x's K range [k_begin, k_begin + k_block) as bf16 in shared
// memory, prologue applied; rows >= M are zeros. bf16 x: one cp.async wave (x rows and
// norm vectors), then the RMS and the norm in shared memory (a prologue implies split 1,
// so the block holds whole rows).
template <int kMT>
__device__ void stage_x(const LinearParams& p, uint8_t* xs, float* row_rms, uint8_t* norm_s, int64_t k_begin) {
  const int elem = p.param_dtype == kBFloat16 ? 2 : 4;
  const int norm_pieces = p.prologue == kPrologueNone ? 0 : static_cast<int>(p.k * elem / 16);
  for (int i = threadIdx.x; i < norm_pieces; i += kThreads) {
    copy_async16(norm_s + i * 16, static_cast<const uint8_t*>(p.norm_weight) + i * 16, 16);
    if (p.prologue == kPrologueAdaRmsNorm)
      copy_async16(norm_s + p.k * elem + i * 16, static_cast<const uint8_t*>(p.norm_shift) + i * 16, 16);
  }
  if (p.x_dtype != kBFloat16) {
    copy_async_commit();
    copy_async_wait<0>();
    __syncthreads();
    stage_x_fp32<kMT>(p, xs, row_rms, norm_s, k_begin);
    return;
  }
  const auto* x = static_cast<const __nv_bfloat16*>(p.x);
  const int pieces = p.k_block / kChunk;
  for (int i = threadIdx.x; i < 8 * kMT * pieces; i += kThreads) {
    const int r = i / pieces;
    const bool valid = r < p.m;
    const __nv_bfloat16* src = valid ? x + r * p.x_row_stride + k_begin + (i % pieces) * kChunk : x;
    copy_async16(xs + r * p.xs_stride + (i % pieces) * 16, src, valid ? 16 : 0);
  }
  copy_async_commit();
  copy_async_wait<0>();
  __syncthreads();
  if (p.prologue == kPrologueNone) return;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int r = warp; r < p.m; r += kWarps) {
    float ss = 0.f;
    for (int q = lane; q < pieces; q += 32) {
      float f[kChunk];
      load_chunk(reinterpret_cast<const __nv_bfloat16*>(xs + r * p.xs_stride) + q * kChunk, kChunk, true, f);
#pragma unroll
      for (int e = 0; e < kChunk; ++e) ss += f[e] * f[e];
    }
    ss = warp_sum(ss);
    if (lane == 0) row_rms[r] = rsqrtf(ss / static_cast<float>(p.k) + p.eps);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.m * pieces; i += kThreads) {
    const int r = i / pieces;
    const int q = i % pieces;
    auto* chunk = reinterpret_cast<__nv_bfloat16*>(xs + r * p.xs_stride) + q * kChunk;
    float f[kChunk];
    load_chunk(chunk, kChunk, true, f);
    apply_norm(p, norm_s, static_cast<int64_t>(q) * kChunk, row_rms[r], f);
    store_chunk(chunk, kChunk, true, f);
  }
  __syncthreads();
}

__device__ __forceinline__ void store_bf16(void* base, int64_t i, float v) {
  static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
}

// Per-thread values of the QKV epilogue that do not depend on the tile, read right
// after the dependency wait so they are in registers by the epilogue.
struct RopeTokens {
  int pos[2] = {0, 0};
  int cache_offset = 0;
};

template <int kEpi>
__device__ __forceinline__ RopeTokens prefetch_rope(const LinearParams& p, int item) {
  RopeTokens r;
  if constexpr (kEpi == kEpilogueQkvRope) {
    const int t0 = 8 * (item >> 5) + 2 * (item & 3);
    r.cache_offset = *p.cache_offset;
#pragma unroll
    for (int u = 0; u < 2; ++u) r.pos[u] = t0 + u < p.m ? p.positions[t0 + u] : 0;
  }
  return r;
}

// Accumulator item (token tile j, lane l) of `tile`: v = rows na = 16 tile + g and
// nb = na + 8, tokens t0 = 8j + 2c (v.x, v.z) and t0 + 1 (v.y, v.w). Every load of the
// epilogue is issued before the first store (stores may alias loads for the compiler,
// which would otherwise serialize one memory round trip per token).
template <bool kFp8, int kEpi>
__device__ __forceinline__ void finish_item(const LinearParams& p, int tile, int item, float4 v,
                                            const RopeTokens& rope) {
  const int j = item >> 5;
  const int g = (item & 31) >> 2;
  const int c = item & 3;
  const int na = tile * kTileRows + g;
  const int nb = na + 8;
  const int t0 = 8 * j + 2 * c;
  const bool has[2] = {t0 < p.m, t0 + 1 < p.m};
  float a[2] = {v.x, v.y};  // row na, tokens t0, t0 + 1
  float b[2] = {v.z, v.w};  // row nb
  if constexpr (kFp8) {
    const float sa = p.w_scale[na];
    const float sb = p.w_scale[nb];
    a[0] *= sa;
    a[1] *= sa;
    b[0] *= sb;
    b[1] *= sb;
  }
  if constexpr (kEpi == kEpilogueStore) {
    float ba = 0.f, bb = 0.f;
    if (p.bias != nullptr) {
      ba = load_param(p.bias, p.param_dtype, na);
      bb = load_param(p.bias, p.param_dtype, nb);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!has[u]) continue;
      store_bf16(p.out, (t0 + u) * p.out_row_stride + na, a[u] + ba);
      store_bf16(p.out, (t0 + u) * p.out_row_stride + nb, b[u] + bb);
    }
  } else if constexpr (kEpi == kEpilogueGatedResidual) {
    float ga = 1.f, gb = 1.f;
    if (p.gate != nullptr) {
      ga = load_param(p.gate, p.param_dtype, na);
      gb = load_param(p.gate, p.param_dtype, nb);
    }
    float ra[2] = {0.f, 0.f}, rb[2] = {0.f, 0.f};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!has[u]) continue;
      const int64_t row = (t0 + u) * p.residual_row_stride;
      ra[u] = load_param(p.residual, p.residual_dtype, row + na);
      rb[u] = load_param(p.residual, p.residual_dtype, row + nb);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!has[u]) continue;
      const int64_t row = (t0 + u) * p.residual_row_stride;
      const float ya = ra[u] + ga * a[u];
      const float yb = rb[u] + gb * b[u];
      if (p.residual_dtype == kBFloat16) {
        store_bf16(p.residual, row + na, ya);
        store_bf16(p.residual, row + nb, yb);
      } else {
        static_cast<float*>(p.residual)[row + na] = ya;
        static_cast<float*>(p.residual)[row + nb] = yb;
      }
    }
  } else if constexpr (kEpi == kEpilogueGeluTanhMul) {
#pragma unroll
    for (int u = 0; u < 2; ++u)
      if (has[u]) store_bf16(p.out, (t0 + u) * p.out_row_stride + tile * 8 + g, gelu_tanh(a[u]) * b[u]);
  } else {  // kEpilogueQkvRope: na, nb are dims d and d + D/2 of one head
    const int tiles_per_head = p.head_dim / kTileRows;
    const int head = tile / tiles_per_head;
    const int d = (tile % tiles_per_head) * 8 + g;
    const int half = p.head_dim / 2;
    const bool rotate = head < p.num_q_heads + p.num_kv_heads;
    if (rotate) {
      float cs[2], sn[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int pos = rope.pos[u];
        const bool ok = has[u] && pos >= 0 && pos < p.max_pos;
        cs[u] = ok ? p.cos[static_cast<int64_t>(pos) * half + d] : NAN;
        sn[u] = ok ? p.sin[static_cast<int64_t>(pos) * half + d] : NAN;
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const float ra = a[u] * cs[u] - b[u] * sn[u];
        const float rb = b[u] * cs[u] + a[u] * sn[u];
        a[u] = ra;
        b[u] = rb;
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      if (!has[u]) continue;
      if (head < p.num_q_heads) {
        const int64_t base = (static_cast<int64_t>(t0 + u) * p.num_q_heads + head) * p.head_dim;
        store_bf16(p.q_out, base + d, a[u] * p.q_scale);
        store_bf16(p.q_out, base + d + half, b[u] * p.q_scale);
        continue;
      }
      const int64_t row = static_cast<int64_t>(rope.cache_offset) + t0 + u;
      if (row < 0 || row >= p.cache_rows) continue;
      const int kv_head = head - p.num_q_heads - (rotate ? 0 : p.num_kv_heads);
      const int64_t base = (row * p.num_kv_heads + kv_head) * p.head_dim;
      void* cache = rotate ? p.k_cache : p.v_cache;
      store_bf16(cache, base + d, a[u]);
      store_bf16(cache, base + d + half, b[u]);
    }
  }
}

// Sums the warps' partial tiles (and the cluster's blocks'), then runs the epilogue.
// Every thread of the block (of the cluster) calls it for the same tile.
template <bool kFp8, int kMT, int kEpi>
__device__ void finish_tile(const LinearParams& p, int tile, float (&acc)[kMT][4], float4* red, float4* part,
                            const RopeTokens& rope) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kMT; ++j) {
    red[(warp * kMT + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  }
  __syncthreads();
  constexpr int kItems = kMT * 32;
  const int item = threadIdx.x;
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  if (item < kItems) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 r = red[w * kItems + item];
      v.x += r.x;
      v.y += r.y;
      v.z += r.z;
      v.w += r.w;
    }
  }
  if (p.split == 1) {
    if (item < kItems) finish_item<kFp8, kEpi>(p, tile, item, v, rope);
    __syncthreads();  // red is rewritten by the next tile
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  if (item < kItems) part[item] = v;
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  if (item < kItems && item % p.split == rank) {
    // Remote loads four at a time (in flight together; registers are scarce here, the
    // next tile's weights are arriving), summed in rank order: the same sum whichever
    // block adds.
    constexpr int kBatch = 4;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int base = 0; base < p.split; base += kBatch) {
      float4 o[kBatch];
#pragma unroll
      for (int r = 0; r < kBatch; ++r)
        if (base + r < p.split) o[r] = cluster.map_shared_rank(part, base + r)[item];
#pragma unroll
      for (int r = 0; r < kBatch; ++r) {
        if (base + r >= p.split) break;
        s.x += o[r].x;
        s.y += o[r].y;
        s.z += o[r].z;
        s.w += o[r].w;
      }
    }
    finish_item<kFp8, kEpi>(p, tile, item, s, rope);
  }
  cluster.sync();  // peers read `part` until here; red / part are rewritten next tile
#endif
}

template <bool kFp8, int kMT, int kEpi>
__global__ void __launch_bounds__(kThreads, 2) small_m_linear_kernel(const __grid_constant__ LinearParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* xs = smem;
  float4* red = reinterpret_cast<float4*>(smem + 8 * kMT * p.xs_stride);
  float4* part = red + kWarps * kMT * 32;
  float* row_rms = reinterpret_cast<float*>(part + kMT * 32);
  uint8_t* norm_s = reinterpret_cast<uint8_t*>(row_rms + kMaxM);  // norm weight | shift

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int rank = static_cast<int>(blockIdx.x) % p.split;
  const int group = static_cast<int>(blockIdx.x) / p.split;
  const int groups = static_cast<int>(gridDim.x) / p.split;
  const int chunks = p.warp_chunks;
  const int stages_per_tile = (chunks + kChunksPerStage - 1) / kChunksPerStage;
  const int my_tiles = group < p.tiles ? (p.tiles - 1 - group) / groups + 1 : 0;
  const int total = my_tiles * stages_per_tile;

  const int64_t k_block_begin = static_cast<int64_t>(rank) * p.k_block;
  const int64_t k_warp_begin = k_block_begin + static_cast<int64_t>(warp) * p.k_warp;
  const uint8_t* w_lane = p.w + g * p.w_row_bytes + k_warp_begin * (kFp8 ? 1 : 2) + c * 16;
  // this lane's x bytes (chunk 0, token row g) in the staged block range
  const uint8_t* xs_lane = xs + g * p.xs_stride + (k_warp_begin - k_block_begin) * 2 + c * (kFp8 ? 32 : 16);

  auto stage_tile = [&](int s) { return group + (s / stages_per_tile) * groups; };
  auto stage_first = [&](int s) { return (s % stages_per_tile) * kChunksPerStage; };
  auto stage_w = [&](int s) { return w_lane + static_cast<int64_t>(stage_tile(s)) * kTileRows * p.w_row_bytes; };

  allow_consumer_launch();
  Stage<kFp8> sa, sb;
  if (total > 0) load_stage(sa, stage_w(0), p.w_row_bytes, stage_first(0), chunks);
  if (total > 1) load_stage(sb, stage_w(1), p.w_row_bytes, stage_first(1), chunks);
  wait_for_producer();
  const RopeTokens rope = prefetch_rope<kEpi>(p, threadIdx.x < kMT * 32 ? threadIdx.x : 0);
  stage_x<kMT>(p, xs, row_rms, norm_s, k_block_begin);

  float acc[kMT][4] = {};
  for (int s = 0; s < total; s += 2) {
    mma_stage<kFp8, kMT>(acc, sa, xs_lane, p.xs_stride, stage_first(s), chunks);
    if (s + 2 < total) load_stage(sa, stage_w(s + 2), p.w_row_bytes, stage_first(s + 2), chunks);
    if ((s + 1) % stages_per_tile == 0) finish_tile<kFp8, kMT, kEpi>(p, stage_tile(s), acc, red, part, rope);
    if (s + 1 < total) {
      mma_stage<kFp8, kMT>(acc, sb, xs_lane, p.xs_stride, stage_first(s + 1), chunks);
      if (s + 3 < total) load_stage(sb, stage_w(s + 3), p.w_row_bytes, stage_first(s + 3), chunks);
      if ((s + 2) % stages_per_tile == 0) finish_tile<kFp8, kMT, kEpi>(p, stage_tile(s + 1), acc, red, part, rope);
    }
  }
}

// --- host side ------------------------------------------------------------------------

using KernelFn = void (*)(LinearParams);

template <bool kFp8, int kMT>
KernelFn pick_epilogue(int epilogue) {
  switch (epilogue) {
    case kEpilogueStore: return small_m_linear_kernel<kFp8, kMT, kEpilogueStore>;
    case kEpilogueGatedResidual: return small_m_linear_kernel<kFp8, kMT, kEpilogueGatedResidual>;
    case kEpilogueGeluTanhMul: return small_m_linear_kernel<kFp8, kMT, kEpilogueGeluTanhMul>;
    default: return small_m_linear_kernel<kFp8, kMT, kEpilogueQkvRope>;
  }
}

template <bool kFp8>
KernelFn pick_tiles(int token_tiles, int epilogue) {
  switch (token_tiles) {
    case 1: return pick_epilogue<kFp8, 1>(epilogue);
    case 2: return pick_epilogue<kFp8, 2>(epilogue);
    case 4: return pick_epilogue<kFp8, 4>(epilogue);
    default: return pick_epilogue<kFp8, 8>(epilogue);
  }
}

int token_tiles_for(int64_t m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

int chunk_k_for(int w_dtype) { return w_dtype == kFloat8E4M3 ? 64 : 32; }

void check_param_vector(const void* p, const char* what) {
  require(p != nullptr, "small_m_linear", std::string(what) + " is required");
  require(aligned16(p), "small_m_linear", std::string(what) + " must be 16-byte aligned");
}

// Bytes per staged bf16 x row of a block's K range. Lanes of a phase read 16 B pieces of
// two rows: 64 B apart (bf16 W) or at 32 B steps (fp8 W); a row stride of 64 (bf16) or
// 16 (fp8) mod 128 keeps them on distinct banks.
int xs_stride_for(int64_t k_block, bool fp8) {
  const int want = fp8 ? 16 : 64;
  const int bytes = static_cast<int>(k_block * 2);
  return bytes + ((want - bytes % 128) + 128) % 128;
}

size_t smem_for(int64_t m, int64_t k, int split, bool fp8, int prologue, int param_dtype) {
  const int mt = token_tiles_for(m);
  const size_t norm_bytes = prologue == kPrologueNone ? 0 : 2 * k * (param_dtype == kBFloat16 ? 2 : 4);
  return static_cast<size_t>(8 * mt) * xs_stride_for(k / split, fp8) +
         static_cast<size_t>(kWarps + 1) * mt * 32 * 16 + kMaxM * sizeof(float) + norm_bytes;
}

struct Plan {
  int split = 1;
  size_t smem = 0;
  std::string error;  // empty: launchable
};

// Blocks per tile (split) and shared memory of a launch; `requested` 0 picks the split.
// Measured on H100 (bench/expert_kernels_bench.py): a cluster split costs ~1 us (launch,
// two cluster barriers, remote reads), so it pays only where one block per tile would
// stream a long K (>= 1 KiB of a W row per warp) on under half the SMs (N = 1024,
// K = 4096 bf16); larger splits are taken only to fit the x tile in shared memory.
Plan plan_linear(int64_t m, int64_t n, int64_t k, int w_dtype, int prologue, int param_dtype, int requested) {
  Plan plan;
  const DeviceInfo& dev = device_info();
  const bool fp8 = w_dtype == kFloat8E4M3;
  const int chunk_k = chunk_k_for(w_dtype);
  const int64_t tiles = n / kTileRows;
  const bool clusters = dev.cc_major >= 9;
  auto divides = [&](int split) { return k % (split * kWarps * chunk_k) == 0; };
  auto fits = [&](int split) {
    return smem_for(m, k, split, fp8, prologue, param_dtype) <= static_cast<size_t>(dev.max_smem_optin);
  };
  int split = requested;
  if (split <= 0) {
    split = 1;
    if (clusters && prologue == kPrologueNone) {
      while (split < kMaxSplit && tiles * split * 2 <= dev.sms &&
             k * (fp8 ? 1 : 2) / (kWarps * split) >= 1024 && divides(split * 2))
        split *= 2;
      while (split < kMaxSplit && !fits(split) && divides(split * 2)) split *= 2;
    }
  }
  plan.split = split;
  plan.smem = smem_for(m, k, split, fp8, prologue, param_dtype);
  if (split < 1 || split > kMaxSplit || !divides(split)) {
    plan.error = "split_k " + std::to_string(split) + " must be in [1, 8] and divide K into warp chunks";
  } else if (split > 1 && !clusters) {
    plan.error = "split_k > 1 needs thread-block clusters (sm_90+)";
  } else if (split > 1 && prologue != kPrologueNone) {
    plan.error = "a norm prologue needs whole rows in one block: split_k must be 1";
  } else if (!fits(split)) {
    plan.error = "the x tile needs " + std::to_string(plan.smem) + " bytes of shared memory (" +
                 (prologue == kPrologueNone ? std::string("use a larger split_k")
                                            : std::string("a norm prologue keeps all of K: M x K is too large")) +
                 ")";
  }
  return plan;
}

}  // namespace

bool small_m_linear_supported(int64_t m, int64_t n, int64_t k, int w_dtype, int prologue) {
  if (m < 1 || m > kMaxM || n <= 0 || n % kTileRows || k <= 0 || (w_dtype != kBFloat16 && w_dtype != kFloat8E4M3) ||
      k % (kWarps * chunk_k_for(w_dtype)) || prologue < kPrologueNone || prologue > kPrologueAdaRmsNorm)
    return false;
  return plan_linear(m, n, k, w_dtype, prologue, kFloat32, 0).error.empty();
}

void small_m_linear(const SmallMLinearArgs& a, void* stream) {
  const char* name = "small_m_linear";
  require(a.w_dtype == kBFloat16 || a.w_dtype == kFloat8E4M3, name, "weight dtype must be bf16 or fp8 e4m3");
  require(a.x_dtype == kBFloat16 || a.x_dtype == kFloat32, name, "x dtype must be bf16 or fp32");
  require(a.param_dtype == kBFloat16 || a.param_dtype == kFloat32, name, "param dtype must be bf16 or fp32");
  require(a.m >= 1 && a.m <= kMaxM, name, "M must be in [1, 64], got " + std::to_string(a.m));
  require(a.n > 0 && a.n % kTileRows == 0, name, "N must be a positive multiple of 16, got " + std::to_string(a.n));
  const bool fp8 = a.w_dtype == kFloat8E4M3;
  const int chunk_k = chunk_k_for(a.w_dtype);
  require(a.k > 0 && a.k % (kWarps * chunk_k) == 0, name,
          "K must be a positive multiple of " + std::to_string(kWarps * chunk_k) + ", got " + std::to_string(a.k));
  require(a.x != nullptr && a.w != nullptr, name, "x and w are required");
  require(aligned16(a.x) && aligned16(a.w), name, "x and w must be 16-byte aligned");
  const int x_elem = a.x_dtype == kBFloat16 ? 2 : 4;
  require(a.x_row_stride >= a.k && (a.x_row_stride * x_elem) % 16 == 0, name,
          "x row stride must be >= K and a multiple of 16 bytes");
  require(!fp8 || a.w_scale != nullptr, name, "fp8 weights need w_scale");
  require(a.prologue >= kPrologueNone && a.prologue <= kPrologueAdaRmsNorm, name, "unknown prologue");
  if (a.prologue != kPrologueNone) check_param_vector(a.norm_weight, "norm_weight");
  if (a.prologue == kPrologueAdaRmsNorm) check_param_vector(a.norm_shift, "norm_shift");

  switch (a.epilogue) {
    case kEpilogueStore:
    case kEpilogueGeluTanhMul: {
      const int64_t cols = a.epilogue == kEpilogueStore ? a.n : a.n / 2;
      require(a.out != nullptr, name, "out is required");
      require(a.out_row_stride >= cols, name, "out row stride must be >= its columns");
      break;
    }
    case kEpilogueGatedResidual:
      require(a.residual != nullptr, name, "residual is required");
      require(a.residual_dtype == kBFloat16 || a.residual_dtype == kFloat32, name,
              "residual dtype must be bf16 or fp32");
      require(a.residual_row_stride >= a.n, name, "residual row stride must be >= N");
      break;
    case kEpilogueQkvRope:
      require(a.q_out && a.k_cache && a.v_cache && a.cos && a.sin && a.positions && a.cache_offset, name,
              "qkv_rope needs q_out, k_cache, v_cache, cos, sin, positions and cache_offset");
      require(a.head_dim > 0 && a.head_dim % kTileRows == 0, name, "head_dim must be a multiple of 16");
      require(a.num_q_heads > 0 && a.num_kv_heads > 0 &&
                  a.n == (a.num_q_heads + 2 * a.num_kv_heads) * a.head_dim,
              name, "N must be (Hq + 2 Hkv) * head_dim");
      require(a.max_pos > 0 && a.cache_rows > 0, name, "max_pos and cache_rows must be positive");
      break;
    default: require(false, name, "unknown epilogue");
  }

  const DeviceInfo& dev = device_info();
  const int tiles = static_cast<int>(a.n / kTileRows);
  const Plan plan = plan_linear(a.m, a.n, a.k, a.w_dtype, a.prologue, a.param_dtype, a.split_k);
  require(plan.error.empty(), name, plan.error);
  const int split = plan.split;

  LinearParams p = {};
  p.x = a.x;
  p.x_row_stride = a.x_row_stride;
  p.x_dtype = a.x_dtype;
  p.w = static_cast<const uint8_t*>(a.w);
  p.w_row_bytes = a.k * (fp8 ? 1 : 2);
  p.w_scale = a.w_scale;
  p.m = static_cast<int>(a.m);
  p.n = static_cast<int>(a.n);
  p.k = static_cast<int>(a.k);
  p.split = split;
  p.k_block = static_cast<int>(a.k / split);
  p.k_warp = p.k_block / kWarps;
  p.warp_chunks = p.k_warp / chunk_k;
  p.tiles = tiles;
  p.xs_stride = xs_stride_for(p.k_block, fp8);
  p.prologue = a.prologue;
  p.norm_weight = a.norm_weight;
  p.norm_shift = a.norm_shift;
  p.eps = a.eps;
  p.param_dtype = a.param_dtype;
  p.out = a.out;
  p.out_row_stride = a.out_row_stride;
  p.bias = a.bias;
  p.residual = a.residual;
  p.residual_row_stride = a.residual_row_stride;
  p.residual_dtype = a.residual_dtype;
  p.gate = a.gate;
  p.q_out = a.q_out;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.cos = a.cos;
  p.sin = a.sin;
  p.positions = a.positions;
  p.cache_offset = a.cache_offset;
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.head_dim = static_cast<int>(a.head_dim);
  p.max_pos = static_cast<int>(a.max_pos);
  p.cache_rows = a.cache_rows;
  p.q_scale = a.q_scale;

  const int mt = token_tiles_for(a.m);
  const size_t smem = plan.smem;
  const KernelFn kernel = fp8 ? pick_tiles<true>(mt, a.epilogue) : pick_tiles<false>(mt, a.epilogue);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, name);

  // Groups of `split` blocks; each loops over tiles. As many groups as are resident at
  // once (every SM streams; per-group tile counts differ by at most one).
  const int per_sm = std::max(1, resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, smem));
  const int64_t capacity = std::max<int64_t>(1, static_cast<int64_t>(per_sm) * dev.sms / split);
  int64_t groups = std::min<int64_t>(tiles, capacity);
  if (a.max_groups > 0) groups = std::min<int64_t>(groups, a.max_groups);
  launch(name, kernel, dim3(static_cast<unsigned>(groups * split)), dim3(kThreads), smem, stream, split, a.pdl, p);
}

}  // namespace expert
}  // namespace flashrt
