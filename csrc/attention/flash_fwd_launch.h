// The per-(dtype, head dim) launcher template. Its definition is in flash_fwd_kernel.cuh and is
// instantiated once per translation unit (flash_fwd_hdim<D>_<dtype>.cu); flash_fwd_dispatch.cu sees
// only this declaration, so it instantiates nothing itself.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/flash_fwd.h"

namespace gptkernels {

template <typename T, int D>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

}  // namespace gptkernels
