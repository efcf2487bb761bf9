"""dlmom — Deep-Latent Mixture of Models: pretrained LMs reasoning together in latent space."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import reference
from .op_types import Packet, QuantizedKV
from .ops import kv_dequant2, kv_quant2, soft_embed, ties_merge, topk_packet

try:
    __version__ = _version("dlmom")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

OPS = ("soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2")

__all__ = ["soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2", "Packet", "QuantizedKV",
           "reference", "backend_info", "__version__", "DLMoM", "DLMoMConfig", "Result", "Results", "Expert",
           "KIVICache", "MiniCache"]


def backend_info() -> dict:
    """What was built and what each op will run: {"version", "cpu_kernels", "cuda_kernels_compiled",
    "cuda_available", "cuda_architectures", "backend", "ops": {op: {"cpu": impl, "cuda": impl}}}."""
    import torch

    from .ops import backend_choice, native_module

    choice = backend_choice()
    cpu, cuda = native_module("cpu"), native_module("cuda")
    cuda_available = torch.cuda.is_available()

    def impl(device: str) -> str:
        if choice == "reference":
            return "reference"
        if device == "cpu":
            return "cpu-kernel" if cpu is not None else "unavailable (dlmom._C not built)"
        return "cuda-kernel" if cuda is not None else "reference (CUDA kernels not compiled)"

    return {
        "version": __version__,
        "backend": choice,
        "cpu_kernels": cpu is not None,
        "cuda_kernels_compiled": cuda is not None,
        "cuda_available": cuda_available,
        "cuda_architectures": getattr(cuda, "cuda_architectures", "").split(",") if cuda is not None else [],
        "ops": {op: {"cpu": impl("cpu"), "cuda": impl("cuda")} for op in OPS},
    }


def __getattr__(name):
    # The engine pulls in transformers: import it on first use, so the ops stay light to import.
    if name in ("DLMoM", "DLMoMConfig", "Result", "Results"):
        from . import engine

        return getattr(engine, name)
    if name == "Expert":
        from .experts import Expert

        return Expert
    if name in ("KIVICache", "MiniCache"):
        from . import kv

        return getattr(kv, name)
    raise AttributeError(f"module 'dlmom' has no attribute {name!r}")
