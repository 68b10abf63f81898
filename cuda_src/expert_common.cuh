// Pieces shared by the action-expert kernels (small_m_linear.cu, decode_attention.cu):
// bf16 tensor-core MMA, streaming / async loads, FP8 E4M3 -> bf16 widening,
// programmatic dependent launch (PDL) and a cluster-aware launch helper.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <map>
#include <utility>

#include "common.cuh"

namespace flashrt {
namespace expert {

// --- programmatic dependent launch (sm_90+; no-ops elsewhere) -----------------------

// Blocks until the grids this one depends on have finished and their writes are
// visible. Returns at once when the kernel was launched without PDL.
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next PDL-launched kernel in the stream start its prologue now. Safe at any
// point: that kernel still waits (wait_for_producer) for this grid to complete before
// it touches what this grid writes.
__device__ __forceinline__ void allow_consumer_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// --- loads ------------------------------------------------------------------------------

// 16 bytes of a read-once stream (weights): no L1 allocation, and a 256-byte L2 fetch
// so that the next three 64-byte pieces of the row are already on their way.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ uint4 load_shared16(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// cp.async of 16 bytes into shared memory; src_bytes 0 zero-fills the destination.
__device__ __forceinline__ void copy_async16(void* smem_dst, const void* src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

// --- tensor cores -------------------------------------------------------------------------

// c += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate.
__device__ __forceinline__ void mma_bf16_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// --- epilogue math ------------------------------------------------------------------------

__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

// --- attention tiles (decode_attention.cu) -----------------------------------------------
//
// Q, K, V and P staged in shared memory with padded rows; S = Q K^T and O += P V on
// mma.m16n8k16. Each warp scores 8 keys for every 16-row query tile and owns 32 output
// columns. Row statistics of an accumulator row live in the 4 lanes of a quad.

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// exp2(s - row_max); 0 while the row has no unmasked key (max -inf).
__device__ __forceinline__ float exp2_shifted(float s, float row_max) {
  return row_max == -INFINITY ? 0.f : exp2f(s - row_max);
}

// s[i] += Q rows [16 i, 16 i + 16) . the warp's 8 keys over kD dims. q_lane: this lane's
// ldmatrix address in Q tile 0 (row lane % 16, column 8 (lane / 16)); k_lane: in the K
// tile (key row lane % 8 of the warp's 8, column 8 (lane / 8)); rows `pad` elements apart.
template <int kMT, int kD>
__device__ __forceinline__ void qk_scores(float (&s)[kMT][4], const __nv_bfloat16* q_lane,
                                          const __nv_bfloat16* k_lane, int pad) {
#pragma unroll
  for (int kstep = 0; kstep < kD / 16; kstep += 2) {
    uint32_t kb[4];
    ldmatrix_x4(kb, k_lane + kstep * 16);
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
      uint32_t qa[4], qb[4];
      ldmatrix_x4(qa, q_lane + 16 * i * pad + kstep * 16);
      ldmatrix_x4(qb, q_lane + 16 * i * pad + (kstep + 1) * 16);
      mma_bf16_16x8x16(s[i], qa[0], qa[1], qa[2], qa[3], kb[0], kb[1]);
      mma_bf16_16x8x16(s[i], qb[0], qb[1], qb[2], qb[3], kb[2], kb[3]);
    }
  }
}

// o[i][nt] = o[i][nt] * alpha[row] + P rows [16 i, 16 i + 16) . V (kKeys keys) for the
// warp's columns; rows g, g + 8 of each tile (g = lane / 4). p_lane: ldmatrix address in P
// tile 0 (as q_lane); v_lane: transposed V rows (key 8 (lane / 8 % 2) + lane % 8, column
// 32 warp + 8 (lane / 16)).
template <int kMT, int kKeys>
__device__ __forceinline__ void pv_accumulate(float (&o)[kMT][4][4], const float* alpha, const __nv_bfloat16* p_lane,
                                              int p_pad, const __nv_bfloat16* v_lane, int v_pad) {
  const int g = (threadIdx.x & 31) >> 2;
  uint32_t pa[kMT][kKeys / 16][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
    const float a0 = alpha[16 * i + g];
    const float a1 = alpha[16 * i + g + 8];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      o[i][nt][0] *= a0;
      o[i][nt][1] *= a0;
      o[i][nt][2] *= a1;
      o[i][nt][3] *= a1;
    }
#pragma unroll
    for (int kstep = 0; kstep < kKeys / 16; ++kstep) ldmatrix_x4(pa[i][kstep], p_lane + 16 * i * p_pad + kstep * 16);
  }
#pragma unroll
  for (int kstep = 0; kstep < kKeys / 16; ++kstep) {
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_lane + kstep * 16 * v_pad + pair * 16);
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        mma_bf16_16x8x16(o[i][2 * pair], pa[i][kstep][0], pa[i][kstep][1], pa[i][kstep][2], pa[i][kstep][3], vb[0],
                         vb[1]);
        mma_bf16_16x8x16(o[i][2 * pair + 1], pa[i][kstep][0], pa[i][kstep][1], pa[i][kstep][2], pa[i][kstep][3],
                         vb[2], vb[3]);
      }
    }
  }
}

