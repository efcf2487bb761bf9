// TEMPORARY placeholder until the kernel lands.
#include "../ops.h"
#include "cuda_common.cuh"

namespace dlmom {

void kv_quant2_cuda(const View& x, int64_t group_size, const View& codes, const View& scale, const View& zero, void* stream) {
  fail("kv_quant2", "not implemented yet");
}

void kv_dequant2_cuda(const View& codes, const View& scale, const View& zero, int64_t group_size, const View& out, void* stream) {
  fail("kv_dequant2", "not implemented yet");
}

}  // namespace dlmom
