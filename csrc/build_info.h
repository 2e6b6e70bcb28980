// What vlfast._C was built with, for `python -m vlfast info` and the tests.
#pragma once

#include <string>
#include <vector>

namespace vlfast {

struct BuildInfo {
  std::vector<std::string> archs;  // as requested (CMAKE_CUDA_ARCHITECTURES), e.g. {"80", "90a"}
  std::vector<int> arch_list;      // what nvcc compiled for (__CUDA_ARCH_LIST__), e.g. {800, 900}
  std::string cuda;                // CUDA runtime version compiled against, "13.0"
  std::string nvcc;                // "13.0.88"
  std::string host_compiler;       // "GNU 12.2.0"
  std::string build_type;          // "Release"
  int runtime_version;             // cudaRuntimeGetVersion: the runtime linked in (static), e.g. 13000
};

BuildInfo build_info();

}  // namespace vlfast
