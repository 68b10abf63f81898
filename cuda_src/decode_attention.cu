// decode_attention: softmax(q k^T * scale + bias) v for a few query tokens against a
// KV cache whose heads are shared by several query heads (Pi0.5 expert: 10 tokens x 8
// query heads on 1 KV head, head_dim 256, ~570 keys), in one launch.
//
// Grid (key split, query-row block, kv head); the splits of one row block form a
// thread-block cluster. The query rows of a KV head (token-major, M * Hq / Hkv of them)
// are cut in blocks of 16 / 32 / 64 rows; each block walks its split's keys in tiles of
// 64, so every K/V tile is loaded once for all its rows. Per tile, with tensor cores:
//   S = Q K^T      warp w scores keys [8w, 8w + 8) of the tile for all rows;
//   online softmax row max / sum across the 8 warps through shared memory (log2 domain);
//   O += P V       P rounded to bf16 (as flash attention does), warp w owns output
//                  columns [32w, 32w + 32).
// K and V come in with cp.async, the next tile's K while the current V is in use. Keys
// past the end are zero-filled and masked. The splits' (max, sum, unnormalised output)
// are merged through distributed shared memory, each block of the cluster writing a
// share of the outputs; a row with no unmasked key gets zeros.
//
// Under PDL only q and the newest keys depend on the kernel before this one (it wrote
// them); keys [0, stable_keys) (the prefix, earlier tokens) and the bias were written
// before any kernel that may still be running. Those K/V rows of a block's first tile
// and its bias are loaded before the dependency wait, so after it only Q and the few new
// K/V rows are on the critical path (attention 9.9 -> 8.5 us a layer on the H100).
#include <cooperative_groups.h>

#include <cmath>

#include "expert_common.cuh"
#include "expert_launchers.h"

namespace flashrt {
namespace expert {
namespace {

namespace cg = cooperative_groups;

constexpr int kD = 256;  // head_dim
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kKeyTile = 64;
constexpr int kRowPad = kD + 8;        // bf16 per staged Q/K/V row: 528 B, ldmatrix conflict-free
constexpr int kPRowPad = kKeyTile + 8;  // bf16 per P row
constexpr int kMaxSplitsNonPortable = 16;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnParams {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const float* bias;
  __nv_bfloat16* out;
  int num_q_heads, group, rows, keys;
  int64_t kv_row_stride, bias_row_stride;
  float scale_log2;     // scale * log2(e)
  int keys_per_split;   // multiple of kKeyTile
  int splits;
  int stable_keys;      // keys [0, stable_keys) and the bias may be read before the wait
};

template <int kMT>
struct Smem {
  static constexpr int kRows = 16 * kMT;
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kRows * kRowPad;
  static constexpr size_t kV = kK + sizeof(__nv_bfloat16) * kKeyTile * kRowPad;
  static constexpr size_t kP = kV + sizeof(__nv_bfloat16) * kKeyTile * kRowPad;
  static constexpr size_t kRedMax = kP + sizeof(__nv_bfloat16) * kRows * kPRowPad;
  static constexpr size_t kRedSum = kRedMax + sizeof(float) * kWarps * kRows;
  static constexpr size_t kMax = kRedSum + sizeof(float) * kWarps * kRows;
  static constexpr size_t kSum = kMax + sizeof(float) * kRows;
  static constexpr size_t kAlpha = kSum + sizeof(float) * kRows;
  static constexpr size_t kBytes = kAlpha + sizeof(float) * kRows;
  // The splits' partial outputs [kRows][kD] fp32 reuse the K/V tiles once all are done.
  static_assert(sizeof(float) * kRows * kD <= kP - kK, "partial output must fit over the K/V tiles");
};

// Query row r of kv head h: token r / group, query head h * group + r % group.
__device__ __forceinline__ int64_t q_offset(const AttnParams& p, int kv_head, int r) {
  const int token = r / p.group;
  return (static_cast<int64_t>(token) * p.num_q_heads + kv_head * p.group + r % p.group) * kD;
}

// Which rows of a K/V tile a load_kv_tile call issues: all of them, or the part that may
// be loaded before the dependency wait (zero fill and keys < stable_keys), or the rest.
enum TileRows { kAllRows, kEarlyRows, kLateRows };

// The rows of the 64-key tile starting at `key0` into `dst`; keys >= key_end are
// zero-filled (no read: a masked key's V must be finite, its P is 0).
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t row_stride,
                                             int kv_head, int key0, int key_end, int stable_keys, TileRows part) {
  constexpr int kPieces = kD / 8;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < kKeyTile * kPieces; i += kThreads) {
    const int r = i / kPieces;
    const int piece = i % kPieces;
    const int key = key0 + r;
    const bool valid = key < key_end;
    if (part != kAllRows && (part == kEarlyRows) != (!valid || key < stable_keys)) continue;
    const __nv_bfloat16* s = src + (valid ? key * row_stride + kv_head * kD + piece * 8 : 0);
    copy_async16(dst + r * kRowPad + piece * 8, s, valid ? 16 : 0);
  }
}

// Bias of this thread's scores in the 64-key tile starting at `key0` (rows g, g + 8 of
// each row tile; keys 8 warp + 2c, + 1), log2 units, -inf at keys >= key_end.
template <int kMT>
__device__ __forceinline__ void load_bias(const AttnParams& p, float (&b)[kMT][4], int key0, int key_end, int row0,
                                          int warp, int g, int c) {
  const int key = key0 + warp * 8 + 2 * c;
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + 16 * i + g + (e >> 1) * 8;
      const int kk = key + (e & 1);
      b[i][e] = kk < key_end ? 0.f : -INFINITY;
      if (p.bias != nullptr && kk < key_end && r < p.rows)
        b[i][e] = p.bias[(r / p.group) * p.bias_row_stride + kk] * kLog2e;
    }
  }
}

