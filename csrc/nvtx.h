// NVTX ranges under the "vlfast" domain, from the header-only NVTX3 that ships with CUDA.
//
// Always on: without a profiler attached an NVTX call is a check of a null function pointer, so
// Nsight Systems / Compute users see the kernels' ranges (vlfast.<op>.<pass>.<kernel>) with no
// switch to flip. The Python ranges (vlfast.<op>.fwd / .bwd, VLFAST_NVTX=1) enclose them.
#pragma once

#include <nvtx3/nvtx3.hpp>

namespace vlfast {

struct NvtxDomain {
  static constexpr char const* name{"vlfast"};
};

using NvtxRange = nvtx3::scoped_range_in<NvtxDomain>;

}  // namespace vlfast
