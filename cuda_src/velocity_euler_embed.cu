// velocity_euler_embed: what a flow-matching step does outside the expert layers, in
// one launch (Pi0 / Pi0.5 action head, horizon <= 64):
//
//   h       = round(norm(res))                  the expert's final norm, rounded to bf16
//   v       = h @ W_out^T + b_out               velocity, fp32
//   x_t    += dt * v                            the Euler step, in place, fp32
//   embed   = round(x_t @ W_in^T + b_in)        the next step's action embedding (bf16)
//
// Either half may be absent: without res only the embedding runs (before the first
// step), without W_in no embedding (the last step; Pi0, whose embedding goes on
// through its time MLP). Before this kernel those were 6 launches a step (norm, two
// casts, two fp32 cuBLAS GEMMs, Euler), none of them PDL: 19 us of kernel time a step on
// the H100, against 8.4 us for this one (PDL off; 0.15 ms a Pi0.5 forward in all).
//
// One cluster of 8 blocks per group of up to 16 rows (rows are independent throughout).
// Every block of a cluster normalizes all of its group's rows (H x D is small), block c
// computes the velocity columns [c * A/8, ...) and writes its new x_t values into every
// block's shared memory (distributed shared memory); after the cluster barrier block c
// embeds output columns [c * D/8, ...). Eight SMs share the weight reads (2 x 128 KB
// fp32 at D = 1024, A = 32), which are constants: they go into registers before the PDL
// wait, so after it only res and x_t are read. (One cluster for all 50 rows of horizon 50
// took 23.8 us, every block normalizing every row; a cluster per group: 10.1 us.)
#include <cooperative_groups.h>

#include "expert_common.cuh"
#include "expert_launchers.h"

