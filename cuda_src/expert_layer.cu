// expert_layer: whole action-expert layers (Pi0 / Pi0.5 at M <= 16 tokens) in one
// persistent launch, instead of five kernels a layer whose fixed costs (launch, ramp,
// tail, dependency wait, weights requested only after the previous kernel ends) were
// ~75% of the layer time.
//
// Grid: one block per SM (all co-resident: cooperative launch), 8 consumer warps and one
// producer warp. Phases of a layer, separated by a software grid barrier:
//   1 QKV     norm_in(res) -> packed QKV GEMV -> RoPE -> q (workspace), k / v -> cache
//   2 attn    (kv head, 16 query rows, 32-key chunk) units -> unnormalised partials
//   3 merge   partials -> attention output (bf16, workspace)
//   4 o_proj  attn @ o^T in 2 K slices -> res += gate_in * sum (last-arriving slice)
//   5 gate_up norm_post(res) -> packed gate|up GEMV -> gelu_tanh(gate) * up (workspace)
//   6 down    h @ down^T in 4 K slices -> res += gate_post * sum
//
// Weight streaming. Every GEMV is cut in items of 16 W rows x 1024 k (32 KB): QKV and
// gate_up tiles whole, o_proj and down tiles in K slices. The items of all layers form
// one list; block b owns items b, b + G, b + 2G, ... (8 per Pi0.5 layer on 132 SMs, and
// the K slice a block works on is fixed within a phase when G is a multiple of the
// slice count). The producer warp walks the block's items in order and bulk-copies each
// into a ring of shared-memory slots (mbarrier completion, L2 evict-first), limited only
// by free slots and a cap on items in flight (deep queues would delay the latency-bound
// loads of the attention phase). It never waits at a grid barrier, so the next phase's
// weights arrive while the consumers wait for the previous one.
//
// GEMV item (the small_m_linear tiling): W rows as the A operand of mma.m16n8k16, x^T as
// B; warp w takes k [128 w, 128 w + 128); x of the block's K slice lives in registers in
// fragment order for a whole phase (norm applied, rounded to bf16 once); the 8 warps'
// sums meet in shared memory and threads 0..63 run the epilogue. Split-K slices write
// fp32 partials; the last slice to arrive at a tile's counter adds them in slice order
// (deterministic) and updates the residual.
//
// Latency. Between barriers a phase moves little data, so its time is its chain of
// dependent memory round trips, each slower while the weight stream fills the memory
// queues. Hence: every small input that is not produced in the launch (norm vectors,
// gates, key bias) goes to L2 at the start and K / V a layer ahead; RoPE's cos / sin go
// to L1 before the item's MMA; a split-K epilogue loads res, gates and partials in one
// round; the barrier and split-K counters use release / acquire atomics instead of full
// fences; the merge spreads a quad's key chunks over several lanes. The alternatives
// (ExpertLayerArgs sc_fences, prefetch, merge_lanes) stay selectable for measurement.
//
// Data written inside the launch (res, q, attention, activations, partials, the cache
// rows) is read through L2 only (ld.cg / cp.async.cg): L1 is not coherent across SMs.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "expert_common.cuh"
#include "expert_launchers.h"

namespace flashrt {
namespace expert {
namespace {

constexpr int kHidden = 1024;  // expert width = K of every GEMV item
constexpr int kHeadDim = 256;
constexpr int kWarps = 8;  // consumer warps
constexpr int kConsumers = kWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kTileRows = 16;
constexpr int kMaxM = 16;
constexpr int kMaxLayers = 32;
constexpr int kWarpK = kHidden / kWarps;  // k per consumer warp
constexpr int kChunks = kWarpK / 32;      // 32-k MMA chunks per warp
constexpr int kSliceBytes = kHidden * 2;  // one W row of an item
// Ring rows 64 mod 128 bytes apart: the 16-byte fragment loads of a quarter warp (rows
// g, g + 1 at four k offsets) land on distinct banks.
constexpr int kSlotStride = kSliceBytes + 64;
constexpr int kSlotBytes = kTileRows * kSlotStride;
constexpr int kMaxSlots = 5;
constexpr int kPartItems = 64;  // float4 of one (tile, K slice) partial: 16 rows x 16 tokens
constexpr int kKeyTile = 32;    // keys per attention step
constexpr int kScoreWarps = kKeyTile / 8;
constexpr int kRowPad = kHeadDim + 8;  // bf16 per staged Q / K / V row (ldmatrix conflict-free)
constexpr int kPRowPad = kKeyTile + 8;
constexpr float kLog2e = 1.4426950408889634f;

enum Phase : int { kQkv = 0, kOProj = 1, kGateUp = 2, kDown = 3, kPhases = 4 };

// Trace events of a layer (bench/expert_kernels_bench.py reads them): clock64 at the
// start and after each phase / barrier; the cycles each GEMV phase spent waiting for
// weights; clock64 when each GEMV phase had its first x staged and when it had consumed
// its items (before the split-K tail). All as seen by thread 0.
enum TraceEvent : int {
  kTraceStart = 0,
  kTraceQkv, kTraceBarrier1, kTraceAttention, kTraceBarrier2, kTraceMerge, kTraceBarrier3,
  kTraceOProj, kTraceBarrier4, kTraceGateUp, kTraceBarrier5, kTraceDown,
  kTraceWeightWait,                 // + phase
  kTraceStaged = kTraceWeightWait + kPhases,  // + phase
  kTraceItemsDone = kTraceStaged + kPhases,   // + phase
  kTraceEvents = kTraceItemsDone + kPhases
};

struct LayerWeights {
  const __nv_bfloat16* w[kPhases];
  const float* norm_weight[2];  // input, post-attention
  const float* norm_shift[2];
  const float* gate[2];  // residual gates after attention, after the MLP
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
};

struct LayerParams {
  __nv_bfloat16* res;
  int m, layers, stop_after_kv;
  int num_q_heads, num_kv_heads, group, mlp;
  int items[kPhases];   // items of each phase in a layer
  int first[kPhases];   // first item of each phase within a layer
  int slices[kPhases];  // K slices per tile
  int k[kPhases];       // K of each weight
  int layer_items;      // items of a full layer
  int total_items;      // of the launch (the last layer may stop after QKV)
  float eps;
  const float* cos;
  const float* sin;
  int max_pos;
  const int32_t* positions;
  const int32_t* cache_offset;
  int64_t cache_rows;
  const float* key_bias;
  int keys;
  float q_scale;
  float scale_log2;
  int attn_rows, attn_row_blocks, attn_chunk, attn_splits, attn_units;
  int slots, in_flight;
  int merge_lanes;  // threads merging one attention output quad (power of two, <= 8)
  int sc_fences;    // grid barrier / split-K counters behind __threadfence (else release / acquire)
  int prefetch;     // norm vectors, gates and key bias into L2 at the start, K / V a layer ahead
  // workspace
  unsigned* barrier;
  unsigned* counters;  // [2][hidden / 16]: o_proj, down
  __nv_bfloat16* q;
  __nv_bfloat16* attn;
  __nv_bfloat16* h;
  float4* partial;
  float* attn_o;
  float2* attn_ml;
  long long* trace;  // null, or [grid][layers][kTraceEvents] clock64 stamps of thread 0
  LayerWeights layer[kMaxLayers];
};

// --- shared memory ----------------------------------------------------------------------

struct AttnSmem {  // offsets in the scratch area during the attention phase
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + 2 * kTileRows * kRowPad;
  static constexpr int kV = kK + 2 * kKeyTile * kRowPad;
  static constexpr int kP = kV + 2 * kKeyTile * kRowPad;
  static constexpr int kRedMax = kP + 2 * kTileRows * kPRowPad;
  static constexpr int kRedSum = kRedMax + 4 * kScoreWarps * kTileRows;
  static constexpr int kMax = kRedSum + 4 * kScoreWarps * kTileRows;
  static constexpr int kSum = kMax + 4 * kTileRows;
  static constexpr int kAlpha = kSum + 4 * kTileRows;
  static constexpr int kBytes = kAlpha + 4 * kTileRows;
};
constexpr int kRedBytes = 2 * kWarps * 2 * 32 * 16;  // warp sums, double-buffered, up to 2 token tiles
constexpr int kScratchBytes = AttnSmem::kBytes > kRedBytes ? AttnSmem::kBytes : kRedBytes;
constexpr int kBarrierBytes = 128;                         // full[kMaxSlots], empty[kMaxSlots]
// norm partial sums, last-slice flags, norm weight and shift, token positions
constexpr int kMiscBytes = 4 * kWarps * kMaxM + 4 * 32 + 2 * 4 * kHidden + 4 * kMaxM;

size_t smem_bytes(int slots) {
  return static_cast<size_t>(slots) * kSlotBytes + kBarrierBytes + kScratchBytes + kMiscBytes;
}

// --- primitives -----------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory"); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// A wait of seconds is a bug (or a grid that is not co-resident): trap, so the launch
// fails with an error instead of hanging the GPU.
constexpr unsigned long long kHangNs = 10ull * 1000 * 1000 * 1000;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, unsigned parity) {
  unsigned done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  if (mbar_try_wait(bar, parity)) return;
  const unsigned long long start = global_ns();
  while (!mbar_try_wait(bar, parity))
    if (global_ns() - start > kHangNs) __trap();
}

// `bytes` from global to shared memory, completing on `bar`; the lines are marked
// evict-first in L2 (read once per launch).
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

__device__ __forceinline__ void prefetch_l2_bulk(const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ uint4 ldcg16(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ float ldcg_bf16(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p))));
}

