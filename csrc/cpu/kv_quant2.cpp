// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"

namespace dlmom {

void kv_quant2_cpu(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero) {
  fail("kv_quant2", "not implemented yet");
}

void kv_dequant2_cpu(const View& codes, const View& scale, const View& zero, int64_t group_size, const View& out) {
  fail("kv_dequant2", "not implemented yet");
}

}  // namespace dlmom