namespace flashrt {
namespace expert {
namespace {

namespace cg = cooperative_groups;

constexpr int kCluster = 8;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 64;  // 32 rows of each parity: one per lane in the velocity step
constexpr int kGroupRows = 16;  // at most this many rows per cluster
constexpr int kMaxDim = 1024;   // 8 float4 of a row per lane (k = 4 lane + 128 i)
constexpr int kMaxActions = 32;
constexpr int kDimChunks = kMaxDim / 128;
constexpr int kColumnsPerBlock = kMaxActions / kCluster;  // velocity columns, one warp each
constexpr int kEmbedThreads = kThreads / 2;               // threads per embedded row parity

struct Params {
  const __nv_bfloat16* res;  // [H, D] rows res_row_stride apart; null: embed only
  int64_t res_row_stride;
  int prologue;               // kPrologueRmsNorm: (1 + norm_weight); kPrologueAdaRmsNorm: + shift
  const float* norm_weight;   // [D] RMS weight or adaRMS scale
  const float* norm_shift;    // [D]
  float eps;
  const float* w_out;  // [A, D]
  const float* b_out;  // [A]
  float dt;
  float* x_t;          // [H, A]
  const float* w_in;   // [D, A]; null: no embedding
  const float* b_in;   // [D]
  __nv_bfloat16* out;  // [H, D] rows out_row_stride apart
  int64_t out_row_stride;
  int rows, dim, actions;
  int group_rows;  // rows per cluster (the last cluster's group may be shorter)
};

__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

__global__ void __launch_bounds__(kThreads) velocity_euler_embed_kernel(const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900  // clusters; never launched below (see _supported)
  extern __shared__ __align__(16) uint8_t smem[];
  float* x_s = reinterpret_cast<float*>(smem);                                        // [H, A]
  __nv_bfloat16* h_s = reinterpret_cast<__nv_bfloat16*>(x_s + p.group_rows * p.actions);  // [H, D]

  cg::cluster_group cluster = cg::this_cluster();
  const int block = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int D = p.dim, A = p.actions;
  const int row0 = static_cast<int>(blockIdx.x) / kCluster * p.group_rows;  // this cluster's rows
  const int H = min(p.group_rows, p.rows - row0);
  const int dim_chunks = D / 128;
  const bool velocity = p.res != nullptr;
  const __nv_bfloat16* res = velocity ? p.res + row0 * p.res_row_stride : nullptr;
  float* x_t = p.x_t + row0 * A;

  // --- constants, before the PDL wait -------------------------------------------------
  // Velocity: warp w owns column a = block * A/8 + w % 4 for rows of parity w / 4.
  const int per_block = (A + kCluster - 1) / kCluster;
  const int column = block * per_block + (warp % kColumnsPerBlock);
  const bool owns_column = velocity && warp % kColumnsPerBlock < per_block && column < A;
  float4 w_out[kDimChunks];
  float4 norm_w[kDimChunks], norm_b[kDimChunks];
#pragma unroll
  for (int i = 0; i < kDimChunks; ++i) {
    const int k = 4 * lane + 128 * i;
    if (owns_column && i < dim_chunks) w_out[i] = load4(p.w_out + static_cast<int64_t>(column) * D + k);
    if (velocity && i < dim_chunks) {
      norm_w[i] = load4(p.norm_weight + k);
      if (p.prologue == kPrologueAdaRmsNorm) norm_b[i] = load4(p.norm_shift + k);
    }
  }
  const float b_out = owns_column ? __ldg(p.b_out + column) : 0.f;
  // Embedding: thread t owns output column j = block * D/8 + t % 128 for rows of parity t / 128.
  const int embed_width = D / kCluster;
  const int j = block * embed_width + tid % kEmbedThreads;
  const bool owns_embed = p.w_in != nullptr && tid % kEmbedThreads < embed_width;
  float4 w_in[kMaxActions / 4];
#pragma unroll
  for (int i = 0; i < kMaxActions / 4; ++i)
    if (owns_embed && 4 * i < A) w_in[i] = load4(p.w_in + static_cast<int64_t>(j) * A + 4 * i);
  const float b_in = owns_embed ? __ldg(p.b_in + j) : 0.f;

  allow_consumer_launch();
  wait_for_producer();

  if (velocity) {
    // --- final norm of every row into h_s (bf16, as the unfused norm stored it) ----------
    for (int r = warp; r < H; r += kWarps) {
      const __nv_bfloat16* row = res + r * p.res_row_stride;
      float4 x[kDimChunks];
      float sq = 0.f;
#pragma unroll
      for (int i = 0; i < kDimChunks; ++i) {
        if (i < dim_chunks) {
          const uint2 u = *reinterpret_cast<const uint2*>(row + 4 * lane + 128 * i);
          const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&u.x);
          const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&u.y);
          x[i] = make_float4(__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi));
          sq += dot4(x[i], x[i]);
        }
      }
      const float rstd = rsqrtf(warp_sum(sq) * (1.0f / static_cast<float>(D)) + p.eps);
#pragma unroll
      for (int i = 0; i < kDimChunks; ++i) {
        if (i < dim_chunks) {
          float y[4] = {x[i].x * rstd, x[i].y * rstd, x[i].z * rstd, x[i].w * rstd};
          const float s[4] = {norm_w[i].x, norm_w[i].y, norm_w[i].z, norm_w[i].w};
#pragma unroll
          for (int e = 0; e < 4; ++e) y[e] *= 1.f + s[e];
          if (p.prologue == kPrologueAdaRmsNorm) {
            const float b[4] = {norm_b[i].x, norm_b[i].y, norm_b[i].z, norm_b[i].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) y[e] += b[e];
          }
          __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(y[0], y[1]), __floats2bfloat162_rn(y[2], y[3])};
          *reinterpret_cast<uint2*>(h_s + r * D + 4 * lane + 128 * i) = *reinterpret_cast<uint2*>(pair);
        }
      }
    }
    __syncthreads();

    // --- velocity and Euler step; the new x_t goes to every block of the cluster --------
    if (owns_column) {
      const int parity = warp / kColumnsPerBlock;
      float mine = 0.f;  // lane q keeps the velocity of its warp's q-th row
      for (int r = parity, q = 0; r < H; r += 2, ++q) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < kDimChunks; ++i) {
          if (i < dim_chunks) {
            const uint2 u = *reinterpret_cast<const uint2*>(h_s + r * D + 4 * lane + 128 * i);
            const __nv_bfloat162 lo = *reinterpret_cast<const __nv_bfloat162*>(&u.x);
            const __nv_bfloat162 hi = *reinterpret_cast<const __nv_bfloat162*>(&u.y);
            acc += dot4(make_float4(__low2float(lo), __high2float(lo), __low2float(hi), __high2float(hi)), w_out[i]);
          }
        }
        acc = warp_sum(acc);
        if (lane == q) mine = acc;
      }
      const int r = parity + 2 * lane;
      if (r < H) {
        float* x = x_t + r * A + column;
        const float updated = *x + p.dt * (mine + b_out);
        *x = updated;
        for (int rank = 0; rank < kCluster; ++rank) cluster.map_shared_rank(x_s, rank)[r * A + column] = updated;
      }
    }
  } else {
    for (int i = tid; i < H * A; i += kThreads) x_s[i] = x_t[i];
  }
  cluster.sync();  // every x_s column written (peers write into this block's x_s until here)

  // --- embedding of the new x_t ------------------------------------------------------------
  if (owns_embed) {
    for (int r = tid / kEmbedThreads; r < H; r += 2) {
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kMaxActions / 4; ++i)
        if (4 * i < A) acc += dot4(*reinterpret_cast<const float4*>(x_s + r * A + 4 * i), w_in[i]);
      p.out[(row0 + r) * p.out_row_stride + j] = __float2bfloat16_rn(acc + b_in);
    }
  }
