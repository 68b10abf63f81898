// Flat and row-wise elementwise kernels: GELU-tanh (gated MLP activation and plain),
// FP8 quantize, absmax (calibration), Euler step, image -> patch rows. Grid-stride
// loops over 8-element chunks with 16-byte accesses where alignment allows.
#include "common.cuh"
#include "launchers.h"

namespace flashrt {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float gelu_tanh_f(float x) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), accurate tanhf (fp32 tolerance).
  const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T, bool FP8>
__global__ void __launch_bounds__(kThreads)
    gelu_tanh_kernel(const T* __restrict__ in, void* __restrict__ out, const float* __restrict__ out_scale,
                     int64_t rows, int64_t features, bool gated, bool vec) {
  const int64_t chunks_per_row = ceil_div(features, kChunk);
  const int64_t total = rows * chunks_per_row;
  const int64_t in_stride = gated ? 2 * features : features;
  const float inv_scale = FP8 ? load_inv_scale(out_scale) : 1.f;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t r = idx / chunks_per_row;
    const int64_t c0 = (idx - r * chunks_per_row) * kChunk;
    const int64_t valid = features - c0;
    const T* src = in + r * in_stride + c0;
    float y[kChunk];
    load_chunk(src, valid, vec, y);
    float up[kChunk];
    if (gated) load_chunk(src + features, valid, vec, up);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) y[i] = gelu_tanh_f(y[i]) * (gated ? up[i] : 1.f);
    OutStore<T, FP8>::store(out, r * features + c0, valid, vec, inv_scale, y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_fp8_kernel(const T* __restrict__ x, __nv_fp8_storage_t* __restrict__ out,
                        const float* __restrict__ scale, int64_t n, bool vec) {
  const float inv_scale = load_inv_scale(scale);
  const int64_t chunks = ceil_div(n, kChunk);
  for (int64_t idx = global_thread(); idx < chunks; idx += grid_threads()) {
    const int64_t c0 = idx * kChunk;
    float f[kChunk];
    load_chunk(x + c0, n - c0, vec, f);
    store_chunk_e4m3(out + c0, n - c0, vec, inv_scale, f);
  }
}

// Max over the bit patterns of |x|: for non-negative floats the unsigned order is the
// float order, and a NaN (exponent all ones, non-zero mantissa) beats every number, so
// NaN propagates like torch.amax does.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const T* __restrict__ x, unsigned* __restrict__ out, int64_t n, bool vec) {
  __shared__ unsigned warp_max[kThreads / 32];
  unsigned m = 0;
  const int64_t chunks = ceil_div(n, kChunk);
  for (int64_t idx = global_thread(); idx < chunks; idx += grid_threads()) {
    float f[kChunk];
    load_chunk(x + idx * kChunk, n - idx * kChunk, vec, f);  // missing elements read 0
#pragma unroll
    for (int i = 0; i < kChunk; ++i) m = max(m, __float_as_uint(fabsf(f[i])));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
    atomicMax(out, m);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    euler_step_kernel(T* __restrict__ x, const void* __restrict__ v, int v_dtype, float dt, int64_t n, bool vec) {
  const int64_t chunks = ceil_div(n, kChunk);
  for (int64_t idx = global_thread(); idx < chunks; idx += grid_threads()) {
    const int64_t c0 = idx * kChunk;
    float xf[kChunk];
    float vf[kChunk];
    load_chunk(x + c0, n - c0, vec, xf);
    load_chunk_dyn(dyn_at(v, v_dtype, c0), v_dtype, n - c0, vec, vf);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) xf[i] += dt * vf[i];
    store_chunk(x + c0, n - c0, vec, xf);
  }
}

// One thread per output element; writes are coalesced, reads gather 3-byte pixels
// (the whole input is a few hundred KB, read once).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    images_to_patches_kernel(const uint8_t* __restrict__ images, T* __restrict__ out, int64_t height, int64_t width,
                             int64_t channels, int64_t patch, int64_t total) {
  const int64_t grid_h = height / patch;
  const int64_t grid_w = width / patch;
  const int64_t row_len = channels * patch * patch;
  for (int64_t idx = global_thread(); idx < total; idx += grid_threads()) {
    const int64_t p = idx / row_len;
    const int64_t e = idx - p * row_len;
    const int64_t c = e / (patch * patch);
    const int64_t kh = (e / patch) % patch;
    const int64_t kw = e % patch;
    const int64_t view = p / (grid_h * grid_w);
    const int64_t ph = (p / grid_w) % grid_h;
    const int64_t pw = p % grid_w;
    const int64_t y = ph * patch + kh;
    const int64_t xw = pw * patch + kw;
    // In double, rounded once to fp32: the twin's table (reference.pixel_values) holds
    // exactly these values, whatever division a backend uses.
    const double px = static_cast<double>(images[((view * height + y) * width + xw) * channels + c]);
    out[idx] = from_float<T>(static_cast<float>(px / 255.0 * 2.0 - 1.0));
  }
}

}  // namespace

