// Dtype codes shared by the bindings and flashrt_core.kernels.DType (Python mirror).
// The Python side checks at load time that the extension reports the same table
// (`_kernels.dtype_codes()`), so the two can never drift apart silently.
#pragma once

namespace flashrt {

enum DType : int {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat8E4M3 = 3,  // float8_e4m3fn: saturating, no inf
  kUInt8 = 4,
  kInt32 = 5,
};

}  // namespace flashrt
