// Runs vlfast's CUDA C++ sources on a CPU, for tests on machines without a GPU (build.py).
//
// Each block's threads are std::threads; __syncthreads is a barrier over them, a warp's shuffles,
// votes and the tensor-core instructions (ptx.cuh here) exchange values through per-warp barriers,
// and atomics are std::atomic_ref's. The CUDA runtime calls the sources make are stubs: one device,
// every pointer device memory, streams ignored, launches synchronous. What it shows: the kernels' indexing, masking and math, and their
// host-side checks, give the right answers. What it cannot show: real asynchrony (cp.async is a
// plain copy here), memory-model races, speed. Those need the GPU (tests/ops/*_gpu.py, gpu_check.sh).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
#include <bit>
#include <stdexcept>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define CUDART_VERSION 13000

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
using std::min; using std::max;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; __half r; std::memcpy(&r.bits, &h, 2); return r; }
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.bits, 2); return (float)v; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return {uint16_t(u >> 16)}; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }

namespace emu {
struct Block {
  int threads;
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<char> smem;
  std::vector<uint64_t> xchg;  // per thread 16 words
};
inline thread_local Block* blk = nullptr;
inline thread_local dim3 tIdx, bIdx;
inline thread_local dim3 gDim, bDim;
inline void warp_sync() { blk->warp_bar[tIdx.x / 32]->arrive_and_wait(); }
inline uint64_t* slot(int tid) { return &blk->xchg[tid * 16]; }

template <typename K, typename... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, A... args) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.threads = block.x;
      b.bar = std::make_unique<std::barrier<>>(block.x);
      for (unsigned w = 0; w < block.x / 32; ++w) b.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
      b.smem.assign(smem + 16, (char)0x7f);  // not zeros: reads of unwritten shared memory show
      b.xchg.assign(block.x * 16, 0);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < block.x; ++t)
        ts.emplace_back([&, t] { blk = &b; tIdx = dim3(t); bIdx = dim3(bx, by); gDim = grid; bDim = block; kernel(args...); });
      for (auto& th : ts) th.join();
    }
}
}  // namespace emu
#define threadIdx (emu::tIdx)
#define blockIdx (emu::bIdx)
#define gridDim (emu::gDim)
#define blockDim (emu::bDim)
inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8);
  int tid = threadIdx.x; uint64_t w = 0; std::memcpy(&w, &v, sizeof(T));
  emu::slot(tid)[0] = w; emu::warp_sync();
  uint64_t r = emu::slot((tid & ~31) | ((tid & 31) ^ o))[0]; emu::warp_sync();
  T out; std::memcpy(&out, &r, sizeof(T)); return out;
}
// Warp votes: every lane publishes its predicate, then reads all 32 (all lanes take part, as the
// kernels call them with the full mask).
inline unsigned __ballot_sync(unsigned, int pred) {
  int tid = threadIdx.x; emu::slot(tid)[0] = pred != 0; emu::warp_sync();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(emu::slot((tid & ~31) | l)[0] != 0) << l;
  emu::warp_sync();
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1; }
inline int __ffs(unsigned x) { return __ffs(int(x)); }
// Atomics are atomic: a block's threads run at once (blocks one after another).
template <typename T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
#define EMU_SMEM (emu::blk->smem.data())

// --- CUDA runtime stubs (one device, every pointer "device memory") ---
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes { cudaMemoryType type; int device; void* devicePointer; void* hostPointer; };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t) { return "emu error"; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmu"; }
inline cudaError_t cudaGetDeviceCount(int* c) { *c = 1; return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void*) { a->type = cudaMemoryTypeDevice; a->device = 0; return 0; }
inline cudaError_t cudaStreamGetDevice(cudaStream_t, int* d) { *d = 0; return 0; }
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return 0; }
