// csrc/tile/ptx.cuh for the CPU shim: the same functions, following the PTX ISA's description of
// which lane holds which element (ldmatrix, mma.m16n8k16 fragments).
#pragma once
#include <cstdint>
#include <cstring>
namespace vlfast::ptx {
inline unsigned thread_index() { return threadIdx.x; }
inline void cp_async_16(void* dst, const void* src, int bytes) {
  std::memset(dst, 0, 16);
  if (bytes) std::memcpy(dst, src, bytes);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* p) {
  int tid = threadIdx.x, lane = tid & 31, base = tid & ~31;
  emu::slot(tid)[1] = (uint64_t)(uintptr_t)p; emu::warp_sync();
  for (int i = 0; i < 4; ++i) {
    const char* row = (const char*)(uintptr_t)emu::slot(base + 8 * i + lane / 4)[1];
    std::memcpy(&r[i], row + 4 * (lane % 4), 4);
  }
  emu::warp_sync();
}
inline float dec(uint16_t v, __nv_bfloat16*) { return __bfloat162float(__nv_bfloat16{v}); }
inline float dec(uint16_t v, __half*) { return __half2float(__half{v}); }
template <typename T>
inline void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  int tid = threadIdx.x, lane = tid & 31, base = tid & ~31;
  uint64_t* s = emu::slot(tid);
  for (int i = 0; i < 4; ++i) s[2 + i] = a[i];
  s[6] = b[0]; s[7] = b[1];
  emu::warp_sync();
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    uint64_t* q = emu::slot(base + t); int g = t >> 2, tg = t & 3;
    auto h = [&](uint64_t w, int k) { return dec(uint16_t(w >> (16 * k)), (T*)nullptr); };
    A[g][2*tg] = h(q[2],0); A[g][2*tg+1] = h(q[2],1); A[g+8][2*tg] = h(q[3],0); A[g+8][2*tg+1] = h(q[3],1);
    A[g][8+2*tg] = h(q[4],0); A[g][9+2*tg] = h(q[4],1); A[g+8][8+2*tg] = h(q[5],0); A[g+8][9+2*tg] = h(q[5],1);
    B[2*tg][g] = h(q[6],0); B[2*tg+1][g] = h(q[6],1); B[8+2*tg][g] = h(q[7],0); B[9+2*tg][g] = h(q[7],1);
  }
  emu::warp_sync();
  int g = lane >> 2, tg = lane & 3;
  int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2*tg, 2*tg+1, 2*tg, 2*tg+1};
  for (int i = 0; i < 4; ++i) { float acc = 0; for (int k = 0; k < 16; ++k) acc += A[rr[i]][k] * B[k][cc[i]]; d[i] += acc; }
}
}  // namespace vlfast::ptx