int grid_for(int64_t work_items, int threads) {
  constexpr int kMaxDevices = 64;
  static int sm_count[kMaxDevices] = {0};
  int device = 0;
  int sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < kMaxDevices) {
    if (sm_count[device] == 0) cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount, device);
    if (sm_count[device] > 0) sms = sm_count[device];
  }
  cudaGetLastError();  // a failed query must not be reported as the next launch's error
  const int64_t blocks_per_sm = 2048 / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work_items, threads), sms * blocks_per_sm)));
}

void gelu_tanh(const void* in, void* out, const float* out_scale, int64_t rows, int64_t features, bool gated,
               int act_dtype, int out_dtype, void* stream) {
  const char* name = gated ? "gelu_tanh_mul" : "gelu_tanh";
  require(rows >= 0 && features > 0, name, "bad shape");
  require(out_dtype == act_dtype || out_dtype == kFloat8E4M3, name, "out dtype must be the input dtype or FP8");
  require(out_dtype != kFloat8E4M3 || out_scale != nullptr, name, "FP8 output needs out_scale");
  if (rows == 0) return;
  const bool vec = features % kChunk == 0 && aligned16(in) && aligned16(out);
  const int grid = grid_for(rows * ceil_div(features, kChunk), kThreads);
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(act_dtype, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = static_cast<const T*>(in);
    if (out_dtype == kFloat8E4M3)
      gelu_tanh_kernel<T, true><<<grid, kThreads, 0, st>>>(src, out, out_scale, rows, features, gated, vec);
    else
      gelu_tanh_kernel<T, false><<<grid, kThreads, 0, st>>>(src, out, out_scale, rows, features, gated, vec);
  });
  check_launch(name);
}

void quantize_fp8(const void* x, void* out, const float* scale, int64_t n, int act_dtype, void* stream) {
  require(n >= 0 && scale != nullptr, "quantize_fp8", "needs n >= 0 and a scale");
  if (n == 0) return;
  const bool vec = aligned16(x) && aligned16(out);
  const int grid = grid_for(ceil_div(n, kChunk), kThreads);
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(act_dtype, "quantize_fp8", [&](auto tag) {
    using T = typename decltype(tag)::type;
    quantize_fp8_kernel<T><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x),
                                                      static_cast<__nv_fp8_storage_t*>(out), scale, n, vec);
  });
  check_launch("quantize_fp8");
}

void absmax(const void* x, float* out, int64_t n, bool accumulate, int act_dtype, void* stream) {
  require(n >= 0 && out != nullptr, "absmax", "needs n >= 0 and an output");
  auto st = static_cast<cudaStream_t>(stream);
  if (!accumulate) {
    const cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float), st);
    require(err == cudaSuccess, "absmax", std::string("reset failed: ") + cudaGetErrorString(err));
  }
  if (n == 0) return;
  const bool vec = aligned16(x);
  const int grid = grid_for(ceil_div(n, kChunk), kThreads);
  with_act_type(act_dtype, "absmax", [&](auto tag) {
    using T = typename decltype(tag)::type;
    absmax_kernel<T><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), reinterpret_cast<unsigned*>(out), n, vec);
  });
  check_launch("absmax");
}

void euler_step(void* x, const void* v, float dt, int64_t n, int x_dtype, int v_dtype, void* stream) {
  require(n >= 0, "euler_step", "n must be >= 0");
  require(is_float_code(v_dtype), "euler_step", "unsupported v dtype");
  if (n == 0) return;
  const bool vec = aligned16(x) && aligned16(v);
  const int grid = grid_for(ceil_div(n, kChunk), kThreads);
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(x_dtype, "euler_step", [&](auto tag) {
    using T = typename decltype(tag)::type;
    euler_step_kernel<T><<<grid, kThreads, 0, st>>>(static_cast<T*>(x), v, v_dtype, dt, n, vec);
  });
  check_launch("euler_step");
}

void images_to_patches(const uint8_t* images, void* out, int64_t views, int64_t height, int64_t width,
                       int64_t channels, int64_t patch, int out_dtype, void* stream) {
  require(patch > 0 && views >= 0 && channels > 0, "images_to_patches", "bad shape");
  require(height % patch == 0 && width % patch == 0, "images_to_patches", "image size not a multiple of patch");
  const int64_t total = views * height * width * channels;
  if (total == 0) return;
  const int grid = grid_for(total, kThreads);
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(out_dtype, "images_to_patches", [&](auto tag) {
    using T = typename decltype(tag)::type;
    images_to_patches_kernel<T><<<grid, kThreads, 0, st>>>(images, static_cast<T*>(out), height, width, channels,
                                                           patch, total);
  });
  check_launch("images_to_patches");
}

const char* compiled_archs() {
#define FLASHRT_STR_(...) #__VA_ARGS__
#define FLASHRT_STR(...) FLASHRT_STR_(__VA_ARGS__)
  return FLASHRT_STR(__CUDA_ARCH_LIST__);
}

}  // namespace flashrt