__device__ __forceinline__ void store_bf16(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ unsigned atomic_add_release(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.add.release.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ unsigned atomic_add_acq_rel(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The 128-byte lines of [p, p + bytes) into L2, kept ahead of the evict-first weights;
// threads `rank` of `ranks` share the lines.
__device__ __forceinline__ void prefetch_l2_lines(const void* p, int64_t bytes, int rank, int ranks) {
  if (p == nullptr) return;
  const auto* base = static_cast<const uint8_t*>(p);
  for (int64_t at = static_cast<int64_t>(rank) * 128; at < bytes; at += static_cast<int64_t>(ranks) * 128)
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(base + at));
}

// Grid-wide barrier on a counter that is never reset: block 0 adds 2^31 - (G - 1), the
// others 1, so bit 31 flips exactly when all G blocks have arrived and the low bits end
// where they started (the workspace starts at zero). The consumer_sync before thread 0's
// release (or full fence) orders every consumer's writes before the arrival; thread 0's
// acquire (or fence) and the consumer_sync after order every later read after all
// arrivals. The hang check reads the global timer every 64 polls only: it sits in the
// latency of the last arrival's propagation.
__device__ __noinline__ void grid_barrier(const LayerParams& p) {
  consumer_sync();
  if (threadIdx.x == 0) {
    const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
    unsigned old;
    if (p.sc_fences) {
      __threadfence();
      old = atomicAdd(p.barrier, add);
    } else {
      old = atomic_add_release(p.barrier, add);
    }
    const unsigned long long start = global_ns();
    for (unsigned polls = 1; ((load_acquire(p.barrier) ^ old) & 0x80000000u) == 0; ++polls)
      if (polls % 64 == 0 && global_ns() - start > kHangNs) __trap();
    if (p.sc_fences) __threadfence();
  }
  consumer_sync();
}

__device__ __forceinline__ void stamp(const LayerParams& p, int layer, int event, long long value) {
  if (p.trace != nullptr && threadIdx.x == 0)
    p.trace[(static_cast<int64_t>(blockIdx.x) * p.layers + layer) * kTraceEvents + event] = value;
}

// --- item list ------------------------------------------------------------------------------

struct Item {
  int layer, phase, tile, slice;
};

__device__ __forceinline__ Item decode_item(const LayerParams& p, int64_t i) {
  Item it;
  it.layer = static_cast<int>(i / p.layer_items);
  int r = static_cast<int>(i - static_cast<int64_t>(it.layer) * p.layer_items);
  it.phase = kQkv;
  while (it.phase + 1 < kPhases && r >= p.first[it.phase + 1]) ++it.phase;
  r -= p.first[it.phase];
  it.tile = r / p.slices[it.phase];
  it.slice = r % p.slices[it.phase];
  return it;
}

// First item of `phase` of `layer` that this block owns.
__device__ __forceinline__ int64_t first_owned(const LayerParams& p, int layer, int phase) {
  const int64_t base = static_cast<int64_t>(layer) * p.layer_items + p.first[phase];
  const int64_t g = gridDim.x;
  return base + ((static_cast<int64_t>(blockIdx.x) - base) % g + g) % g;
}

// --- producer warp -----------------------------------------------------------------------

__device__ __forceinline__ void produce(const LayerParams& p, uint8_t* ring, uint64_t* full, uint64_t* empty) {
  const int lane = threadIdx.x & 31;
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  int k = 0;
  for (int64_t i = blockIdx.x; i < p.total_items; i += gridDim.x, ++k) {
    const int slot = k % p.slots;
    if (k >= p.slots) mbar_wait(&empty[slot], ((k / p.slots) - 1) & 1);
    if (p.in_flight < p.slots && k >= p.in_flight) {
      const int prev = k - p.in_flight;
      mbar_wait(&full[prev % p.slots], (prev / p.slots) & 1);
    }
    const Item it = decode_item(p, i);
    const int64_t k_elems = p.k[it.phase];
    const uint8_t* src = reinterpret_cast<const uint8_t*>(p.layer[it.layer].w[it.phase]) +
                         (static_cast<int64_t>(it.tile) * kTileRows * k_elems + it.slice * kHidden) * 2;
    if (lane == 0) mbar_expect_tx(&full[slot], kTileRows * kSliceBytes);
    __syncwarp();
    if (lane < kTileRows)
      bulk_copy(ring + slot * kSlotBytes + lane * kSlotStride, src + lane * k_elems * 2, kSliceBytes, &full[slot],
                policy);
  }
}

// --- consumers: GEMV phases ------------------------------------------------------------------

// x of the block's K slice in mma B-fragment order: chunk i, token tile j holds tokens
// 8 j + g at k = 128 warp + 32 i + 8 c .. + 8 (lane = 4 g + c).
template <int kMT>
struct XFrag {
  uint4 v[kChunks][kMT];
};

struct Consumer {
  uint8_t* ring;
  uint64_t* full;
  uint64_t* empty;
  float4* red;       // [2][kWarps][kMT * 32]
  float* norm_part;  // [kWarps][kMaxM]
  float* norm_vec;   // [2][kHidden]: norm weight, shift
  int* flags;        // [32]
  int* positions;    // [kMaxM]: token positions (read once per launch)
  int item;          // items consumed so far (ring position)
  int red_buf;
};

// Loads x rows [0, M) of `src` at k [k0, k0 + 1024) into fragments; with a norm, the
// row RMS over all of the row (k0 = 0, the row is 1024 wide), the norm and the modulation
// are applied and the result rounded to bf16 (the activations the twin's GEMM sees).
template <int kMT>
__device__ __forceinline__ void stage_x(const LayerParams& p, Consumer& cs, const __nv_bfloat16* src, int64_t row_stride, int k0,
                        const float* norm_weight, const float* norm_shift, XFrag<kMT>& x) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int kl = warp * kWarpK + 8 * c;
#pragma unroll
  for (int i = 0; i < kChunks; ++i)
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
      const int t = 8 * j + g;
      x.v[i][j] = t < p.m ? ldcg16(src + t * row_stride + k0 + kl + 32 * i) : make_uint4(0, 0, 0, 0);
    }
  if (norm_weight == nullptr) return;
  // norm vectors through shared memory (in flight with x; registers are scarce here)
  for (int i = threadIdx.x; i < kHidden / 4; i += kConsumers) {
    copy_async16(cs.norm_vec + 4 * i, norm_weight + 4 * i, 16);
    if (norm_shift != nullptr) copy_async16(cs.norm_vec + kHidden + 4 * i, norm_shift + 4 * i, 16);
  }
  copy_async_commit();
  float ss[kMT];
#pragma unroll
  for (int j = 0; j < kMT; ++j) {
    ss[j] = 0.f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&x.v[i][j]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(h2[e]);
        ss[j] += f.x * f.x + f.y * f.y;
      }
    }
    ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 1);
    ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 2);
    if (c == 0) cs.norm_part[warp * kMaxM + 8 * j + g] = ss[j];
  }
  copy_async_wait<0>();
  consumer_sync();
