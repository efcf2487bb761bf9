// The only file that knows pybind11. Compiled twice: into dlmom._C (CPU kernels) and, with
// DLMOM_CUDA_MODULE, into dlmom._C_cuda (CUDA kernels, which also take a stream).
// A tensor arrives as a tuple (data_ptr, dtype_code, sizes, strides) or None.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "ops.h"

namespace py = pybind11;
using dlmom::View;

static View to_view(const py::object& obj) {
  View v;
  if (obj.is_none()) return v;
  auto t = obj.cast<py::tuple>();
  if (t.size() != 4) throw std::invalid_argument("dlmom: a tensor view is (data_ptr, dtype, sizes, strides)");
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  int code = t[1].cast<int>();
  if (code < 0 || code > 5) throw std::invalid_argument("dlmom: unknown dtype code " + std::to_string(code));
  v.dtype = static_cast<dlmom::DType>(code);
  auto sizes = t[2].cast<std::vector<int64_t>>();
  auto strides = t[3].cast<std::vector<int64_t>>();
  if (sizes.size() > 4 || sizes.size() != strides.size())
    throw std::invalid_argument("dlmom: a tensor view has at most 4 dims and one stride per dim");
  v.ndim = int(sizes.size());
  for (int i = 0; i < v.ndim; ++i) {
    v.size[i] = sizes[i];
    v.stride[i] = strides[i];
  }
  return v;
}

#ifdef DLMOM_CUDA_MODULE
#define DLMOM_MODULE _C_cuda
#define DLMOM_SUFFIX(name) name##_cuda
// status: int64 [4] on the device where kernels record value errors (0: none kept)
#define DLMOM_STREAM_ARG , uintptr_t status, uintptr_t stream
#define DLMOM_STREAM , reinterpret_cast<int64_t*>(status), reinterpret_cast<void*>(stream)
// (status 0: the kernels record no value error; dlmom.ops always passes its buffer)
#define DLMOM_STREAM_PY , py::arg("status") = 0, py::arg("stream")
#else
#define DLMOM_MODULE _C
#define DLMOM_SUFFIX(name) name##_cpu
#define DLMOM_STREAM_ARG
#define DLMOM_STREAM
#define DLMOM_STREAM_PY
#endif

PYBIND11_MODULE(DLMOM_MODULE, m) {
  m.doc() = "dlmom kernels (raw pointers in, no torch); use dlmom.ops instead";
  m.def("soft_embed", [](py::object ids, py::object probs, py::object weight, double scale,
                         py::object out DLMOM_STREAM_ARG) {
    dlmom::DLMOM_SUFFIX(soft_embed)(to_view(ids), to_view(probs), to_view(weight), scale, to_view(out)
                                    DLMOM_STREAM);
  }, py::arg("ids"), py::arg("probs"), py::arg("weight"), py::arg("scale"), py::arg("out") DLMOM_STREAM_PY);
#ifdef DLMOM_CUDA_MODULE
  // CUDA: the caller passes the scratch (uint8, topk_workspace_bytes(B, V, k)), taken from torch's allocator.
  m.def("topk_packet", [](py::object logits, int64_t k, float temperature, float top_p, py::object ids,
                          py::object probs, py::object entropy, py::object workspace DLMOM_STREAM_ARG) {
    dlmom::topk_packet_cuda(to_view(logits), k, temperature, top_p, to_view(ids), to_view(probs),
                            to_view(entropy), to_view(workspace) DLMOM_STREAM);
  }, py::arg("logits"), py::arg("k"), py::arg("temperature"), py::arg("top_p"), py::arg("ids"),
     py::arg("probs"), py::arg("entropy"), py::arg("workspace") = py::none() DLMOM_STREAM_PY);
  m.def("topk_workspace_bytes", &dlmom::topk_packet_cuda_workspace_bytes, py::arg("B"), py::arg("V"),
        py::arg("k"));
#else
  m.def("topk_packet", [](py::object logits, int64_t k, float temperature, float top_p, py::object ids,
                          py::object probs, py::object entropy) {
    dlmom::topk_packet_cpu(to_view(logits), k, temperature, top_p, to_view(ids), to_view(probs),
                           to_view(entropy));
  }, py::arg("logits"), py::arg("k"), py::arg("temperature"), py::arg("top_p"), py::arg("ids"),
     py::arg("probs"), py::arg("entropy"));
#endif
  m.def("ties_merge", [](py::object logits, py::object weights, float theta, int elect, py::object means,
                         py::object out DLMOM_STREAM_ARG) {
    dlmom::DLMOM_SUFFIX(ties_merge)(to_view(logits), to_view(weights), theta, elect, to_view(means),
                                    to_view(out) DLMOM_STREAM);
  }, py::arg("logits"), py::arg("weights"), py::arg("theta"), py::arg("elect"), py::arg("means"),
     py::arg("out") DLMOM_STREAM_PY);
  m.def("kv_quant2", [](py::object x, int64_t group_size, py::object codes, py::object scale,
                        py::object zero DLMOM_STREAM_ARG) {
    dlmom::DLMOM_SUFFIX(kv_quant2)(to_view(x), group_size, to_view(codes), to_view(scale), to_view(zero)
                                   DLMOM_STREAM);
  }, py::arg("x"), py::arg("group_size"), py::arg("codes"), py::arg("scale"), py::arg("zero") DLMOM_STREAM_PY);
  m.def("kv_dequant2", [](py::object codes, py::object scale, py::object zero, int64_t group_size,
                          py::object out DLMOM_STREAM_ARG) {
    dlmom::DLMOM_SUFFIX(kv_dequant2)(to_view(codes), to_view(scale), to_view(zero), group_size, to_view(out)
                                     DLMOM_STREAM);
  }, py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("group_size"), py::arg("out") DLMOM_STREAM_PY);
#ifdef DLMOM_CUDA_MODULE
  m.attr("cuda_architectures") = DLMOM_CUDA_ARCHS;
#endif
}
