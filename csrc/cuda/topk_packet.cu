// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"
#include "cuda_common.cuh"

namespace dlmom {

void topk_packet_cuda(const View& logits, int64_t k, float temperature, float top_p, const View& ids, const View& probs, const View& entropy, void* stream) {
  fail("topk_packet", "not implemented yet");
}

}  // namespace dlmom