#pragma unroll
  for (int j = 0; j < kMT; ++j) {
    float total = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) total += cs.norm_part[v * kMaxM + 8 * j + g];
    const float rms = rsqrtf(total / static_cast<float>(kHidden) + p.eps);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      __nv_bfloat162* h2 = reinterpret_cast<__nv_bfloat162*>(&x.v[i][j]);
      const float* w = cs.norm_vec + kl + 32 * i;
      const float* sh = w + kHidden;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = __bfloat1622float2(h2[e]);
        float y0 = f.x * rms * (1.f + w[2 * e]);
        float y1 = f.y * rms * (1.f + w[2 * e + 1]);
        if (norm_shift != nullptr) {
          y0 += sh[2 * e];
          y1 += sh[2 * e + 1];
        }
        h2[e] = __floats2bfloat162_rn(y0, y1);
      }
    }
  }
  // norm_part / norm_vec are rewritten by the next staging only after an item's barrier
}

// acc = W item (16 rows of the slot) x x^T for this warp's k range.
template <int kMT>
__device__ __forceinline__ void mma_item(const uint8_t* slot, const XFrag<kMT>& x, float (&acc)[kMT][4]) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const uint8_t* w_lane = slot + (lane >> 2) * kSlotStride + (warp * kWarpK + 8 * (lane & 3)) * 2;
#pragma unroll
  for (int j = 0; j < kMT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const uint4 r0 = load_shared16(w_lane + i * 64);
    const uint4 r1 = load_shared16(w_lane + 8 * kSlotStride + i * 64);
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
      mma_bf16_16x8x16(acc[j], r0.x, r1.x, r0.y, r1.y, x.v[i][j].x, x.v[i][j].y);
      mma_bf16_16x8x16(acc[j], r0.z, r1.z, r0.w, r1.w, x.v[i][j].z, x.v[i][j].w);
    }
  }
}

// Accumulator item (token tile j, lane l) of a tile: rows na = 16 tile + g and nb = na + 8,
// tokens t0 = 8 j + 2 c (v.x, v.z) and t0 + 1 (v.y, v.w).
struct ItemPos {
  int g, t0;
  __device__ explicit ItemPos(int item) : g((item & 31) >> 2), t0(8 * (item >> 5) + 2 * (item & 3)) {}
};

// Where this epilogue thread's cos / sin live (dim d of the tile, tokens t0, t0 + 1; -1:
// a token past M or a position outside [0, max_pos), which rotates by NaN).
struct RopeRows {
  int64_t at[2];
  __device__ RopeRows(const LayerParams& p, const int* positions, int tile, int item) {
    const ItemPos ip(item);
    const int d = (tile % (kHeadDim / kTileRows)) * 8 + ip.g;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int t = ip.t0 + u;
      const int pos = t < p.m ? positions[t] : -1;
      at[u] = pos >= 0 && pos < p.max_pos ? static_cast<int64_t>(pos) * (kHeadDim / 2) + d : -1;
    }
  }
};

// The item's cos / sin into L1 ahead of its epilogue (issued before the MMA: no
// registers held across it, and the epilogue's loads do not wait on L2).
__device__ __forceinline__ void prefetch_rope(const LayerParams& p, const RopeRows& rows) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    if (rows.at[u] < 0) continue;
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p.cos + rows.at[u]));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p.sin + rows.at[u]));
  }
}

// RoPE'd q -> q workspace (times q_scale); RoPE'd k and v -> cache rows cache_offset + t.
__device__ __forceinline__ void qkv_epilogue(const LayerParams& p, const LayerWeights& lw, int tile, int item, float4 v,
                                             const RopeRows& rows, int cache_offset) {
  const ItemPos ip(item);
  constexpr int kTilesPerHead = kHeadDim / kTileRows;
  constexpr int kHalf = kHeadDim / 2;
  const int head = tile / kTilesPerHead;
  const int d = (tile % kTilesPerHead) * 8 + ip.g;
  const bool rotate = head < p.num_q_heads + p.num_kv_heads;
  float a[2] = {v.x, v.y};  // dim d, tokens t0, t0 + 1
  float b[2] = {v.z, v.w};  // dim d + D/2
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int t = ip.t0 + u;
    if (t >= p.m) continue;
    if (rotate) {
      const float cs = rows.at[u] >= 0 ? __ldg(p.cos + rows.at[u]) : NAN;
      const float sn = rows.at[u] >= 0 ? __ldg(p.sin + rows.at[u]) : NAN;
      const float ra = rope_first(a[u], b[u], cs, sn);
      const float rb = rope_second(a[u], b[u], cs, sn);
      a[u] = ra;
      b[u] = rb;
    }
    if (head < p.num_q_heads) {
      __nv_bfloat16* q = p.q + (static_cast<int64_t>(t) * p.num_q_heads + head) * kHeadDim + d;
      store_bf16(q, a[u] * p.q_scale);
      store_bf16(q + kHalf, b[u] * p.q_scale);
      continue;
    }
    const int64_t row = static_cast<int64_t>(cache_offset) + t;
    if (row < 0 || row >= p.cache_rows) continue;
    const int kv_head = head - p.num_q_heads - (rotate ? 0 : p.num_kv_heads);
    __nv_bfloat16* cache = (rotate ? lw.k_cache : lw.v_cache) + (row * p.num_kv_heads + kv_head) * kHeadDim + d;
    store_bf16(cache, a[u]);
    store_bf16(cache + kHalf, b[u]);
  }
}

// h[t, 8 tile + g] = gelu_tanh(gate) * up: rows na / nb are a gate / up pair (pack_gate_up).
__device__ __forceinline__ void gelu_epilogue(const LayerParams& p, int tile, int item, float4 v) {
  const ItemPos ip(item);
  const float a[2] = {v.x, v.y}, b[2] = {v.z, v.w};
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int t = ip.t0 + u;
    if (t < p.m) store_bf16(p.h + static_cast<int64_t>(t) * p.mlp + tile * 8 + ip.g, gelu_tanh(a[u]) * b[u]);
  }
}