template <int kMT>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const __grid_constant__ AttnParams p) {
  using L = Smem<kMT>;
  constexpr int kRows = L::kRows;
  extern __shared__ __align__(16) uint8_t smem[];
  auto* qs = reinterpret_cast<__nv_bfloat16*>(smem + L::kQ);
  auto* ks = reinterpret_cast<__nv_bfloat16*>(smem + L::kK);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(smem + L::kV);
  auto* ps = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  auto* red_max = reinterpret_cast<float*>(smem + L::kRedMax);
  auto* red_sum = reinterpret_cast<float*>(smem + L::kRedSum);
  auto* row_max = reinterpret_cast<float*>(smem + L::kMax);
  auto* row_sum = reinterpret_cast<float*>(smem + L::kSum);
  auto* alpha = reinterpret_cast<float*>(smem + L::kAlpha);
  auto* partial = reinterpret_cast<float*>(smem + L::kK);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int split = blockIdx.x;
  const int row0 = blockIdx.y * kRows;
  const int kv_head = blockIdx.z;
  const int key_begin = split * p.keys_per_split;
  const int key_end = min(p.keys, key_begin + p.keys_per_split);
  const int tiles = (key_end - key_begin + kKeyTile - 1) / kKeyTile;

  if (tid < kRows) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.f;
  }
  // The first tile's stable K/V rows before the wait (they join the Q/K group below).
  allow_consumer_launch();
  load_kv_tile(ks, p.k, p.kv_row_stride, kv_head, key_begin, key_end, p.stable_keys, kEarlyRows);
  load_kv_tile(vs, p.v, p.kv_row_stride, kv_head, key_begin, key_end, p.stable_keys, kEarlyRows);
  float bias[kMT][4];
  if (p.stable_keys > 0) load_bias(p, bias, key_begin, key_end, row0, warp, g, c);
  wait_for_producer();
  if (p.stable_keys <= 0) load_bias(p, bias, key_begin, key_end, row0, warp, g, c);

  for (int i = tid; i < kRows * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8);
    const int piece = i % (kD / 8);
    const bool valid = row0 + r < p.rows;
    const __nv_bfloat16* s = p.q + (valid ? q_offset(p, kv_head, row0 + r) + piece * 8 : 0);
    copy_async16(qs + r * kRowPad + piece * 8, s, valid ? 16 : 0);
  }
  load_kv_tile(ks, p.k, p.kv_row_stride, kv_head, key_begin, key_end, p.stable_keys, kLateRows);
  copy_async_commit();
  load_kv_tile(vs, p.v, p.kv_row_stride, kv_head, key_begin, key_end, p.stable_keys, kLateRows);
  copy_async_commit();

  // ldmatrix row addresses of this lane: A operands (Q, P) rows lane % 16, column half
  // lane / 16; K rows 8 * warp + lane % 8, column quarter lane / 8.
  const int a_row = lane & 15;
  const int a_col = (lane >> 4) * 8;
  const __nv_bfloat16* k_lane = ks + (warp * 8 + (lane & 7)) * kRowPad + (lane >> 3) * 8;
  // V (transposed): keys (lane / 8 % 2) * 8 + lane % 8, columns 32 * warp + (lane / 16) * 8
  const __nv_bfloat16* v_lane = vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * kRowPad + warp * 32 + (lane >> 4) * 8;

  float o[kMT][4][4] = {};
  for (int t = 0; t < tiles; ++t) {
    copy_async_wait<1>();
    __syncthreads();  // Q and this K tile are in

    float s[kMT][4] = {};
    qk_scores<kMT, kD>(s, qs + a_row * kRowPad + a_col, k_lane, kRowPad);

    // scores in log2 units; masked (bias -inf, past the split) -> -inf
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = s[i][e] * p.scale_log2 + bias[i][e];
      const float m0 = quad_max(fmaxf(s[i][0], s[i][1]));
      const float m1 = quad_max(fmaxf(s[i][2], s[i][3]));
      if (c == 0) {
        red_max[warp * kRows + 16 * i + g] = m0;
        red_max[warp * kRows + 16 * i + g + 8] = m1;
      }
    }
    __syncthreads();  // everyone is done with this K tile
    if (t + 1 < tiles) {
      load_kv_tile(ks, p.k, p.kv_row_stride, kv_head, key_begin + (t + 1) * kKeyTile, key_end, 0, kAllRows);
      load_bias(p, bias, key_begin + (t + 1) * kKeyTile, key_end, row0, warp, g, c);
    }
    copy_async_commit();  // possibly empty: keeps one group per tile
    if (tid < kRows) {
      float tile_max = red_max[tid];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, red_max[w * kRows + tid]);
      const float old_max = row_max[tid];
      const float new_max = fmaxf(old_max, tile_max);
      alpha[tid] = new_max == -INFINITY ? 1.f : exp2f(old_max - new_max);
      row_max[tid] = new_max;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kMT; ++i) {
      const float mx0 = row_max[16 * i + g];
      const float mx1 = row_max[16 * i + g + 8];
      const float p0 = exp2_shifted(s[i][0], mx0);
      const float p1 = exp2_shifted(s[i][1], mx0);
      const float p2 = exp2_shifted(s[i][2], mx1);
      const float p3 = exp2_shifted(s[i][3], mx1);
      const int col = warp * 8 + 2 * c;
      *reinterpret_cast<uint32_t*>(ps + (16 * i + g) * kPRowPad + col) = pack_bf16x2(p0, p1);
      *reinterpret_cast<uint32_t*>(ps + (16 * i + g + 8) * kPRowPad + col) = pack_bf16x2(p2, p3);
      const float s0 = quad_sum(p0 + p1);
      const float s1 = quad_sum(p2 + p3);
      if (c == 0) {
        red_sum[warp * kRows + 16 * i + g] = s0;
        red_sum[warp * kRows + 16 * i + g + 8] = s1;
      }
    }
    copy_async_wait<1>();
    __syncthreads();  // P, sums and this V tile are in
    if (tid < kRows) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red_sum[w * kRows + tid];
      row_sum[tid] = row_sum[tid] * alpha[tid] + sum;
    }

    pv_accumulate<kMT, kKeyTile>(o, alpha, ps + a_row * kPRowPad + a_col, kPRowPad, v_lane, kRowPad);
    __syncthreads();  // V, P and the row statistics are free again
    if (t + 1 < tiles)
      load_kv_tile(vs, p.v, p.kv_row_stride, kv_head, key_begin + (t + 1) * kKeyTile, key_end, 0, kAllRows);
    copy_async_commit();
  }
  copy_async_wait<0>();

  auto out_offset = [&](int r, int d) { return q_offset(p, kv_head, r) + d; };
  if (p.splits == 1) {
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 16 * i + g + half * 8;
        if (row0 + r >= p.rows) continue;
        const float sum = row_sum[r];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int d = warp * 32 + nt * 8 + 2 * c;
          *reinterpret_cast<uint32_t*>(p.out + out_offset(row0 + r, d)) =
              pack_bf16x2(o[i][nt][2 * half] * inv, o[i][nt][2 * half + 1] * inv);
        }
      }
    }
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __syncthreads();  // K/V tiles are dead: reuse them for the partial output
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 16 * i + g + half * 8;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int d = warp * 32 + nt * 8 + 2 * c;
        *reinterpret_cast<float2*>(partial + r * kD + d) = make_float2(o[i][nt][2 * half], o[i][nt][2 * half + 1]);
      }
    }
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  // Per row and split: weight exp2(m_s - max) / sum_s(...), all remote statistics read at
  // once; then each block merges a share of the outputs.
  static_assert(L::kRedSum == L::kRedMax + sizeof(float) * kWarps * kRows && 2 * kWarps >= kMaxSplitsNonPortable,
                "red_max + red_sum hold the [rows][16] weights");
  float* weight = red_max;  // [kRows][16] over red_max and red_sum, free now
  if (tid < kRows) {
    float m_s[kMaxSplitsNonPortable], l_s[kMaxSplitsNonPortable];
    float mx = -INFINITY;
#pragma unroll
    for (int sp = 0; sp < kMaxSplitsNonPortable; ++sp) {
      if (sp < p.splits) {
        m_s[sp] = cluster.map_shared_rank(row_max, sp)[tid];
        l_s[sp] = cluster.map_shared_rank(row_sum, sp)[tid];
        mx = fmaxf(mx, m_s[sp]);
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int sp = 0; sp < kMaxSplitsNonPortable; ++sp) {
      if (sp < p.splits) {
        m_s[sp] = mx == -INFINITY ? 0.f : exp2f(m_s[sp] - mx);
        sum += m_s[sp] * l_s[sp];
      }
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;  // all keys masked: zeros
#pragma unroll
    for (int sp = 0; sp < kMaxSplitsNonPortable; ++sp)
      if (sp < p.splits) weight[tid * kMaxSplitsNonPortable + sp] = m_s[sp] * inv;
  }
  __syncthreads();
  for (int item = rank * kThreads + tid; item < kRows * (kD / 4); item += p.splits * kThreads) {
    const int r = item / (kD / 4);
    const int d = (item % (kD / 4)) * 4;
    if (row0 + r >= p.rows) continue;
    float4 part[kMaxSplitsNonPortable];
#pragma unroll
    for (int sp = 0; sp < kMaxSplitsNonPortable; ++sp)
      if (sp < p.splits) part[sp] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(partial, sp) + r * kD + d);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int sp = 0; sp < kMaxSplitsNonPortable; ++sp) {
      if (sp >= p.splits) break;
      const float w = weight[r * kMaxSplitsNonPortable + sp];
      acc.x += w * part[sp].x;
      acc.y += w * part[sp].y;
      acc.z += w * part[sp].z;
      acc.w += w * part[sp].w;
    }
    uint2 packed;
    packed.x = pack_bf16x2(acc.x, acc.y);
    packed.y = pack_bf16x2(acc.z, acc.w);
    *reinterpret_cast<uint2*>(p.out + out_offset(row0 + r, d)) = packed;
  }
  cluster.sync();  // peers read this block's shared memory until here
