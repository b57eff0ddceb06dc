// Element types shared by the torch-side (.cpp) and kernel-side (.cu) code.
//
// The kernel translation units include no torch header (they compile in seconds); the .cpp files
// turn an at::ScalarType into this enum and call plain launcher functions with it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gptkernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
  }
  return "?";
}

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace gptkernels
