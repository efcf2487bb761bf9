"""The records of an evaluation: one JSON object per line of ``--out``, one per (item, method).

A record: ``item`` (the item's id), ``method``, ``task``, ``correct`` (bool), ``answer`` (what was extracted:
a number or text; None for code), ``reason`` (why it is wrong, None when right), ``error`` (the exception
raised while answering, None when there was none; the item then counts as wrong), ``text`` (the
completion), ``tokens`` (tokens processed for this item by all experts: prefill + decode), ``wall_s`` (its
share of its batch's wall time), ``batch`` (how many items that call answered), ``settings`` (a hash of the
run's settings), ``run`` (the settings that hash is made of; records written before it lack it) and
``item_sha`` (a hash of the item). A resumed run reads the file back, keeps what is there and refuses a file
made with other settings (naming the ones that differ) or other items under the same ids.
"""
from __future__ import annotations

import hashlib
import json
import os

_TYPES = {"item": str, "method": str, "correct": bool, "settings": str, "item_sha": str}


def settings_id(settings: dict) -> str:
    """A short hash of the settings that make records comparable (task, experts, config, budget, seed, limits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain(settings: dict) -> dict:
    """``settings`` as a record holds them (JSON types; what JSON cannot hold as its str)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between two settings dicts (nested dicts by dotted key), one phrase each."""
    out = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key, "(absent)"), now.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} is {json.dumps(a)} in the file, {json.dumps(b)} in this run")
    return out


def read(path: str, *, settings: str | None, items: dict[str, str], also: str | None = None,
         run: dict | None = None) -> dict[tuple[str, str], dict]:
    """The records of ``path`` by (item, method), the last one winning; {} when there is no file.
    ``items``: id -> item_sha of this run's items (records of other ids are kept and ignored); ``settings``:
    this run's settings_id (None: not checked); ``also``: another id accepted as the same settings (the
    same run's id as an earlier dlmom computed it); ``run``: this run's settings (plain), to name what
differs when a record holds other settings. A last line cut short by an interruption is removed from
    the file; any other bad line is a ValueError naming it."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if data and not data.endswith(b"\n"):  # the last write was interrupted
        try:
            json.loads(lines[-1])
            ending = b"\n"  # the record is whole: only its newline is missing
        except ValueError:  # cut short: drop it, its pair is done again
            ending, lines = None, lines[:-1]
        with open(path, "r+b") as f:
            if ending is None:
                f.truncate(len(data) - len(data.split(b"\n")[-1]))
            else:
                f.seek(0, os.SEEK_END)
                f.write(ending)
    records = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        record = _record(path, number, raw)
        if settings is not None and record["settings"] not in (settings, also):
            changed = (differences(record["run"], run) if isinstance(record.get("run"), dict) and run is not None
                       else [f"settings {record['settings']} in the file, {settings} in this run"])
            raise ValueError(f"{path}, line {number}: made with other settings ({'; '.join(changed)}): use another "
                             f"--out, or the same task, experts, methods' settings, --max-new-tokens, --seed and "
                             f"sandbox limits")
        sha = items.get(record["item"])
        if sha is not None and sha != record["item_sha"]:
            raise ValueError(f"{path}, line {number}: item {record['item']!r} is another problem in this data file "
                             f"(the data changed since): use another --out")
        records[(record["item"], record["method"])] = record
    return records


def _record(path: str, number: int, raw: bytes) -> dict:
    where = f"{path}, line {number}"
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{where}: not a JSON record ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, kind in _TYPES.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {record.get(key)!r}")
    return record


class Writer:
    """Appends records to ``path`` (None: keeps nothing on disk), one line each, flushed at once."""

    def __init__(self, path: str | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()

    def rewrite(self, path: str, records: list[dict]) -> None:
        """Replace the file's content by ``records`` (atomically: a new file renamed over it)."""
        self.close()
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(path + ".tmp", path)
        self.file = open(path, "a", encoding="utf-8")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
