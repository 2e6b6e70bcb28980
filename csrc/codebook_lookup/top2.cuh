// The scan's per-row state: the smallest score, its code index, and the smallest score of every
// other code seen, with torch.argmin's rule for ties (the lowest index wins).
#pragma once

#include <cmath>

namespace vlfast::codebook_lookup {

struct Top2 {
  float best = INFINITY;
  float second = INFINITY;
  int index = 0;  // as the Triton scan: a row with no finite score keeps 0 (and is never certified)

  // The score of code j; codes come in increasing order, so on equal scores the earlier one stays.
  // A NaN score changes nothing (it is not < best, and fminf drops it).
  __device__ __forceinline__ void push(float s, int j) {
    const bool better = s < best;
    second = better ? best : fminf(second, s);
    index = better ? j : index;
    best = better ? s : best;
  }

  // The state of a disjoint set of codes; equal bests go to the lower index, and the loser's best
  // becomes a candidate for second (so a tie leaves second == best).
  __device__ __forceinline__ void merge(float other_best, float other_second, int other_index) {
    const bool other = other_best < best || (other_best == best && other_index < index);
    second = other ? fminf(other_second, best) : fminf(second, other_best);
    index = other ? other_index : index;
    best = other ? other_best : best;
  }

  __device__ __forceinline__ void merge(const Top2& o) { merge(o.best, o.second, o.index); }
};

// The Top2 of lane (this lane ^ mask).
__device__ __forceinline__ Top2 shfl_xor(const Top2& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.best, mask), __shfl_xor_sync(0xffffffffu, s.second, mask),
          __shfl_xor_sync(0xffffffffu, s.index, mask)};
}

}  // namespace vlfast::codebook_lookup
