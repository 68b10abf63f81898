// Row normalization kernels: RMSNorm (Gemma 1+w), fused residual add, adaRMS
// modulation, gated residual (Pi0.5 expert), LayerNorm (SigLIP). One block per row;
// each thread keeps its chunks of the row in registers between the reduction and the
// output, so the row is read once and written once.
#include "common.cuh"
#include "launchers.h"

namespace flashrt {
namespace {

// Chunks of 8 per thread kept in registers: D <= 8 * 4 * 512 = 16384. (512 threads
// leave 128 registers per thread; 1024 would cap at 64 and spill the row.)
constexpr int kMaxChunksPerThread = 4;
constexpr int kMaxThreads = 512;

struct RowNormKernelArgs {
  RowNormArgs a;
  bool vec;
};

template <typename T, bool FP8, bool LAYER>
__global__ void __launch_bounds__(kMaxThreads) row_norm_kernel(const RowNormKernelArgs args) {
  __shared__ float scratch[32];
  const RowNormArgs& a = args.a;
  const bool vec = args.vec;
  const int64_t D = a.dim;
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * D;
  const T* __restrict__ x = static_cast<const T*>(a.x) + row_off;
  T* __restrict__ res = a.residual ? static_cast<T*>(a.residual) + row_off : nullptr;

  if (a.out != nullptr && static_cast<int64_t>(threadIdx.x) * kChunk < D) {
    const int64_t c0 = static_cast<int64_t>(threadIdx.x) * kChunk;
    for (const void* p : {a.weight, a.mod_scale, a.shift})
      if (p != nullptr) prefetch_l2(dyn_at(p, a.param_dtype, c0));
  }

  float h[kMaxChunksPerThread][kChunk];
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxChunksPerThread; ++k) {
    const int64_t c0 = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * kChunk;
    const int64_t valid = D - c0;
    if (valid > 0) {
      load_chunk(x + c0, valid, vec, h[k]);
      if (res) {
        float r[kChunk];
        load_chunk(res + c0, valid, vec, r);
        if (a.gate) {
          float g[kChunk];
          load_chunk_dyn(dyn_at(a.gate, a.param_dtype, c0), a.param_dtype, valid, vec, g);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) r[i] += h[k][i] * g[i];
        } else {
#pragma unroll
          for (int i = 0; i < kChunk; ++i) r[i] += h[k][i];
        }
        // Normalize what the residual stream now holds (rounded to T), exactly as a
        // separate add followed by a norm would.
#pragma unroll
        for (int i = 0; i < kChunk; ++i) h[k][i] = round_to<T>(r[i]);
        store_chunk(res + c0, valid, vec, h[k]);
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc += LAYER ? h[k][i] : h[k][i] * h[k][i];
    }
  }
  if (a.out == nullptr) return;  // gated_add: residual update only (uniform per launch)

  float mean = 0.f;
  float rstd;
  const float inv_d = 1.0f / static_cast<float>(D);
  if constexpr (LAYER) {
    mean = block_sum(acc, scratch) * inv_d;
    float var = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxChunksPerThread; ++k) {
      const int64_t c0 = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * kChunk;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float d = h[k][i] - mean;
        if (c0 + i < D) var += d * d;
      }
    }
    rstd = rsqrtf(block_sum(var, scratch) * inv_d + a.eps);
  } else {
    rstd = rsqrtf(block_sum(acc, scratch) * inv_d + a.eps);
  }

  const float inv_scale = FP8 ? load_inv_scale(a.out_scale) : 1.f;
#pragma unroll
  for (int k = 0; k < kMaxChunksPerThread; ++k) {
    const int64_t c0 = (static_cast<int64_t>(threadIdx.x) + static_cast<int64_t>(k) * blockDim.x) * kChunk;
    const int64_t valid = D - c0;
    if (valid <= 0) continue;
    float y[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) y[i] = (h[k][i] - mean) * rstd;
    float p[kChunk];
    if (a.weight) {
      load_chunk_dyn(dyn_at(a.weight, a.param_dtype, c0), a.param_dtype, valid, vec, p);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) y[i] *= a.weight_offset + p[i];
    }
    if (a.mod_scale) {
      load_chunk_dyn(dyn_at(a.mod_scale, a.param_dtype, c0), a.param_dtype, valid, vec, p);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) y[i] *= 1.f + p[i];
    }
    if (a.shift) {
      load_chunk_dyn(dyn_at(a.shift, a.param_dtype, c0), a.param_dtype, valid, vec, p);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) y[i] += p[i];
    }
    OutStore<T, FP8>::store(a.out, row_off + c0, valid, vec, inv_scale, y);
  }
}

}  // namespace

void row_norm(const RowNormArgs& a, void* stream) {
  const char* name = a.layer_norm ? "layer_norm" : "rms_norm";
  require(a.dim > 0, name, "dim must be positive");
  require(a.rows >= 0 && a.rows <= 0x7fffffff, name, "rows out of range");
  require(a.dim <= static_cast<int64_t>(kChunk) * kMaxChunksPerThread * kMaxThreads, name,
          "dim " + std::to_string(a.dim) + " exceeds 16384");
  require(a.x != nullptr, name, "x is null");
  require(a.gate == nullptr || a.residual != nullptr, name, "gate needs a residual");
  require(a.out != nullptr || a.residual != nullptr, name, "nothing to write");
  require(a.out == nullptr || a.out_dtype == a.act_dtype || a.out_dtype == kFloat8E4M3, name,
          "out dtype must be the input dtype or float8_e4m3fn");
  require(a.out_dtype != kFloat8E4M3 || a.out_scale != nullptr, name, "FP8 output needs out_scale");
  const bool any_param = a.gate || a.weight || a.mod_scale || a.shift;
  require(!any_param || is_float_code(a.param_dtype), name, "unsupported parameter dtype");
  if (a.rows == 0) return;

  bool vec = a.dim % kChunk == 0;
  for (const void* p : {a.x, static_cast<const void*>(a.residual), a.gate, a.weight, a.mod_scale, a.shift,
                        static_cast<const void*>(a.out)}) {
    vec = vec && (p == nullptr || aligned16(p));
  }
  const int64_t chunks = ceil_div(a.dim, kChunk);
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(chunks, 32) * 32));
  const RowNormKernelArgs args{a, vec};
  const bool fp8 = a.out != nullptr && a.out_dtype == kFloat8E4M3;
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(a.act_dtype, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (a.layer_norm) {
      if (fp8) row_norm_kernel<T, true, true><<<grid, threads, 0, st>>>(args);
      else row_norm_kernel<T, false, true><<<grid, threads, 0, st>>>(args);
    } else {
      if (fp8) row_norm_kernel<T, true, false><<<grid, threads, 0, st>>>(args);
      else row_norm_kernel<T, false, false><<<grid, threads, 0, st>>>(args);
    }
  });
  check_launch(name);
}

}  // namespace flashrt
