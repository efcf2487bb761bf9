// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"
#include "cuda_common.cuh"

namespace dlmom {

void ties_merge_cuda(const View& logits, const View& weights, float theta, int elect, const View& means, const View& out, void* stream) {
  fail("ties_merge", "not implemented yet");
}

}  // namespace dlmom