// What a residual epilogue reads besides the sums: res at rows na = 16 tile + g and
// nb = na + 8 for tokens t0, t0 + 1, and the gates of na, nb (loaded together, before
// the sums are, so that they cost no round trip of their own).
struct ResidualIn {
  float ra[2], rb[2], ga, gb;
};

__device__ __forceinline__ ResidualIn load_residual(const LayerParams& p, const float* gate, int tile, int item) {
  const ItemPos ip(item);
  const int na = tile * kTileRows + ip.g;
  const int nb = na + 8;
  ResidualIn in;
  in.ga = gate != nullptr ? __ldg(gate + na) : 1.f;
  in.gb = gate != nullptr ? __ldg(gate + nb) : 1.f;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int t = ip.t0 + u;
    in.ra[u] = t < p.m ? ldcg_bf16(p.res + t * kHidden + na) : 0.f;
    in.rb[u] = t < p.m ? ldcg_bf16(p.res + t * kHidden + nb) : 0.f;
  }
  return in;
}

// res[t, n] = bf16(res + gate[n] * acc) for rows na, nb.
__device__ __forceinline__ void residual_epilogue(const LayerParams& p, const ResidualIn& in, int tile, int item,
                                                  float4 v) {
  const ItemPos ip(item);
  const int na = tile * kTileRows + ip.g;
  const int nb = na + 8;
  const float a[2] = {v.x, v.y}, b[2] = {v.z, v.w};
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int t = ip.t0 + u;
    if (t >= p.m) continue;
    store_bf16(p.res + t * kHidden + na, in.ra[u] + in.ga * a[u]);
    store_bf16(p.res + t * kHidden + nb, in.rb[u] + in.gb * b[u]);
  }
}

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// Split K: the last slice of a tile to arrive adds the partials in slice order. The
// arrival releases this block's partials (ordered before it by the consumer_sync) and
// acquires the other slices' (read after the next consumer_sync).
template <int kMT>
__device__ __noinline__ void split_k_tail(const LayerParams& p, Consumer& cs, int layer, int phase) {
  constexpr int kItems = kMT * 32;
  const int tid = threadIdx.x;
  const int slices = p.slices[phase];
  const int64_t base = static_cast<int64_t>(layer) * p.layer_items + p.first[phase];
  const int64_t end = base + p.items[phase];
  const int64_t first = first_owned(p, layer, phase);
  const float* gate = p.layer[layer].gate[phase == kOProj ? 0 : 1];
  consumer_sync();  // this block's partials are written
  unsigned* counters = p.counters + (phase == kOProj ? 0 : kHidden / kTileRows);
  const int owned = first < end ? static_cast<int>((end - 1 - first) / gridDim.x) + 1 : 0;
  if (tid < owned) {
    const int tile = static_cast<int>(first + static_cast<int64_t>(tid) * gridDim.x - base) / slices;
    unsigned arrived;
    if (p.sc_fences) {
      __threadfence();
      arrived = atomicAdd(&counters[tile], 1u);
    } else {
      arrived = atomic_add_acq_rel(&counters[tile], 1u);
    }
    const bool last = arrived == static_cast<unsigned>(slices - 1);
    if (last) atomicExch(&counters[tile], 0u);  // ready for the next layer
    if (p.sc_fences) __threadfence();
    cs.flags[tid] = last ? tile : -1;
  }
  consumer_sync();
  for (int f = 0; f < owned; ++f) {
    const int tile = cs.flags[f];
    if (tile < 0 || tid >= kItems) continue;
    const ResidualIn in = load_residual(p, gate, tile, tid);
    const float4* part = p.partial + static_cast<int64_t>(tile) * slices * kPartItems + tid;
    float4 v = __ldcg(part);
#pragma unroll 4
    for (int s = 1; s < slices; ++s) v = add4(v, __ldcg(part + s * kPartItems));
    residual_epilogue(p, in, tile, tid, v);
  }
  // flags are rewritten only after the next grid barrier
}

// One GEMV phase of one layer: this block's items, in ring order.
template <int kMT>
__device__ __noinline__ void gemv_phase(const LayerParams& p, Consumer& cs, int layer, int phase) {
  const LayerWeights& lw = p.layer[layer];
  const int tid = threadIdx.x;
  const int slices = p.slices[phase];
  const int64_t base = static_cast<int64_t>(layer) * p.layer_items + p.first[phase];
  const int64_t end = base + p.items[phase];
  const int64_t first = first_owned(p, layer, phase);
  constexpr int kItems = kMT * 32;
  const int cache_offset = phase == kQkv ? *p.cache_offset : 0;
  const float* gate = phase == kOProj ? lw.gate[0] : lw.gate[1];

  XFrag<kMT> x;
  int staged = -1;
  long long waited = 0;
  if (first >= end) stamp(p, layer, kTraceStaged + phase, clock64());
  for (int64_t i = first; i < end; i += gridDim.x) {
    const int j = static_cast<int>(i - base);
    const int tile = j / slices;
    const int slice = j % slices;
    if (slice != staged) {
      switch (phase) {
        case kQkv:
          stage_x<kMT>(p, cs, p.res, kHidden, 0, lw.norm_weight[0], lw.norm_shift[0], x);
          break;
        case kOProj:
          stage_x<kMT>(p, cs, p.attn, static_cast<int64_t>(p.num_q_heads) * kHeadDim, slice * kHidden, nullptr,
                       nullptr, x);
          break;
        case kGateUp:
          stage_x<kMT>(p, cs, p.res, kHidden, 0, lw.norm_weight[1], lw.norm_shift[1], x);
          break;
        default: stage_x<kMT>(p, cs, p.h, p.mlp, slice * kHidden, nullptr, nullptr, x); break;
      }
      if (staged < 0) stamp(p, layer, kTraceStaged + phase, clock64());
      staged = slice;
    }
    if (tid < kItems && phase == kQkv) prefetch_rope(p, RopeRows(p, cs.positions, tile, tid));
    const int slot = cs.item % p.slots;
    const long long wait_start = clock64();
    mbar_wait(&cs.full[slot], (cs.item / p.slots) & 1);
    waited += clock64() - wait_start;
    float acc[kMT][4];
    mma_item<kMT>(cs.ring + slot * kSlotBytes, x, acc);
    float4* red = cs.red + cs.red_buf * kWarps * kItems;
    const int warp = tid >> 5;
#pragma unroll
    for (int jj = 0; jj < kMT; ++jj)
      red[(warp * kMT + jj) * 32 + (tid & 31)] = make_float4(acc[jj][0], acc[jj][1], acc[jj][2], acc[jj][3]);
    consumer_sync();  // every warp is done with the slot and has written its sums
    if (tid == 0) mbar_arrive(&cs.empty[slot]);
    ++cs.item;
    if (tid < kItems) {
      float4 v = red[tid];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v = add4(v, red[w * kItems + tid]);
      if (slices > 1) {
        p.partial[(static_cast<int64_t>(tile) * slices + slice) * kPartItems + tid] = v;
      } else if (phase == kQkv) {
        qkv_epilogue(p, lw, tile, tid, v, RopeRows(p, cs.positions, tile, tid), cache_offset);
      } else if (phase == kGateUp) {
        gelu_epilogue(p, tile, tid, v);
      } else {
        residual_epilogue(p, load_residual(p, gate, tile, tid), tile, tid, v);
      }
    }
    cs.red_buf ^= 1;  // the other buffer was last read before this item's barrier
  }
  stamp(p, layer, kTraceWeightWait + phase, waited);
  stamp(p, layer, kTraceItemsDone + phase, clock64());
  if (slices == 1 || phase == kQkv || phase == kGateUp) return;

  split_k_tail<kMT>(p, cs, layer, phase);
  // flags are rewritten only after the next grid barrier
}

