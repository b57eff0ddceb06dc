// (dtype, head dim) -> the instantiated launcher. Sees only the launcher declarations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/flash_fwd.h"
#include "attention/flash_fwd_launch.h"

namespace gptkernels {

bool flash_fwd_supports_head_dim(int head_dim) {
  for (int d : kFlashHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

template <typename T>
static cudaError_t dispatch_head_dim(int head_dim, const FlashFwdParams& params, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return launch_flash_fwd<T, 32>(params, stream);
    case 64: return launch_flash_fwd<T, 64>(params, stream);
    case 80: return launch_flash_fwd<T, 80>(params, stream);
    case 96: return launch_flash_fwd<T, 96>(params, stream);
    case 128: return launch_flash_fwd<T, 128>(params, stream);
    default: return cudaErrorInvalidValue;  // the caller checked flash_fwd_supports_head_dim
  }
}

cudaError_t run_flash_fwd(DType dtype, int head_dim, const FlashFwdParams& params, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(head_dim, params, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(head_dim, params, stream);
    default: return cudaErrorInvalidValue;  // float32 attention has no tensor-core kernel here
  }
}

}  // namespace gptkernels
