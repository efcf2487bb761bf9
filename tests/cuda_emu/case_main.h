// What the emulated cases' mains share: a pass / fail line per case, contiguous or strided Views, and Buf, the
// guarded buffer (guard.h) that every input and output of a kernel lives in.
#pragma once
#include <cstdio>
#include <string>
#include <vector>

#include "guard.h"
#include "ops.h"

using dlmom::DType;
using dlmom::View;

static int failures = 0;
static void report(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok" : "FAIL", what.c_str());
  std::fflush(stdout);
  failures += !ok;
}

// A View of p with these sizes and strides (default: contiguous, row-major).
static View view(void* p, DType t, std::vector<int64_t> sizes, std::vector<int64_t> strides = {}) {
  View v;
  v.data = p;
  v.dtype = t;
  v.ndim = int(sizes.size());
  int64_t st = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.size[i] = sizes[size_t(i)];
    v.stride[i] = strides.empty() ? st : strides[size_t(i)];
    st *= sizes[size_t(i)];
  }
  return v;
}
