"""Shared test axes: devices, dtypes, per-dtype tolerances and non-contiguous inputs."""
import pytest
import torch

from tiny_models import llama, tokenizer

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for a result computed in fp32 from inputs of this dtype, then stored in it.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as t, as a slice of a wider tensor: strided rows (last dim still unit stride)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] + 7, dtype=t.dtype, device=t.device)
    wide[..., : t.shape[-1]] = t
    view = wide[..., : t.shape[-1]]
    # (torch calls a [1, 1] view contiguous whatever its strides; the row stride is what the kernels see)
    assert t.dim() < 2 or view.stride(-2) == t.shape[-1] + 7
    return view


def layout(t: torch.Tensor, contiguous: bool) -> torch.Tensor:
    return t if contiguous else noncontiguous(t)


@pytest.fixture(autouse=True)
def _kernels_backend(monkeypatch):
    """Tests run the kernels unless they set DLMOM_BACKEND themselves, and CUDA kernels report a bad value at
    the op that found it (DLMOM_STRICT_OPS=1; the engine's once-per-step check has its own test)."""
    monkeypatch.delenv("DLMOM_BACKEND", raising=False)
    monkeypatch.setenv("DLMOM_STRICT_OPS", "1")


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer with a chat template, trained on the spot (tests/tiny_models.py)."""
    from tiny_models import tokenizer

    return tokenizer("bytes", 300)


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama for ``tok``."""
    from tiny_models import llama

    return llama(tok, seed=0)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random model saved as a local folder, as a user's own checkpoint would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tokenizer("bytes", 300)
    llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
