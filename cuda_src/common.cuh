// Device helpers shared by every kernel file: dtype conversion, 8-element chunk
// loads/stores (one 16-byte access for 16-bit types), FP8 E4M3 output, reductions,
// and the host-side launch check.
//
// Chunk model: a row (or a flat tensor) is cut into chunks of 8 consecutive elements.
// A chunk is moved with vector accesses when the caller proved alignment (`vec`) and
// the chunk is full; otherwise element by element with bounds guards. That one path
// serves aligned rows, unaligned pointers and tails (D = 4304, odd D).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dtype_codes.h"

namespace flashrt {

constexpr int kChunk = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Value after a round trip through T: what a reader of the stored tensor sees.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// --- chunk loads -----------------------------------------------------------------

// Element i of a float tensor whose dtype code is only known at run time.
__device__ __forceinline__ const void* dyn_at(const void* p, int dtype, int64_t i) {
  return static_cast<const char*>(p) + i * (dtype == kFloat32 ? 4 : 2);
}

// Loads elements [0, valid) of a chunk at p; missing elements read as 0.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, int64_t valid, bool vec, float (&f)[kChunk]) {
  if (vec && valid >= kChunk) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(p)[0];
      const float4 b = reinterpret_cast<const float4*>(p)[1];
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) f[i] = to_float(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) f[i] = i < valid ? to_float(p[i]) : 0.f;
  }
}

// Same, with the element type chosen at run time (small per-feature vectors such as
// norm weights, gates, modulation: one uniform branch, no extra template instances).
__device__ __forceinline__ void load_chunk_dyn(const void* p, int dtype, int64_t valid, bool vec,
                                               float (&f)[kChunk]) {
  switch (dtype) {
    case kBFloat16: load_chunk(static_cast<const __nv_bfloat16*>(p), valid, vec, f); break;
    case kFloat16: load_chunk(static_cast<const __half*>(p), valid, vec, f); break;
    default: load_chunk(static_cast<const float*>(p), valid, vec, f); break;
  }
}

// Asks L2 for the 128-byte line holding p (no register, no wait): per-feature vectors
// needed after a row reduction arrive meanwhile instead of after it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// --- chunk stores ----------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, int64_t valid, bool vec, const float (&f)[kChunk]) {
  if (vec && valid >= kChunk) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
    } else {
      uint4 u;
      T* h = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) h[i] = from_float<T>(f[i]);
      *reinterpret_cast<uint4*>(p) = u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < valid) p[i] = from_float<T>(f[i]);
  }
}

// FP8 E4M3 output: q = saturate_e4m3(y * inv_scale), round to nearest even; NaN stays
// NaN, |values| beyond 448 become +-448 (the twin clamps, then casts: same result).
__device__ __forceinline__ __nv_fp8_storage_t to_e4m3(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// inv_scale from the device-resident scale (calibration may rewrite it between
// graph replays). IEEE division: the twin computes 1 / scale in fp32 too.
__device__ __forceinline__ float load_inv_scale(const float* scale) { return 1.0f / __ldg(scale); }

__device__ __forceinline__ void store_chunk_e4m3(__nv_fp8_storage_t* p, int64_t valid, bool vec, float inv_scale,
                                                 const float (&f)[kChunk]) {
  if (vec && valid >= kChunk) {
    uint2 u;
    __nv_fp8_storage_t* q = reinterpret_cast<__nv_fp8_storage_t*>(&u);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = to_e4m3(f[i] * inv_scale);
    *reinterpret_cast<uint2*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < valid) p[i] = to_e4m3(f[i] * inv_scale);
  }
}

// Output of a kernel whose result is either the activation dtype T or FP8.
template <typename T, bool FP8>
struct OutStore {
  __device__ __forceinline__ static void store(void* base, int64_t offset, int64_t valid, bool vec, float inv_scale,
                                               const float (&f)[kChunk]) {
    if constexpr (FP8) {
      store_chunk_e4m3(static_cast<__nv_fp8_storage_t*>(base) + offset, valid, vec, inv_scale, f);
    } else {
      store_chunk(static_cast<T*>(base) + offset, valid, vec, f);
    }
  }
};

// --- RoPE (rotate-half) ---------------------------------------------------------

// For a head row split in halves x1 | x2 and angle tables c, s at the token's position:
// first half x1*c - x2*s, second half x2*c + x1*s.
__device__ __forceinline__ float rope_first(float x1, float x2, float c, float s) { return x1 * c - x2 * s; }
__device__ __forceinline__ float rope_second(float x1, float x2, float c, float s) { return x2 * c + x1 * s; }

// cos/sin [max_pos, half] fp32 at row `pos`, elements j0.. of a chunk. A position
// outside the table gives NaN (a kernel cannot raise; NaN makes the fault visible).
__device__ __forceinline__ void load_rope_angles(const float* cos, const float* sin, int64_t pos, int64_t max_pos,
                                                 int64_t half, int64_t j0, int64_t valid, bool vec,
                                                 float (&c)[kChunk], float (&s)[kChunk]) {
  if (pos >= 0 && pos < max_pos) {
    load_chunk(cos + pos * half + j0, valid, vec, c);
    load_chunk(sin + pos * half + j0, valid, vec, s);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) c[i] = s[i] = __int_as_float(0x7fc00000);
  }
}

// --- reductions ------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32
// floats; it is reusable right after the call returns (the trailing barrier).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < nwarps ? scratch[lane] : 0.f;
  total = warp_sum(total);
  __syncthreads();
  return total;
}

// --- host side -------------------------------------------------------------------

// Raises with the kernel's name when the launch was rejected (bad config, no kernel
// image for this GPU, sticky error from an earlier fault). Never synchronizes, so it is
// legal during stream capture.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flashrt kernel ") + kernel + " failed to launch: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

inline void require(bool ok, const char* kernel, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("flashrt kernel ") + kernel + ": " + what);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the activation dtype code (fp32, bf16, fp16).
template <typename F>
void with_act_type(int dtype, const char* kernel, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    case kFloat16: f(TypeTag<__half>{}); break;
    default: require(false, kernel, "unsupported activation dtype code " + std::to_string(dtype));
  }
}

inline bool is_float_code(int dtype) { return dtype == kFloat32 || dtype == kBFloat16 || dtype == kFloat16; }

// Grid for flat grid-stride kernels: enough blocks to fill every SM a few times, no
// more (the loop covers the rest). The SM count is read once per device.
int grid_for(int64_t work_items, int threads);

}  // namespace flashrt
