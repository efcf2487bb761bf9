"""The GGUF conversion cache: a GGUF file is de-quantised by transformers on every load (tens of seconds);
dlmom converts it once to safetensors in a cache folder (``DLMOM_CACHE``, default ``~/.cache/dlmom``), checks
each entry against its manifest on every load and rebuilds a damaged one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import pathlib
import shutil
import socket
import struct
import warnings

import torch


class DLMoMWarning(UserWarning):
    """Something dlmom found wrong and repaired on its own (e.g. a damaged cache entry it rebuilt)."""


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DLMOM_CACHE") or pathlib.Path.home() / ".cache" / "dlmom")


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


def converted_gguf(path: pathlib.Path, dtype: torch.dtype) -> pathlib.Path:
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
                             f"({one_line(err)})") from err
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
    """The header ends before what it describes."""


class _Header:
    """Reads a GGUF header from ``data`` (bytes-like of ``size`` bytes) front to back; _Short past the end."""

    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 4  # after the magic bytes

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        self.skip(n)
        return struct.unpack_from(fmt, self.data, self.pos - n)[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Short
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        self.skip(n)
        return self.data[self.pos - n:self.pos]

    def value(self, kind: int):
        """One metadata value of type ``kind``: its raw bytes (scalars, strings) or None (arrays, skipped)."""
        if kind in _GGUF_SCALAR_BYTES:
            self.skip(_GGUF_SCALAR_BYTES[kind])
            return self.data[self.pos - _GGUF_SCALAR_BYTES[kind]:self.pos]
        if kind == _GGUF_STRING:
            return self.string()
        if kind == _GGUF_ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _GGUF_SCALAR_BYTES:
                self.skip(count * _GGUF_SCALAR_BYTES[item])
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"metadata value type {kind} is not a GGUF type")


def check_gguf(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is not a complete GGUF file, or None when it is one: the magic bytes, the
    version, and a walk over the header (metadata and tensor descriptions) whose tensor sizes and offsets
    give the size the file must have. Reads the header only (a fraction of a second)."""
    import mmap

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
        try:
            problem, needed = _walk_header(_Header(data, size))
        except _Short:
            return f"truncated: {size} bytes, it ends inside its header"
        except ValueError as err:
            return f"damaged: {err}"
    if problem is None and size < needed:
        return f"truncated: {size} bytes, its header describes {needed}"
    return problem


def _walk_header(h: _Header) -> tuple[str | None, int]:
    """(what is wrong with the header or None, the size in bytes the file must have)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    version = h.take("<I")
    if version not in (2, 3):
        return f"GGUF version {version} is not supported (expected 2 or 3; a big-endian file?)", 0
    n_tensors, n_kv = h.take("<Q"), h.take("<Q")
    if n_tensors > h.size or n_kv > h.size:
        return f"damaged: its header counts {n_tensors} tensors and {n_kv} metadata entries in {h.size} bytes", 0
    alignment = 32
    for _ in range(n_kv):
        key = h.string()
        kind = h.take("<I")
        raw = h.value(kind)
        if key == b"general.alignment" and kind == 4:
            alignment = int.from_bytes(raw, "little") or 32
    end = 0
    for _ in range(n_tensors):
        name = h.string().decode("utf-8", "replace")
        n_dims = h.take("<I")
        if n_dims > 8:
            return f"damaged: tensor {name!r} has {n_dims} dimensions", 0
        elements = math.prod(h.take("<Q") for _ in range(n_dims))
        ggml_type, offset = h.take("<I"), h.take("<Q")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            return f"tensor {name!r} has tensor type {ggml_type}, unknown to the gguf package", 0
        end = max(end, offset + elements // block * block_bytes)
    return None, -(-h.pos // alignment) * alignment + end


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and its message with the lines joined (cut at ``limit``)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text if len(text) <= limit else text[:limit] + '...'}"
