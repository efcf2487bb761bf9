// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"
#include "cuda_common.cuh"

namespace dlmom {

void soft_embed_cuda(const View& ids, const View& probs, const View& weight, float scale, const View& out, void* stream) {
  fail("soft_embed", "not implemented yet");
}

}  // namespace dlmom
