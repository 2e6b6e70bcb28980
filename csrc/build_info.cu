// Compiled by nvcc so that the compiler's own macros describe the build.
#include <cuda_runtime_api.h>

#include <sstream>

#include "build_info.h"

#ifndef VLFAST_CUDA_ARCHS
#define VLFAST_CUDA_ARCHS "unknown"
#endif
#ifndef VLFAST_HOST_COMPILER
#define VLFAST_HOST_COMPILER "unknown"
#endif
#ifndef VLFAST_BUILD_TYPE
#define VLFAST_BUILD_TYPE "unknown"
#endif

namespace vlfast {
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.archs = split(VLFAST_CUDA_ARCHS, ',');
#ifdef __CUDA_ARCH_LIST__
  info.arch_list = {__CUDA_ARCH_LIST__};
#endif
  info.cuda = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info.nvcc = std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
              std::to_string(__CUDACC_VER_BUILD__);
  info.host_compiler = VLFAST_HOST_COMPILER;
  info.build_type = VLFAST_BUILD_TYPE;
  info.runtime_version = 0;
  if (cudaRuntimeGetVersion(&info.runtime_version) != cudaSuccess) info.runtime_version = 0;
  return info;
}

}  // namespace vlfast
