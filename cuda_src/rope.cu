// Fused QKV split + RoPE (rotate-half) + q scaling + KV-cache write, and in-place RoPE.
// One thread per (token, head, 8-element chunk of the first half): it reads the chunk
// and its partner in the second half, so each rotated pair is read and written once.
#include "common.cuh"
#include "launchers.h"

namespace flashrt {
namespace {

constexpr int kThreads = 128;

struct RopeKernelArgs {
  RopeArgs a;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) qkv_rope_kernel(const RopeKernelArgs args) {
  const RopeArgs& a = args.a;
  const bool vec = args.vec;
  const int64_t half = a.head_dim / 2;
  const int64_t chunks = ceil_div(half, kChunk);
  const int64_t heads = a.num_q_heads + 2 * a.num_kv_heads;
  const int64_t total = a.tokens * heads * chunks;
  const int64_t row_stride = heads * a.head_dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / (heads * chunks);
    const int64_t rem = idx - t * heads * chunks;
    const int64_t h = rem / chunks;
    const int64_t c0 = (rem - h * chunks) * kChunk;
    const int64_t valid = half - c0;

    const T* src = static_cast<const T*>(a.qkv) + t * row_stride + h * a.head_dim;
    T* dst;
    bool rotate = true;
    float scale = 1.f;
    if (h < a.num_q_heads) {
      dst = static_cast<T*>(a.q_out) + (t * a.num_q_heads + h) * a.head_dim;
      scale = a.q_scale;
    } else if (h < a.num_q_heads + a.num_kv_heads) {
      dst = static_cast<T*>(a.k_cache) + ((a.cache_offset + t) * a.num_kv_heads + (h - a.num_q_heads)) * a.head_dim;
    } else {
      dst = static_cast<T*>(a.v_cache) +
            ((a.cache_offset + t) * a.num_kv_heads + (h - a.num_q_heads - a.num_kv_heads)) * a.head_dim;
      rotate = false;
    }

    float x1[kChunk];
    float x2[kChunk];
    load_chunk(src + c0, valid, vec, x1);
    load_chunk(src + half + c0, valid, vec, x2);
    if (rotate) {
      float c[kChunk];
      float s[kChunk];
      load_rope_angles(a.cos, a.sin, a.positions[t], a.max_pos, half, c0, valid, vec, c, s);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float r1 = rope_first(x1[i], x2[i], c[i], s[i]);
        const float r2 = rope_second(x1[i], x2[i], c[i], s[i]);
        x1[i] = r1 * scale;
        x2[i] = r2 * scale;
      }
    }
    store_chunk(dst + c0, valid, vec, x1);
    store_chunk(dst + half + c0, valid, vec, x2);
  }
}

}  // namespace

void qkv_rope_split(const RopeArgs& a, void* stream) {
  const char* name = a.num_kv_heads == 0 ? "rope" : "qkv_rope_split";
  require(a.tokens >= 0 && a.num_q_heads >= 0 && a.num_kv_heads >= 0, name, "bad shape");
  require(a.head_dim > 0 && a.head_dim % 2 == 0, name, "head_dim must be even");
  require(a.cos && a.sin && a.positions && a.qkv && a.q_out, name, "null pointer");
  require(a.num_kv_heads == 0 || (a.k_cache && a.v_cache), name, "KV cache pointers are null");
  require(a.num_kv_heads == 0 || (a.cache_offset >= 0 && a.cache_offset + a.tokens <= a.cache_rows), name,
          "cache rows " + std::to_string(a.cache_offset) + ".." + std::to_string(a.cache_offset + a.tokens) +
              " exceed the cache (" + std::to_string(a.cache_rows) + " rows)");
  if (a.tokens == 0) return;
  const int64_t half = a.head_dim / 2;
  bool vec = half % kChunk == 0;
  for (const void* p : {a.qkv, static_cast<const void*>(a.q_out), static_cast<const void*>(a.k_cache),
                        static_cast<const void*>(a.v_cache), static_cast<const void*>(a.cos),
                        static_cast<const void*>(a.sin)}) {
    vec = vec && (p == nullptr || aligned16(p));
  }
  const int64_t work = a.tokens * (a.num_q_heads + 2 * a.num_kv_heads) * ceil_div(half, kChunk);
  const int grid = grid_for(work, kThreads);
  const RopeKernelArgs args{a, vec};
  auto st = static_cast<cudaStream_t>(stream);
  with_act_type(a.act_dtype, name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    qkv_rope_kernel<T><<<grid, kThreads, 0, st>>>(args);
  });
  check_launch(name);
}

}  // namespace flashrt
