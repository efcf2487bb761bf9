"""``dlmom trace``: the per-step trace of dlmom answers as a self-contained HTML page and/or a PNG.

Reads what ``dlmom run --json`` prints (``{"results": [...], "usage": ...}``), or the records of a
``dlmom eval --out`` file (JSONL, one record per item and method; ``--item`` / ``--method`` choose them,
by default every record with a step trace). A dlmom answer has a step trace (one record per step: mode,
entropy, top tokens, agreement, merged, switches, bus bytes, the switch reason); a baseline's trace is a
list of agent records (``agent``, ``prompt``, ``text``, ...): the page shows those as the agents' texts,
the PNG leaves them out and says so. dlmom.trace_html draws the page, dlmom.trace_png the image.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

MODES = ("preview", "explicit", "latent")
PNG_LIMIT = 50  # traces in one image: more makes an image too tall to read (choose with --item / --method)


@dataclasses.dataclass
class View:
    """One answer to draw: ``title`` (what it answers), ``text``, ``trace`` (steps or agent records),
    ``route`` (the router's per-expert records), ``usage``, and ``facts`` (label, value) shown beside it."""

    title: str
    text: str
    trace: list[dict]
    route: list[dict]
    usage: dict
    facts: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def has_steps(self) -> bool:
        return is_step_trace(self.trace)


def is_step_trace(trace) -> bool:
    """A dlmom trace (records with ``step`` and ``mode``), not a baseline's agent records."""
    return (bool(trace) and isinstance(trace, list)
            and all(isinstance(r, dict) and "step" in r and "mode" in r for r in trace))


def check_steps(where: str, trace: list[dict]) -> None:
    """Each step has what the view reads, with the types it draws; a ValueError naming the step otherwise."""
    for i, r in enumerate(trace):
        if not isinstance(r["step"], int) or isinstance(r["step"], bool):
            raise ValueError(f"{where}, step record {i}: step must be an integer, got {r['step']!r}")
        if r["mode"] not in MODES:
            raise ValueError(f"{where}, step record {i}: mode must be one of {', '.join(MODES)}, got {r['mode']!r}")
        for key in ("entropy", "agreement", "bus_bytes"):  # agreement is None where the others were deferred
            if key in r and not isinstance(r[key], (int, float)) and not (key == "agreement" and r[key] is None):
                raise ValueError(f"{where}, step record {i}: {key} must be a number, got {r[key]!r}")
        if not isinstance(r.get("top", []), list) or not isinstance(r.get("token", ""), str):
            raise ValueError(f"{where}, step record {i}: top must be a list of [token, prob] and token a string")


def from_results(results: list, titles: list[str] | None = None) -> list[View]:
    """Views of a generate call's Results (or their dicts, as ``dlmom run --json`` prints them)."""
    views = []
    for i, r in enumerate(results):
        r = r if isinstance(r, dict) else r.to_dict()
        title = titles[i] if titles else f"result {i + 1}"
        views.append(View(title, r.get("text") or "", r.get("trace") or [], r.get("route") or [],
                          r.get("usage") or {}, [("method", str((r.get("usage") or {}).get("method", "dlmom")))]))
    return views


def _from_record(record: dict) -> View:
    facts = [("method", record["method"]), ("correct", "yes" if record.get("correct") else "no")]
    if record.get("answer") is not None:
        facts.append(("answer", str(record["answer"])))
    if record.get("error"):
        facts.append(("error", str(record["error"])))
    return View(f"item {record['item']} · {record['method']}", record.get("text") or "", record.get("trace") or [],
                record.get("route") or [], record.get("usage") or {}, facts)


def _parse(path: str) -> tuple[str, list]:
    """("run", result dicts) or ("eval", records) from ``path``; ValueError/OSError naming FILE otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"argument FILE: no such file: {path}" if not os.path.exists(path)
                         else f"argument FILE: {path} is not a file")
    with open(path, encoding="utf-8", errors="replace") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"argument FILE: {path} is empty")
    try:
        whole = json.loads(data)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("results"), list):
        return "run", whole["results"]
    if isinstance(whole, dict) and "item" in whole and "method" in whole:
        return "eval", [whole]
    if whole is not None:
        raise ValueError(f"argument FILE: {path} is JSON but neither what dlmom run --json prints (an object with "
                         f"\"results\") nor a dlmom eval record (\"item\", \"method\"); got a {type(whole).__name__}"
                         + (f" with keys {', '.join(sorted(whole))[:200]}" if isinstance(whole, dict) else ""))
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"argument FILE: {path} is not JSON, nor JSONL (line {number}: {err})") from None
        if not (isinstance(record, dict) and isinstance(record.get("item"), str)
                and isinstance(record.get("method"), str)):
            raise ValueError(f"argument FILE: {path}, line {number}: not a dlmom eval record (an object with "
                             f"\"item\" and \"method\")")
        records.append(record)
    return "eval", records


def _names(values) -> str:
    values = list(dict.fromkeys(values))
    shown = ", ".join(values[:8])
    return shown + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")


def _select(path: str, records: list[dict], item: str | None, method: str | None) -> list[dict]:
    """The records ``--item`` / ``--method`` choose (the last of an (item, method) pair wins, as on resume);
    by default every record with a step trace."""
    latest = {(r["item"], r["method"]): r for r in records}
    chosen = [r for r in latest.values() if (item is None or r["item"] == item)
              and (method is None or r["method"] == method)]
    holds = (f"{path} holds items {_names(r['item'] for r in latest.values())} and methods "
             f"{_names(r['method'] for r in latest.values())}")
    if not chosen:
        option = "--item" if method is None else "--method" if item is None else "--item/--method"
        asked = " with ".join(x for x in (item is not None and f"item {item!r}", method is not None
                                          and f"method {method!r}") if x)
        raise ValueError(f"argument {option}: no record of {asked}: {holds}")
    if item is None and method is None:
        chosen = [r for r in chosen if is_step_trace(r.get("trace"))]
        if not chosen:
            raise ValueError(f"argument FILE: no step trace in {path} (only dlmom methods keep one; {holds}): "
                             f"choose records with --method or --item to see their texts")
    return chosen


def load(path: str, *, item: str | None = None, method: str | None = None) -> list[View]:
    """The views of ``path`` (see the module docstring); a ValueError naming the argument on bad input."""
    kind, entries = _parse(path)
    if kind == "run":
        if item is not None or method is not None:
            raise ValueError(f"argument {'--item' if item is not None else '--method'}: {path} is what dlmom run "
                             f"--json prints (no items or methods); --item and --method choose dlmom eval records")
        if not all(isinstance(r, dict) for r in entries):
            raise ValueError(f"argument FILE: {path}: \"results\" must be a list of objects")
        views = from_results(entries)
    else:
        views = [_from_record(r) for r in _select(path, entries, item, method)]
    if not any(v.trace for v in views):
        raise ValueError(f"argument FILE: no trace in {path} (its {len(views)} answer(s) hold no \"trace\")")
    for v in views:
        if not isinstance(v.trace, list) or not isinstance(v.route, list):
            raise ValueError(f"argument FILE: {path}: {v.title}: \"trace\" and \"route\" must be lists")
        if v.has_steps:
            check_steps(f"argument FILE: {path}: {v.title}", v.trace)
    return views


def check_outputs(html: str | None, png: str | None, *, html_option: str = "--html",
                  png_option: str = "--png") -> None:
    """Before any work: each output's folder exists, and --png has matplotlib."""
    for option, out in ((html_option, html), (png_option, png)):
        if out is None:
            continue
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise ValueError(f"argument {option}: no such folder: {folder}")
        if os.path.isdir(out):
            raise ValueError(f"argument {option}: {out} is a folder, expected a file name")
    if png is not None:
        from .trace_png import require_matplotlib

        require_matplotlib(png_option)


def write(views: list[View], *, html: str | None = None, png: str | None = None, png_option: str = "--png") -> None:
    """Write the page and/or the image of ``views``."""
    if html is not None:
        from .trace_html import render

        with open(html, "w", encoding="utf-8") as f:
            f.write(render(views))
    if png is not None:
        from .trace_png import draw

        draw(views, png, option=png_option)


def _command(args: argparse.Namespace) -> int:
    if args.html is None and args.png is None:
        raise ValueError("argument --html/--png: give at least one output (--html FILE, --png FILE)")
    check_outputs(args.html, args.png)
    views = load(args.file, item=args.item, method=args.method)
    write(views, html=args.html, png=args.png)
    steps = sum(v.has_steps for v in views)
    for out in (args.html, args.png):
        if out is not None:
            print(f"{out}: {len(views)} answer(s), {steps} with a step trace")
    return 0


def add_parser(sub) -> None:
    """The ``trace`` subcommand on ``sub`` (build_parser's subparsers)."""
    p = sub.add_parser(
        "trace", help="draw the step traces of dlmom answers (HTML page, PNG image)",
        description="Draw the per-step trace of dlmom answers: the answer's tokens coloured by mode (latent, "
                    "explicit, preview), per step the normalised entropy with latent/explicit shading and switch "
                    "markers, the agreement between experts, bus bytes, merged vs lead-alone steps, each packet's "
                    "top tokens on hover, and the router's scores. The HTML page is one self-contained file (no "
                    "network); the PNG (matplotlib) has the entropy and agreement panels.",
        epilog="FILE is what `dlmom run --json` prints, or a `dlmom eval --out` JSONL file: then every record "
               "with a step trace (dlmom methods), or the records --item / --method choose; a baseline's record "
               "(single, text-mas, vote, latent-mas: no steps) shows its agents' texts on the page and is left "
               "out of the PNG.")
    p.add_argument("file", metavar="FILE", help="dlmom run --json output, or a dlmom eval --out JSONL file")
    p.add_argument("--html", metavar="OUT", help="write the page here (one self-contained .html file)")
    p.add_argument("--png", metavar="OUT", help="write the image here (needs matplotlib: pip install 'dlmom[viz]')")
    p.add_argument("--item", metavar="ID", help="eval records of this item only")
    p.add_argument("--method", metavar="NAME", help="eval records of this method only (e.g. dlmom, dlmom:latent)")
    p.set_defaults(func=_command)
