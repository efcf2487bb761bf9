// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"

namespace dlmom {

void ties_merge_cpu(const View& logits, const View& weights, float theta, int elect, const View& means, const View& out) {
  fail("ties_merge", "not implemented yet");
}

}  // namespace dlmom