// --- consumers: attention ------------------------------------------------------------------

// Query row r of kv head h: token r / group, query head h * group + r % group.
__device__ __forceinline__ int64_t q_row_offset(const LayerParams& p, int kv_head, int r) {
  return (static_cast<int64_t>(r / p.group) * p.num_q_heads + kv_head * p.group + r % p.group) * kHeadDim;
}

// Keys [key0, key0 + 32) of one KV head (past key_end zero-filled) into `dst`.
__device__ __forceinline__ void load_kv_tile(__nv_bfloat16* dst, const __nv_bfloat16* cache, const LayerParams& p,
                                             int kv_head, int key0, int key_end) {
  constexpr int kPieces = kHeadDim / 8;
  for (int i = threadIdx.x; i < kKeyTile * kPieces; i += kConsumers) {
    const int r = i / kPieces;
    const int piece = i % kPieces;
    const int key = key0 + r;
    const bool valid = key < key_end;
    const __nv_bfloat16* s =
        cache + (valid ? (static_cast<int64_t>(key) * p.num_kv_heads + kv_head) * kHeadDim + piece * 8 : 0);
    copy_async16(dst + r * kRowPad + piece * 8, s, valid ? 16 : 0);
  }
}

// One unit: 16 query rows of a KV head against one key chunk, online softmax over
// 32-key steps (the decode_attention scheme: S by 4 warps of 8 keys, P rounded to bf16,
// P.V by all 8 warps, 32 output columns each). Writes the unnormalised output and the
// row (max, sum) in log2 units.
__device__ __noinline__ void attention_unit(const LayerParams& p, const LayerWeights& lw, int unit, uint8_t* scratch) {
  using L = AttnSmem;
  auto* qs = reinterpret_cast<__nv_bfloat16*>(scratch + L::kQ);
  auto* ks = reinterpret_cast<__nv_bfloat16*>(scratch + L::kK);
  auto* vs = reinterpret_cast<__nv_bfloat16*>(scratch + L::kV);
  auto* ps = reinterpret_cast<__nv_bfloat16*>(scratch + L::kP);
  auto* red_max = reinterpret_cast<float*>(scratch + L::kRedMax);
  auto* red_sum = reinterpret_cast<float*>(scratch + L::kRedSum);
  auto* row_max = reinterpret_cast<float*>(scratch + L::kMax);
  auto* row_sum = reinterpret_cast<float*>(scratch + L::kSum);
  auto* alpha = reinterpret_cast<float*>(scratch + L::kAlpha);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int c = lane & 3;
  const int split = unit % p.attn_splits;
  const int row_block = (unit / p.attn_splits) % p.attn_row_blocks;
  const int kv_head = unit / (p.attn_splits * p.attn_row_blocks);
  const int row0 = row_block * kTileRows;
  const int key_begin = split * p.attn_chunk;
  const int key_end = min(p.keys, key_begin + p.attn_chunk);

  if (tid < kTileRows) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.f;
  }
  for (int i = tid; i < kTileRows * (kHeadDim / 8); i += kConsumers) {
    const int r = i / (kHeadDim / 8);
    const int piece = i % (kHeadDim / 8);
    const bool valid = row0 + r < p.attn_rows;
    const __nv_bfloat16* s = p.q + (valid ? q_row_offset(p, kv_head, row0 + r) + piece * 8 : 0);
    copy_async16(qs + r * kRowPad + piece * 8, s, valid ? 16 : 0);
  }

  const int a_row = lane & 15;
  const int a_col = (lane >> 4) * 8;
  const __nv_bfloat16* k_lane = ks + (warp * 8 + (lane & 7)) * kRowPad + (lane >> 3) * 8;
  const __nv_bfloat16* v_lane = vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * kRowPad + warp * 32 + (lane >> 4) * 8;
  float o[1][4][4] = {};
  for (int key0 = key_begin; key0 < key_end; key0 += kKeyTile) {
    load_kv_tile(ks, lw.k_cache, p, kv_head, key0, key_end);
    load_kv_tile(vs, lw.v_cache, p, kv_head, key0, key_end);
    copy_async_commit();
    // bias of this lane's scores: rows g, g + 8; keys 8 warp + 2 c (+1); log2 units
    float bias[2] = {-INFINITY, -INFINITY};
    if (warp < kScoreWarps) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = key0 + warp * 8 + 2 * c + e;
        if (key < key_end) bias[e] = p.key_bias != nullptr ? p.key_bias[key] * kLog2e : 0.f;
      }
    }
    copy_async_wait<0>();
    consumer_sync();  // Q, K and V are in

    float s[1][4] = {};
    if (warp < kScoreWarps) {
      qk_scores<1, kHeadDim>(s, qs + a_row * kRowPad + a_col, k_lane, kRowPad);
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][e] = s[0][e] * p.scale_log2 + bias[e & 1];
      const float m0 = quad_max(fmaxf(s[0][0], s[0][1]));
      const float m1 = quad_max(fmaxf(s[0][2], s[0][3]));
      if (c == 0) {
        red_max[warp * kTileRows + g] = m0;
        red_max[warp * kTileRows + g + 8] = m1;
      }
    }
    consumer_sync();
    if (tid < kTileRows) {
      float tile_max = red_max[tid];
#pragma unroll
      for (int w = 1; w < kScoreWarps; ++w) tile_max = fmaxf(tile_max, red_max[w * kTileRows + tid]);
      const float old_max = row_max[tid];
      const float new_max = fmaxf(old_max, tile_max);
      alpha[tid] = new_max == -INFINITY ? 1.f : exp2f(old_max - new_max);
      row_max[tid] = new_max;
    }
    consumer_sync();
    if (warp < kScoreWarps) {
      const float mx0 = row_max[g];
      const float mx1 = row_max[g + 8];
      const float p0 = exp2_shifted(s[0][0], mx0);
      const float p1 = exp2_shifted(s[0][1], mx0);
      const float p2 = exp2_shifted(s[0][2], mx1);
      const float p3 = exp2_shifted(s[0][3], mx1);
      const int col = warp * 8 + 2 * c;
      *reinterpret_cast<uint32_t*>(ps + g * kPRowPad + col) = pack_bf16x2(p0, p1);
      *reinterpret_cast<uint32_t*>(ps + (g + 8) * kPRowPad + col) = pack_bf16x2(p2, p3);
      const float s0 = quad_sum(p0 + p1);
      const float s1 = quad_sum(p2 + p3);
      if (c == 0) {
        red_sum[warp * kTileRows + g] = s0;
        red_sum[warp * kTileRows + g + 8] = s1;
      }
    }
    consumer_sync();  // P and the sums are in
    if (tid < kTileRows) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kScoreWarps; ++w) sum += red_sum[w * kTileRows + tid];
      row_sum[tid] = row_sum[tid] * alpha[tid] + sum;
    }
    pv_accumulate<1, kKeyTile>(o, alpha, ps + a_row * kPRowPad + a_col, kPRowPad, v_lane, kRowPad);
    consumer_sync();  // K, V, P and the row statistics are free again
  }

  float* out = p.attn_o + static_cast<int64_t>(unit) * kTileRows * kHeadDim;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = g + half * 8;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int d = warp * 32 + nt * 8 + 2 * c;
      *reinterpret_cast<float2*>(out + r * kHeadDim + d) = make_float2(o[0][nt][2 * half], o[0][nt][2 * half + 1]);
    }
  }
  if (tid < kTileRows) p.attn_ml[static_cast<int64_t>(unit) * kTileRows + tid] = make_float2(row_max[tid], row_sum[tid]);
  consumer_sync();  // row statistics are reset by the next unit
}