#endif
}

using KernelFn = void (*)(AttnParams);

KernelFn pick(int mt) {
  switch (mt) {
    case 1: return decode_attention_kernel<1>;
    case 2: return decode_attention_kernel<2>;
    default: return decode_attention_kernel<4>;
  }
}

size_t smem_bytes(int mt) {
  switch (mt) {
    case 1: return Smem<1>::kBytes;
    case 2: return Smem<2>::kBytes;
    default: return Smem<4>::kBytes;
  }
}

// Largest cluster of `kernel` the device co-schedules (16 on H100 with the non-portable
// opt-in; 8 is portable); 1 before sm_90. Cached per kernel and device.
int max_cluster(KernelFn kernel, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  int dev = 0;
  cudaGetDevice(&dev);
  if (device_info().cc_major < 9) return 1;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int size = 8;  // portable; used when the query is unavailable
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, "decode_attention (expert)");
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(kMaxSplitsNonPortable, 1, 1);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = kMaxSplitsNonPortable;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int potential = 0;
    if (cudaOccupancyMaxPotentialClusterSize(&potential, kernel, &cfg) == cudaSuccess && potential >= 1)
      size = std::min(potential, kMaxSplitsNonPortable);
  }
  cudaGetLastError();
  cache[key] = size;
  return size;
}

}  // namespace