#endif
}

}  // namespace

bool velocity_euler_embed_supported(int64_t rows, int64_t dim, int64_t actions) {
  return rows >= 1 && rows <= kMaxRows && dim % 128 == 0 && dim >= 128 && dim <= kMaxDim && actions >= 4 &&
         actions <= kMaxActions && actions % 4 == 0 && device_info().cc_major >= 9;
}

void velocity_euler_embed(const VelocityEulerEmbedArgs& a, void* stream) {
  const char* name = "velocity_euler_embed";
  require(velocity_euler_embed_supported(a.rows, a.dim, a.actions), name,
          "unsupported shape (rows <= 64, dim % 128 == 0 and <= 1024, actions % 4 == 0 and <= 32, sm_90+)");
  require(a.x_t != nullptr, name, "x_t is null");
  require(a.res != nullptr || a.w_in != nullptr, name, "nothing to do: neither res nor w_in");
  if (a.res != nullptr) {
    require(a.w_out != nullptr && a.b_out != nullptr, name, "the velocity needs w_out and b_out");
    require(a.norm_weight != nullptr, name, "the velocity needs the final norm's weight / scale");
    require(a.prologue == kPrologueRmsNorm || (a.prologue == kPrologueAdaRmsNorm && a.norm_shift != nullptr), name,
            "prologue must be RMS norm, or adaRMS norm with a shift");
    require(a.res_row_stride >= a.dim && a.res_row_stride % 4 == 0, name, "res rows must be 8-byte aligned");
  }
  if (a.w_in != nullptr) {
    require(a.b_in != nullptr && a.out != nullptr, name, "the embedding needs b_in and out");
    require(a.out_row_stride >= a.dim, name, "out rows overlap");
  }
  // float4 loads of the fp32 vectors and weight rows, 8-byte loads of the res rows
  for (const void* q : {static_cast<const void*>(a.norm_weight), static_cast<const void*>(a.norm_shift),
                        static_cast<const void*>(a.w_out), static_cast<const void*>(a.w_in)})
    require(q == nullptr || aligned16(q), name, "weights and norm vectors must be 16-byte aligned");
  require(a.res == nullptr || (reinterpret_cast<uintptr_t>(a.res) & 7u) == 0, name, "res must be 8-byte aligned");
  Params p{static_cast<const __nv_bfloat16*>(a.res), a.res_row_stride, a.prologue, a.norm_weight, a.norm_shift,
           a.eps, a.w_out, a.b_out, a.dt, a.x_t, a.w_in, a.b_in, static_cast<__nv_bfloat16*>(a.out),
           a.out_row_stride, static_cast<int>(a.rows), static_cast<int>(a.dim), static_cast<int>(a.actions), 0};
  // Groups of at most kGroupRows rows, as even as they come (50 rows: 4 clusters of 13 / 11).
  const int groups = static_cast<int>((a.rows + kGroupRows - 1) / kGroupRows);
  p.group_rows = static_cast<int>((a.rows + groups - 1) / groups);
  const size_t smem = sizeof(float) * p.group_rows * a.actions + sizeof(__nv_bfloat16) * p.group_rows * a.dim;
  allow_dynamic_smem(reinterpret_cast<const void*>(velocity_euler_embed_kernel), smem, name);
  launch(name, velocity_euler_embed_kernel, dim3(kCluster * groups), dim3(kThreads), smem, stream, kCluster, a.pdl,
         p);
}

}  // namespace expert
}  // namespace flashrt