// Online-softmax state of one output quad: running max (log2 units), sum, output.
struct MergeState {
  float mx = -INFINITY, sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);

  // Folds in a part with max m, sum s and output o; a part with every key masked
  // (m = -inf) is skipped.
  __device__ __forceinline__ void add(float m, float s, float4 o) {
    if (m == -INFINITY) return;
    float w_old = 1.f, w_new = 1.f;
    if (m > mx) {
      w_old = mx == -INFINITY ? 0.f : exp2f(mx - m);
      mx = m;
    } else {
      w_new = exp2f(m - mx);
    }
    sum = sum * w_old + s * w_new;
    acc.x = acc.x * w_old + o.x * w_new;
    acc.y = acc.y * w_old + o.y * w_new;
    acc.z = acc.z * w_old + o.z * w_new;
    acc.w = acc.w * w_old + o.w * w_new;
  }
};

// Attention output [M, Hq * D] bf16 from the units' partials: per (token, head, 4
// columns), `merge_lanes` adjacent threads each fold key chunks lane, lane + lanes, ...
// in order (loads of up to 8 chunks issued together), then the lanes' states meet in a
// fixed shuffle tree; a row with every key masked is zero. The order depends on
// merge_lanes only, not on the grid.
__device__ __noinline__ void merge_phase(const LayerParams& p) {
  constexpr int kBatch = 8;
  const int lanes = p.merge_lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int groups = kConsumers / lanes;  // quads per block and round
  const int quads = kHeadDim / 4;
  const int total = p.m * p.num_q_heads * quads;
  for (int round = blockIdx.x * groups; round < total; round += gridDim.x * groups) {
    const int e = round + threadIdx.x / lanes;
    MergeState st;
    if (e < total) {
      const int t = e / (p.num_q_heads * quads);
      const int head = (e / quads) % p.num_q_heads;
      const int d = (e % quads) * 4;
      const int kv_head = head / p.group;
      const int r = t * p.group + head % p.group;
      const int unit0 = (kv_head * p.attn_row_blocks + r / kTileRows) * p.attn_splits;
      const int rr = r % kTileRows;
      for (int s0 = lane; s0 < p.attn_splits; s0 += kBatch * lanes) {
        float2 ml[kBatch];
        float4 ov[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (s0 + b * lanes >= p.attn_splits) break;
          const int64_t row = static_cast<int64_t>(unit0 + s0 + b * lanes) * kTileRows + rr;
          ml[b] = __ldcg(&p.attn_ml[row]);
          ov[b] = __ldcg(reinterpret_cast<const float4*>(p.attn_o + row * kHeadDim + d));
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (s0 + b * lanes >= p.attn_splits) break;
          st.add(ml[b].x, ml[b].y, ov[b]);
        }
      }
    }
    for (int offset = 1; offset < lanes; offset <<= 1) {
      const float m = __shfl_xor_sync(0xffffffffu, st.mx, offset);
      const float s = __shfl_xor_sync(0xffffffffu, st.sum, offset);
      float4 o;
      o.x = __shfl_xor_sync(0xffffffffu, st.acc.x, offset);
      o.y = __shfl_xor_sync(0xffffffffu, st.acc.y, offset);
      o.z = __shfl_xor_sync(0xffffffffu, st.acc.z, offset);
      o.w = __shfl_xor_sync(0xffffffffu, st.acc.w, offset);
      if ((lane & offset) == 0) st.add(m, s, o);
    }
    if (e >= total || lane != 0) continue;
    const int t = e / (p.num_q_heads * quads);
    const int head = (e / quads) % p.num_q_heads;
    const int d = (e % quads) * 4;
    const float inv = st.sum > 0.f ? 1.f / st.sum : 0.f;
    uint2 packed;
    packed.x = pack_bf16x2(st.acc.x * inv, st.acc.y * inv);
    packed.y = pack_bf16x2(st.acc.z * inv, st.acc.w * inv);
    *reinterpret_cast<uint2*>(p.attn + (static_cast<int64_t>(t) * p.num_q_heads + head) * kHeadDim + d) = packed;
  }
}

