// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"

namespace dlmom {

void soft_embed_cpu(const View& ids, const View& probs, const View& weight, float scale, const View& out) {
  fail("soft_embed", "not implemented yet");
}

}  // namespace dlmom