void decode_attention(const DecodeAttentionArgs& a, void* stream) {
  const char* name = "decode_attention (expert)";
  require(a.head_dim == kD, name, "head_dim must be 256, got " + std::to_string(a.head_dim));
  require(a.tokens >= 1 && a.num_q_heads >= 1 && a.num_kv_heads >= 1 && a.num_q_heads % a.num_kv_heads == 0, name,
          "need tokens >= 1 and num_q_heads a multiple of num_kv_heads");
  require(a.keys >= 1, name, "need at least one key");
  require(a.q && a.k && a.v && a.out, name, "q, k, v and out are required");
  require(aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out), name,
          "q, k, v and out must be 16-byte aligned");
  const int64_t kv_stride = a.kv_row_stride > 0 ? a.kv_row_stride : a.num_kv_heads * kD;
  require(kv_stride >= a.num_kv_heads * kD && kv_stride % 8 == 0, name,
          "kv row stride must be >= Hkv * 256 and a multiple of 8");
  require(a.bias == nullptr || a.bias_row_stride == 0 || a.bias_row_stride >= a.keys, name,
          "bias row stride must be 0 (shared row) or >= keys");
  const int64_t group = a.num_q_heads / a.num_kv_heads;
  const int64_t rows = a.tokens * group;
  require(rows * kD < (int64_t{1} << 31) && a.keys * kv_stride < (int64_t{1} << 31), name, "tensors too large");

  const DeviceInfo& dev = device_info();
  const int64_t key_tiles = (a.keys + kKeyTile - 1) / kKeyTile;
  int mt = 1;
  if (a.rows_per_block > 0) {
    require(a.rows_per_block == 16 || a.rows_per_block == 32 || a.rows_per_block == 64, name,
            "rows_per_block must be 16, 32 or 64");
    mt = a.rows_per_block / 16;
  }
  const KernelFn probe = pick(mt);
  const int cluster_cap = max_cluster(probe, smem_bytes(mt));
  int64_t splits = a.splits > 0 ? a.splits : cluster_cap;
  require(splits <= cluster_cap, name, "splits " + std::to_string(splits) + " exceeds the largest cluster (" +
                                           std::to_string(cluster_cap) + ") on this device");
  splits = std::min(splits, key_tiles);
  const int64_t tiles_per_split = (key_tiles + splits - 1) / splits;
  splits = (key_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split
  if (a.rows_per_block <= 0) {  // bigger row blocks (fewer K/V re-reads) once the grid is over a wave
    while (mt < 4 && ((rows + 16 * mt - 1) / (16 * mt)) * a.num_kv_heads * splits > dev.sms) mt *= 2;
  }
  const KernelFn kernel = pick(mt);
  const size_t smem = smem_bytes(mt);
  if (kernel != probe) require(splits <= max_cluster(kernel, smem), name, "cluster too large for this row block");
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, name);

  AttnParams p = {};
  p.q = static_cast<const __nv_bfloat16*>(a.q);
  p.k = static_cast<const __nv_bfloat16*>(a.k);
  p.v = static_cast<const __nv_bfloat16*>(a.v);
  p.bias = a.bias;
  p.out = static_cast<__nv_bfloat16*>(a.out);
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.group = static_cast<int>(group);
  p.rows = static_cast<int>(rows);
  p.keys = static_cast<int>(a.keys);
  p.kv_row_stride = kv_stride;
  p.bias_row_stride = a.bias_row_stride;
  p.scale_log2 = a.scale * kLog2e;
  p.keys_per_split = static_cast<int>(tiles_per_split * kKeyTile);
  p.splits = static_cast<int>(splits);
  p.stable_keys = static_cast<int>(std::min<int64_t>(std::max<int64_t>(a.stable_keys, 0), a.keys));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>((rows + 16 * mt - 1) / (16 * mt)),
                  static_cast<unsigned>(a.num_kv_heads));
  launch(name, kernel, grid, dim3(kThreads), smem, stream, static_cast<int>(splits), a.pdl, p);
}

}  // namespace expert
}  // namespace flashrt