// This block's share of the layer's K / V rows [0, keys) into L2 (the prefix cache was
// written long ago; the weight stream has evicted it).
__device__ __forceinline__ void prefetch_kv(const LayerParams& p, const LayerWeights& lw) {
  const int64_t bytes = static_cast<int64_t>(p.keys) * p.num_kv_heads * kHeadDim * 2;
  const int64_t share = ((bytes + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
  const int64_t begin = blockIdx.x * share;
  if (begin >= bytes) return;
  const unsigned n = static_cast<unsigned>(std::min(share, bytes - begin));
  prefetch_l2_bulk(reinterpret_cast<const uint8_t*>(lw.k_cache) + begin, n);
  prefetch_l2_bulk(reinterpret_cast<const uint8_t*>(lw.v_cache) + begin, n);
}

// K / V of `layer` at its start, or (p.prefetch) of the next layer, a layer ahead (layer
// 0's come with prefetch_layer_inputs).
__device__ __noinline__ void prefetch_layer_kv(const LayerParams& p, int layer) {
  const int target = p.prefetch ? layer + 1 : layer;
  if (target < p.layers) prefetch_kv(p, p.layer[target]);
}

// Everything of every layer that is read but not produced in the launch and is not a
// weight into L2 now, marked evict-last (the weight stream is evict-first): norm vectors,
// gates, key bias, and layer 0's K / V. Later phases then find them in L2 instead of
// queueing a DRAM miss behind the weight stream on their critical path.
__device__ __noinline__ void prefetch_layer_inputs(const LayerParams& p) {
  constexpr int64_t kVectorBytes = kHidden * 4;
  const int rank = blockIdx.x * kConsumers + threadIdx.x;
  const int ranks = gridDim.x * kConsumers;
  int at = 0;  // vectors so far: spreads their lines over all threads
  for (int l = 0; l < p.layers; ++l) {
    const LayerWeights& lw = p.layer[l];
    const float* vectors[6] = {lw.norm_weight[0], lw.norm_shift[0], lw.gate[0],
                               lw.norm_weight[1], lw.norm_shift[1], lw.gate[1]};
    const bool kv_only = p.stop_after_kv && l == p.layers - 1;  // its post-attention pointers may be unset
#pragma unroll
    for (int i = 0; i < 6; ++i) {
      const int lines = static_cast<int>(kVectorBytes / 128);
      if (i < 3 || !kv_only) prefetch_l2_lines(vectors[i], kVectorBytes, ((rank - at * lines) % ranks + ranks) % ranks, ranks);
      ++at;
    }
  }
  if (threadIdx.x == 0) prefetch_l2_lines(p.key_bias, static_cast<int64_t>(p.keys) * 4, blockIdx.x, gridDim.x);
  if (threadIdx.x == 0) prefetch_kv(p, p.layer[0]);
}

template <int kMT>
__global__ void __launch_bounds__(kThreads, 1) expert_layer_kernel(const __grid_constant__ LayerParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring = smem;
  auto* full = reinterpret_cast<uint64_t*>(smem + p.slots * kSlotBytes);
  uint64_t* empty = full + kMaxSlots;
  uint8_t* scratch = smem + p.slots * kSlotBytes + kBarrierBytes;
  auto* misc = reinterpret_cast<float*>(scratch + kScratchBytes);

  if (threadIdx.x == 0) {
    for (int s = 0; s < p.slots; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  allow_consumer_launch();
  if (threadIdx.x >= kConsumers) {  // weights are never written by earlier kernels: no dependency wait
    produce(p, ring, full, empty);
    return;
  }
  wait_for_producer();

  if (p.prefetch) prefetch_layer_inputs(p);
  Consumer cs;
  cs.ring = ring;
  cs.full = full;
  cs.empty = empty;
  cs.red = reinterpret_cast<float4*>(scratch);
  cs.norm_part = misc;
  cs.flags = reinterpret_cast<int*>(misc + kWarps * kMaxM);
  cs.norm_vec = misc + kWarps * kMaxM + 32;
  cs.positions = reinterpret_cast<int*>(cs.norm_vec + 2 * kHidden);
  cs.item = 0;
  cs.red_buf = 0;
  if (threadIdx.x < p.m) cs.positions[threadIdx.x] = p.positions[threadIdx.x];
  consumer_sync();
  for (int layer = 0; layer < p.layers; ++layer) {
    const LayerWeights& lw = p.layer[layer];
    stamp(p, layer, kTraceStart, clock64());
    if (threadIdx.x == 0) prefetch_layer_kv(p, layer);
    gemv_phase<kMT>(p, cs, layer, kQkv);
    stamp(p, layer, kTraceQkv, clock64());
    if (p.stop_after_kv && layer == p.layers - 1) break;
    grid_barrier(p);
    stamp(p, layer, kTraceBarrier1, clock64());
    for (int unit = blockIdx.x; unit < p.attn_units; unit += gridDim.x) attention_unit(p, lw, unit, scratch);
    stamp(p, layer, kTraceAttention, clock64());
    grid_barrier(p);
    stamp(p, layer, kTraceBarrier2, clock64());
    merge_phase(p);
    stamp(p, layer, kTraceMerge, clock64());
    grid_barrier(p);
    stamp(p, layer, kTraceBarrier3, clock64());
    gemv_phase<kMT>(p, cs, layer, kOProj);
    stamp(p, layer, kTraceOProj, clock64());
    grid_barrier(p);
    stamp(p, layer, kTraceBarrier4, clock64());
    gemv_phase<kMT>(p, cs, layer, kGateUp);
    stamp(p, layer, kTraceGateUp, clock64());
    grid_barrier(p);
    stamp(p, layer, kTraceBarrier5, clock64());
    gemv_phase<kMT>(p, cs, layer, kDown);
    stamp(p, layer, kTraceDown, clock64());
    if (layer + 1 < p.layers) grid_barrier(p);
  }
#endif
}

// --- host side --------------------------------------------------------------------------------

using KernelFn = void (*)(LayerParams);

KernelFn pick(int64_t m) { return m <= 8 ? expert_layer_kernel<1> : expert_layer_kernel<2>; }

constexpr int64_t kAlign = 256;

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Workspace layout; byte offsets of each region and the total.
struct Workspace {
  int64_t counters, q, attn, h, partial, attn_o, attn_ml, total;
};

int64_t attention_units(int64_t m, int64_t keys, int64_t num_q_heads, int64_t num_kv_heads, int64_t chunk) {
  const int64_t rows = m * (num_q_heads / num_kv_heads);
  return num_kv_heads * ceil_div(rows, kTileRows) * ceil_div(keys, chunk);
}

Workspace workspace_layout(int64_t m, int64_t keys, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t hidden, int64_t mlp) {
  Workspace w;
  const int64_t tiles = hidden / kTileRows;
  const int64_t max_slices = std::max<int64_t>(num_q_heads * head_dim / hidden, mlp / hidden);
  const int64_t units = attention_units(m, keys, num_q_heads, num_kv_heads, kKeyTile);
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t offset = at;
    at = align_up(at + bytes);
    return offset;
  };
  take(4);  // grid barrier counter at 0
  w.counters = take(2 * tiles * 4);
  w.q = take(m * num_q_heads * head_dim * 2);
  w.attn = take(m * num_q_heads * head_dim * 2);
  w.h = take(m * mlp * 2);
  w.partial = take(max_slices * tiles * kPartItems * 16);
  w.attn_o = take(units * kTileRows * head_dim * 4);
  w.attn_ml = take(units * kTileRows * 8);
  w.total = at;
  return w;
}

std::string shape_problem(int64_t m, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t hidden,
                          int64_t mlp, int num_layers) {
  if (m < 1 || m > kMaxM) return "M must be in [1, 16], got " + std::to_string(m);
  if (hidden != kHidden) return "the expert width must be 1024, got " + std::to_string(hidden);
  if (head_dim != kHeadDim) return "head_dim must be 256, got " + std::to_string(head_dim);
  if (num_q_heads < 1 || num_kv_heads < 1 || num_q_heads % num_kv_heads)
    return "num_q_heads must be a positive multiple of num_kv_heads";
  if ((num_q_heads * head_dim) % kHidden || mlp <= 0 || mlp % kHidden)
    return "Hq * head_dim and the MLP width must be multiples of 1024";
  if (num_layers < 1 || num_layers > kMaxLayers) return "1 to 32 layers per launch";
  return "";
}

}  // namespace

int64_t expert_layer_workspace_bytes(int64_t m, int64_t keys, int64_t num_q_heads, int64_t num_kv_heads,
                                     int64_t head_dim, int64_t hidden, int64_t mlp) {
  return workspace_layout(m, keys, num_q_heads, num_kv_heads, head_dim, hidden, mlp).total;
}

std::string expert_layer_unsupported(int64_t m, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t hidden, int64_t mlp, int num_layers) {
  const std::string shape = shape_problem(m, num_q_heads, num_kv_heads, head_dim, hidden, mlp, num_layers);
  if (!shape.empty()) return shape;
  const DeviceInfo& dev = device_info();
  if (dev.cc_major < 9) return "needs sm_90+ (bulk copies, mbarrier transactions)";
  if (static_cast<size_t>(dev.max_smem_optin) < smem_bytes(kMaxSlots)) return "not enough shared memory per block";
  return "";
}

void expert_layer(const ExpertLayerArgs& a, void* stream) {
  const char* name = "expert_layer";
  const std::string problem = expert_layer_unsupported(a.m, a.num_q_heads, a.num_kv_heads, a.head_dim, a.hidden,
                                                       a.mlp, a.num_layers);
  require(problem.empty(), name, problem);
  require(a.norm == kPrologueRmsNorm || a.norm == kPrologueAdaRmsNorm, name, "norm must be RMS or adaRMS");
  require(a.res && aligned16(a.res), name, "res is required and must be 16-byte aligned");
  require(a.cos && a.sin && a.positions && a.cache_offset && a.max_pos > 0 && a.cache_rows > 0, name,
          "cos, sin, positions, cache_offset, max_pos and cache_rows are required");
  require(a.keys >= 1 && a.keys <= a.cache_rows, name, "keys must be in [1, cache_rows]");
  require(a.workspace && aligned16(a.workspace), name, "workspace is required and must be 16-byte aligned");
  const Workspace ws =
      workspace_layout(a.m, a.keys, a.num_q_heads, a.num_kv_heads, a.head_dim, a.hidden, a.mlp);
  require(a.workspace_bytes >= ws.total, name,
          "workspace holds " + std::to_string(a.workspace_bytes) + " bytes, needs " + std::to_string(ws.total));
  for (int l = 0; l < a.num_layers; ++l) {
    const ExpertLayerPointers& lp = a.layers[l];
    const bool last_kv_only = a.stop_after_kv && l == a.num_layers - 1;
    require(lp.qkv && aligned16(lp.qkv) && lp.k_cache && aligned16(lp.k_cache) && lp.v_cache &&
                aligned16(lp.v_cache) && lp.norm_in_weight && aligned16(lp.norm_in_weight),
            name, "layer " + std::to_string(l) + ": qkv, caches and norm_in are required, 16-byte aligned");
    require(a.norm == kPrologueRmsNorm || (lp.norm_in_shift && aligned16(lp.norm_in_shift)), name,
            "adaRMS needs 16-byte aligned shifts");
    if (last_kv_only) continue;
    require(lp.o && lp.gate_up && lp.down && aligned16(lp.o) && aligned16(lp.gate_up) && aligned16(lp.down) &&
                lp.norm_post_weight && aligned16(lp.norm_post_weight),
            name, "layer " + std::to_string(l) + ": o, gate_up, down and norm_post are required, 16-byte aligned");
    require(a.norm == kPrologueRmsNorm || (lp.norm_post_shift && aligned16(lp.norm_post_shift)), name,
            "adaRMS needs 16-byte aligned shifts");
  }
  const int slots = a.ring_slots > 0 ? a.ring_slots : kMaxSlots;
  require(slots >= 2 && slots <= kMaxSlots, name, "ring_slots must be in [2, 5]");
  const int in_flight = a.in_flight > 0 ? std::min(a.in_flight, slots) : 3;
  const int64_t chunk = a.attn_chunk > 0 ? a.attn_chunk : kKeyTile;
  require(chunk % kKeyTile == 0, name, "attn_chunk must be a multiple of 32");
  const int merge_lanes = a.merge_lanes > 0 ? a.merge_lanes : 4;
  require(merge_lanes == 1 || merge_lanes == 2 || merge_lanes == 4 || merge_lanes == 8, name,
          "merge_lanes must be 1, 2, 4 or 8");

  const KernelFn kernel = pick(a.m);
  const size_t smem = smem_bytes(slots);
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, name);
  const DeviceInfo& dev = device_info();
  const int resident = resident_blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, smem) * dev.sms;
  require(resident >= 1, name, "the kernel does not fit on an SM");
  int grid = a.grid > 0 ? a.grid : dev.sms;
  require(grid <= resident, name, "grid " + std::to_string(grid) + " exceeds the co-resident blocks (" +
                                      std::to_string(resident) + ")");
  // each block flags its split-K tiles in a 32-entry table: at most 32 items per phase
  const int64_t split_items = std::max(kHidden / kTileRows * a.num_q_heads * kHeadDim / kHidden,
                                       kHidden / kTileRows * a.mlp / kHidden);
  require(grid >= ceil_div(split_items, 32), name, "grid must be at least " + std::to_string(ceil_div(split_items, 32)));
  require(a.trace == nullptr || a.trace_len >= static_cast<int64_t>(grid) * a.num_layers * kTraceEvents, name,
          "trace needs grid x layers x " + std::to_string(kTraceEvents) + " entries");

  LayerParams p = {};
  p.res = static_cast<__nv_bfloat16*>(a.res);
  p.m = static_cast<int>(a.m);
  p.layers = a.num_layers;
  p.stop_after_kv = a.stop_after_kv ? 1 : 0;
  p.num_q_heads = static_cast<int>(a.num_q_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_q_heads / a.num_kv_heads);
  p.mlp = static_cast<int>(a.mlp);
  const int tiles = kHidden / kTileRows;
  p.k[kQkv] = kHidden;
  p.k[kOProj] = static_cast<int>(a.num_q_heads * kHeadDim);
  p.k[kGateUp] = kHidden;
  p.k[kDown] = static_cast<int>(a.mlp);
  p.slices[kQkv] = 1;
  p.slices[kOProj] = p.k[kOProj] / kHidden;
  p.slices[kGateUp] = 1;
  p.slices[kDown] = p.k[kDown] / kHidden;
  p.items[kQkv] = static_cast<int>((a.num_q_heads + 2 * a.num_kv_heads) * kHeadDim / kTileRows);
  p.items[kOProj] = tiles * p.slices[kOProj];
  p.items[kGateUp] = static_cast<int>(2 * a.mlp / kTileRows);
  p.items[kDown] = tiles * p.slices[kDown];
  p.layer_items = 0;
  for (int ph = 0; ph < kPhases; ++ph) {
    p.first[ph] = p.layer_items;
    p.layer_items += p.items[ph];
  }
  p.total_items = p.layer_items * (a.num_layers - 1) + (a.stop_after_kv ? p.items[kQkv] : p.layer_items);
  p.eps = a.eps;
  p.cos = a.cos;
  p.sin = a.sin;
  p.max_pos = static_cast<int>(a.max_pos);
  p.positions = a.positions;
  p.cache_offset = a.cache_offset;
  p.cache_rows = a.cache_rows;
  p.key_bias = a.key_bias;
  p.keys = static_cast<int>(a.keys);
  p.q_scale = a.q_scale;
  p.scale_log2 = a.attn_scale * kLog2e;
  p.attn_rows = static_cast<int>(a.m * p.group);
  p.attn_row_blocks = static_cast<int>(ceil_div(p.attn_rows, kTileRows));
  p.attn_chunk = static_cast<int>(chunk);
  p.attn_splits = static_cast<int>(ceil_div(a.keys, chunk));
  p.attn_units = static_cast<int>(attention_units(a.m, a.keys, a.num_q_heads, a.num_kv_heads, chunk));
  p.slots = slots;
  p.in_flight = in_flight;
  p.merge_lanes = merge_lanes;
  p.sc_fences = a.sc_fences ? 1 : 0;
  p.prefetch = a.prefetch ? 1 : 0;
  auto* base = static_cast<uint8_t*>(a.workspace);
  p.barrier = reinterpret_cast<unsigned*>(base);
  p.counters = reinterpret_cast<unsigned*>(base + ws.counters);
  p.q = reinterpret_cast<__nv_bfloat16*>(base + ws.q);
  p.attn = reinterpret_cast<__nv_bfloat16*>(base + ws.attn);
  p.h = reinterpret_cast<__nv_bfloat16*>(base + ws.h);
  p.partial = reinterpret_cast<float4*>(base + ws.partial);
  p.attn_o = reinterpret_cast<float*>(base + ws.attn_o);
  p.attn_ml = reinterpret_cast<float2*>(base + ws.attn_ml);
  p.trace = a.trace;
  for (int l = 0; l < a.num_layers; ++l) {
    const ExpertLayerPointers& lp = a.layers[l];
    LayerWeights& lw = p.layer[l];
    lw.w[kQkv] = static_cast<const __nv_bfloat16*>(lp.qkv);
    lw.w[kOProj] = static_cast<const __nv_bfloat16*>(lp.o);
    lw.w[kGateUp] = static_cast<const __nv_bfloat16*>(lp.gate_up);
    lw.w[kDown] = static_cast<const __nv_bfloat16*>(lp.down);
    lw.norm_weight[0] = lp.norm_in_weight;
    lw.norm_weight[1] = lp.norm_post_weight;
    const bool ada = a.norm == kPrologueAdaRmsNorm;
    lw.norm_shift[0] = ada ? lp.norm_in_shift : nullptr;
    lw.norm_shift[1] = ada ? lp.norm_post_shift : nullptr;
    lw.gate[0] = lp.gate_in;
    lw.gate[1] = lp.gate_post;
    lw.k_cache = static_cast<__nv_bfloat16*>(lp.k_cache);
    lw.v_cache = static_cast<__nv_bfloat16*>(lp.v_cache);
  }
  launch(name, kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), smem, stream,
         LaunchOptions{1, a.pdl, a.cooperative}, p);
}

}  // namespace expert
}  // namespace flashrt
