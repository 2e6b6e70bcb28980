#include "check.h"

#include <cstdio>
#include <stdexcept>

#include "dtype.h"

namespace vlfast {

namespace {

[[noreturn]] void value_error(const char* fn, const std::string& message) {
  throw std::invalid_argument(std::string(fn) + ": " + message);
}

std::string hex(std::uintptr_t p) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

std::string cuda_message(cudaError_t status) {
  return std::string(cudaGetErrorString(status)) + " (" + cudaGetErrorName(status) + ")";
}

}  // namespace

void check_cuda(cudaError_t status, const char* where, const char* what) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string(where) + ": " + what + " failed: " + cuda_message(status));
}

ArgCheck& ArgCheck::require(bool ok, const std::string& message) {
  if (!ok) value_error(fn_, message);
  return *this;
}

ArgCheck& ArgCheck::positive(const char* name, std::int64_t v) {
  return require(v >= 1, std::string("argument '") + name + "' must be >= 1, got " + std::to_string(v));
}

ArgCheck& ArgCheck::pointer(const char* name, std::uintptr_t p, std::size_t align) {
  require(p != 0, std::string("argument '") + name + "' is a null pointer");
  require(p % align == 0, std::string("argument '") + name + "' must be " + std::to_string(align) +
                              "-byte aligned, got address " + hex(p));
  pointers_.emplace_back(name, p);
  return *this;
}

ArgCheck& ArgCheck::optional_pointer(const char* name, std::uintptr_t p, std::size_t align) {
  return p == 0 ? *this : pointer(name, p, align);
}

ArgCheck& ArgCheck::stride_covers_row(const char* name, std::int64_t stride, std::int64_t d) {
  return require(stride >= d, std::string("argument '") + name + "': the row stride (" + std::to_string(stride) +
                                  " elements) is less than the row length " + std::to_string(d));
}

ArgCheck& ArgCheck::rows(const char* name, std::uintptr_t p, std::int64_t stride, std::int64_t d, std::size_t elem) {
  pointer(name, p, elem);
  return stride_covers_row(name, stride, d);
}

ArgCheck& ArgCheck::rows16(const char* name, std::uintptr_t p, std::int64_t stride, std::int64_t d,
                           std::size_t elem) {
  pointer(name, p, 16);
  stride_covers_row(name, stride, d);
  require((stride * static_cast<std::int64_t>(elem)) % 16 == 0,
          std::string("argument '") + name + "': rows must start on 16-byte boundaries, but the row stride is " +
              std::to_string(stride) + " elements of " + std::to_string(elem) +
              " bytes (pad rows to a multiple of 16 bytes)");
  return *this;
}

void ArgCheck::device(int device, std::uintptr_t stream) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();  // not sticky: leave no error behind for the next call
    throw std::runtime_error(std::string(fn_) + ": no usable CUDA device (" +
                             (status != cudaSuccess ? "cudaGetDeviceCount: " + cuda_message(status)
                                                    : std::string("no device found")) +
                             "); the CUDA kernels need an NVIDIA GPU and its driver");
  }
  require(device >= 0 && device < count, "argument 'device' must name one of the " + std::to_string(count) +
                                             " CUDA devices, got " + std::to_string(device));
  for (const auto& [name, p] : pointers_) {
    cudaPointerAttributes attr{};
    check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p)), fn_,
               (std::string("cudaPointerGetAttributes('") + name + "')").c_str());
    const bool on_gpu = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
    require(on_gpu, std::string("argument '") + name + "' is not device memory (" +
                        (attr.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory") +
                        "); pass the data_ptr() of a CUDA tensor");
    require(attr.type == cudaMemoryTypeManaged || attr.device == device,
            std::string("argument '") + name + "' lives on cuda:" + std::to_string(attr.device) +
                " but the kernels run on cuda:" + std::to_string(device));
  }
#if CUDART_VERSION >= 12080
  // 0, 1 and 2 are the legacy default, cudaStreamLegacy and cudaStreamPerThread: valid on any device.
  if (stream > 2) {
    int stream_device = -1;
    check_cuda(cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &stream_device), fn_,
               "cudaStreamGetDevice('stream')");
    require(stream_device == device, "argument 'stream' belongs to cuda:" + std::to_string(stream_device) +
                                         " but the kernels run on cuda:" + std::to_string(device));
  }
#endif
}

DeviceGuard::DeviceGuard(const char* fn, int device) : previous_(-1), changed_(false) {
  VLFAST_CHECK_CUDA(fn, cudaGetDevice(&previous_));
  if (previous_ != device) {
    VLFAST_CHECK_CUDA(fn, cudaSetDevice(device));
    changed_ = true;
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) cudaSetDevice(previous_);  // a destructor must not throw; the launch was already checked
}

DType dtype_arg(const char* fn, const char* name, int code) {
  if (code < 0 || code >= kNumDTypes) {
    value_error(fn, std::string("argument '") + name + "' must be a dtype code: 0 (float32), 1 (float16) or " +
                        "2 (bfloat16), got " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

std::size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}

}  // namespace vlfast