// --- FP8 E4M3 -> bf16 ---------------------------------------------------------------------

// Four E4M3 bytes e0..e3 of `u` -> bf16 pairs (e0, e1) and (e2, e3), exactly (every
// finite E4M3 value is a bf16 value). PRMT places each byte under a byte that
// replicates its sign; shifted left by 4 and masked, that is the bf16 with the same
// sign, exponent field eeee and mantissa mmm0000, i.e. the value times 2^-120 (the bias
// difference 127 - 7), subnormals included; one bf16 multiply by 2^120 restores it.
// NaN bytes are not preserved (quantized weights never hold NaN).
__device__ __forceinline__ void e4m3x4_to_bf16x4(uint32_t u, uint32_t& lo, uint32_t& hi) {
  uint32_t a, b;
  asm("prmt.b32 %0, %1, 0, 0x9180;" : "=r"(a) : "r"(u));
  asm("prmt.b32 %0, %1, 0, 0xB3A2;" : "=r"(b) : "r"(u));
  a = (a << 4) & 0x87F087F0u;
  b = (b << 4) & 0x87F087F0u;
  const __nv_bfloat162 two_pow_120 = __halves2bfloat162(__ushort_as_bfloat16(0x7B80), __ushort_as_bfloat16(0x7B80));
  const __nv_bfloat162 ra = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), two_pow_120);
  const __nv_bfloat162 rb = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&b), two_pow_120);
  lo = *reinterpret_cast<const uint32_t*>(&ra);
  hi = *reinterpret_cast<const uint32_t*>(&rb);
}

// --- host side ----------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0;
  int cc_major = 0;
  int max_smem_optin = 0;
};

// Read once per device; later calls are a table lookup (legal during graph capture).
inline const DeviceInfo& device_info() {
  constexpr int kMaxDevices = 64;
  static DeviceInfo table[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  cudaGetDevice(&dev);
  require(dev >= 0 && dev < kMaxDevices, "expert", "device index out of range");
  std::call_once(once[dev], [dev] {
    DeviceInfo& d = table[dev];
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  });
  return table[dev];
}

// Launches `kernel` on `stream` with `cluster_x` blocks per cluster along x (1: none) and,
// when `pdl`, programmatic stream serialization. Raises naming the kernel when the launch
// is rejected.
template <typename Kernel, typename... Args>
void launch(const char* name, Kernel kernel, dim3 grid, dim3 block, size_t smem, void* stream, int cluster_x,
            bool pdl, const Args&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attrs[2];
  int n = 0;
  if (cluster_x > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = static_cast<unsigned>(cluster_x);
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess) {
    cudaGetLastError();  // the error is reported here; do not leave it sticky
    throw std::runtime_error(std::string("flashrt kernel ") + name + " failed to launch: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

// Blocks of `kernel` resident per SM with `threads` threads and `smem` bytes of dynamic
// shared memory; 0 when it does not fit or the query fails (cached per kernel, device
// and size: a host query, legal during capture).
inline int resident_blocks_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<std::pair<const void*, int>, std::pair<int, size_t>>, int> cache;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(std::make_pair(kernel, dev), std::make_pair(threads, smem));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    blocks = 0;
  }
  cache[key] = blocks;
  return blocks;
}

// Raises the kernel's dynamic shared-memory limit to at least `bytes` (a host-side
// attribute, legal during capture; set once per kernel, device and growing size).
inline void allow_dynamic_smem(const void* kernel, size_t bytes, const char* name) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;  // per kernel and device
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{kernel, dev}];
  if (have >= bytes) return;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("flashrt kernel ") + name + ": cannot use " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  }
  have = bytes;
}

}  // namespace expert
}  // namespace flashrt
