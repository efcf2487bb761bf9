// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"

namespace dlmom {

void topk_packet_cpu(const View& logits, int64_t k, float temperature, float top_p, const View& ids, const View& probs, const View& entropy) {
  fail("topk_packet", "not implemented yet");
}

}  // namespace dlmom
