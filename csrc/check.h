// Errors and argument checks for everything vlfast._C exposes.
//
// Failures are C++ exceptions, which pybind11 turns into Python ones: std::invalid_argument becomes
// ValueError (a bad argument), std::runtime_error becomes RuntimeError (CUDA said no). Messages start
// with the Python-visible function name and name the argument, so a user can act on them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vlfast {

// Raises RuntimeError "<where>: <what> failed: <CUDA's message> (<error name>)" unless status is success.
void check_cuda(cudaError_t status, const char* where, const char* what);

}  // namespace vlfast

// Every CUDA runtime call goes through this; `where` is the function the user called.
#define VLFAST_CHECK_CUDA(where, call) ::vlfast::check_cuda((call), (where), #call)

// Right after a launch: a bad configuration (too much shared memory, no kernel image for this GPU)
// is reported here, with the kernel's name, instead of at some later, unrelated call.
#define VLFAST_CHECK_LAUNCH(where, kernel) ::vlfast::check_cuda(cudaGetLastError(), (where), "launching " kernel)

namespace vlfast {

// Collects the checks of one call. Host-side checks (null, alignment, sizes) run as they are stated
// and raise ValueError at once; device(), called last, checks what needs the CUDA runtime: a usable
// device, and that every pointer named so far is device memory on it.
class ArgCheck {
 public:
  explicit ArgCheck(const char* fn) : fn_(fn) {}

  const char* fn() const { return fn_; }

  // Raises ValueError "<fn>: <message>" when ok is false.
  ArgCheck& require(bool ok, const std::string& message);
  // v >= 1.
  ArgCheck& positive(const char* name, std::int64_t v);
  // A non-null pointer aligned to `align` bytes, to be checked as device memory by device().
  ArgCheck& pointer(const char* name, std::uintptr_t p, std::size_t align);
  // As pointer(), but 0 means "absent" and is accepted.
  ArgCheck& optional_pointer(const char* name, std::uintptr_t p, std::size_t align);
  // A row-major (rows, d) matrix of `elem`-byte elements read one element at a time: the pointer
  // aligned to elem, row stride >= d elements.
  ArgCheck& rows(const char* name, std::uintptr_t p, std::int64_t stride, std::int64_t d, std::size_t elem);
  // As rows(), but rows start on 16-byte boundaries (the kernels' vector loads): the pointer aligned
  // to 16, the row stride a multiple of 16 bytes.
  ArgCheck& rows16(const char* name, std::uintptr_t p, std::int64_t stride, std::int64_t d, std::size_t elem);

  // Checks that `device` exists and that every pointer named so far, and the stream, live on it.
  // Raises RuntimeError when there is no usable CUDA device at all (no GPU, no driver).
  void device(int device, std::uintptr_t stream);

 private:
  ArgCheck& stride_covers_row(const char* name, std::int64_t stride, std::int64_t d);

  const char* fn_;
  std::vector<std::pair<const char*, std::uintptr_t>> pointers_;
};

// Sets the current device for a scope and restores the caller's (the torch side keeps its own).
class DeviceGuard {
 public:
  DeviceGuard(const char* fn, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_;
  bool changed_;
};

}  // namespace vlfast
