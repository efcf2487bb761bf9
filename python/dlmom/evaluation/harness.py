"""The evaluation loop: every method on the same items, scored, written as it goes, resumable.

Items go in order, ``batch_size`` at a time; each batch is answered by every method in turn (so an
interrupted run holds every method on the same first items), with the experts loaded once. Each answer
is scored (code in the sandbox, on a worker thread while the next batch generates) and written to ``out``
at once. A call that raises records its message on each of its items (they count as wrong); Ctrl-C stops
the run with everything finished so far written.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time

from ..engine import DLMoMConfig
from ..experts import as_experts
from . import records as rec
from .formats import Item, read_items
from .methods import parse_methods
from .report import summarize
from .sandbox import Limits
from .scoring import score

# How each task's item becomes a prompt and a completion an answer: dlmom.evaluation.formats / scoring.
PROMPT_VERSION = 1


@dataclasses.dataclass
class Evaluation:
    """``records`` of this run's items x methods (item order, then method order); ``summary`` (see
    dlmom.evaluation.report.summarize) with ``overhead_fraction``: the share of the run's time spent
    outside the methods' calls (scoring, writing, bookkeeping; loading aside)."""

    records: list[dict]
    summary: dict


def evaluate(task: str, items, experts, methods, *, out: str | os.PathLike | None = None, max_new_tokens: int = 256,
             config: DLMoMConfig | None = None, seed: int | None = None, batch_size: int = 1, expert: int | None = None,
             limits: Limits | None = None, retry_errors: bool = False, progress: bool = False) -> Evaluation:
    """Answer ``items`` (a list of Item, or a data file in ``task``'s format) with each of ``methods`` (see
    dlmom.evaluation.methods.parse_methods) on ``experts`` (as DLMoM takes them, loaded once), score each
    answer and return the records and their summary. ``out``: a JSONL file the records go to as they are
    made; records already there (same settings) are kept and not done again; with ``retry_errors`` those
    that hold an error are done again. ``expert``: which expert ``single`` runs (default 0). ``limits``:
    the sandbox's, for humaneval."""
    config = config or DLMoMConfig()
    limits = limits or Limits()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(items, list):
        items = read_items(task, items)
    experts = as_experts(getattr(experts, "experts", experts))
    methods = parse_methods(methods, experts=len(experts))
    run_settings, legacy_settings = ({
        "task": task, "prompts": PROMPT_VERSION, "config": _answer_settings(config), "max_new_tokens": max_new_tokens,
        "seed": seed, "expert": expert, "limits": dataclasses.asdict(limits) if task == "humaneval" else None,
        "experts": [(e.name, e.system_prompt, _model_id(e, by_path)) for e in experts]} for by_path in (False, True))
    settings, legacy = rec.settings_id(run_settings), rec.settings_id(legacy_settings)
    run_settings = rec.plain(run_settings)
    out = os.fspath(out) if out is not None else None
    done = rec.read(out, settings=settings, also=legacy, items={i.id: i.fingerprint() for i in items},
                    run=run_settings) if out else {}
    writer = rec.Writer(out)
    if retry_errors and any(r.get("error") is not None for r in done.values()):
        done = {k: r for k, r in done.items() if r.get("error") is None}
        writer.rewrite(out, list(done.values()))
    run = _Run(task, experts, methods, done, writer, (settings, run_settings), limits, config=config,
               max_new_tokens=max_new_tokens, seed=seed, expert=expert)
    try:
        run.loop(items, batch_size, progress=progress)
    finally:
        run.close()
        writer.close()
    kept = [done[(i.id, m.name)] for i in items for m in methods if (i.id, m.name) in done]
    summary = summarize(kept, methods, [i.id for i in items])
    summary.update(overhead_fraction=run.overhead_fraction(), generation_s=run.generation_s, run_s=run.run_s)
    return Evaluation(kept, summary)


# Fields added to DLMoMConfig after records were first written, with the value that keeps the earlier answers:
# at that value a field stays out of the records' settings, so the earlier records stay valid; at any other it is
# in (it changes answers). A new field joins this list with its neutral value.
_ADDED_FIELDS = {"route_by": "preview", "router_temperature": 1.0}


def _answer_settings(config: DLMoMConfig) -> dict:
    """The config's fields that can change answers: placement (local or Ray actors) gives the same answers by
    design, so its fields stay out of the records' settings and a run continues across placements; a field added
    later stays out while it has its neutral value (``_ADDED_FIELDS``)."""
    from ..placement import PlacementSettings

    fields = dataclasses.asdict(config)
    for f in dataclasses.fields(PlacementSettings):
        fields.pop(f.name, None)
    for name, neutral in _ADDED_FIELDS.items():
        if fields.get(name) == neutral:
            fields.pop(name)
    return fields


_USAGE = ("generated_tokens", "latent_steps", "merged_steps", "switches", "bus_bytes", "experts")


def _model_id(expert, by_path: bool = False) -> str:
    """Which model an expert runs, for the records' settings: a GGUF file by its name and size
    (``config.dlmom_source``, set by dlmom.loading), so that the same file elsewhere (another checkout, a
    reinstalled package) continues a run; else the hub id or folder it came from. ``by_path``: the converted
    GGUF's cache folder instead, which records written before dlmom_source existed hold."""
    config = getattr(expert.model, "config", None)
    source = None if by_path else getattr(config, "dlmom_source", None)
    return str(source or getattr(config, "_name_or_path", "") or type(expert.model).__name__)


class _Run:
    """One evaluation's state: the records by (item, method), the writer, the scoring worker, the clocks."""

    def __init__(self, task, experts, methods, done, writer, settings, limits, **generate):
        self.task, self.experts, self.methods, self.done = task, experts, methods, done
        self.writer, self.limits, self.generate = writer, limits, generate
        self.settings, self.run_settings = settings  # the hash and what it is made of
        # Running code takes a process start (~0.2 s): do it while the next batch generates.
        self.pool = concurrent.futures.ThreadPoolExecutor(2) if task == "humaneval" else None
        self.pending: list[tuple[dict, concurrent.futures.Future | dict]] = []
        self.generation_s = self.run_s = 0.0
        self.counts = {m.name: [0, 0] for m in methods}  # running [correct, answered] on this run's items

    def loop(self, items: list[Item], batch_size: int, *, progress: bool) -> None:
        from tqdm.auto import tqdm

        start = time.perf_counter()
        ids = {i.id for i in items}
        for (item, name), r in self.done.items():
            if item in ids and name in self.counts:
                self.counts[name][0] += bool(r["correct"])
                self.counts[name][1] += 1
        todo = sum((i.id, m.name) not in self.done for i in items for m in self.methods)
        self.bar = tqdm(total=todo, desc=f"eval {self.task}", unit="answer", disable=not progress, dynamic_ncols=True)
        try:
            for first in range(0, len(items), batch_size):
                batch = items[first:first + batch_size]
                for method in self.methods:
                    self._answer(method, [i for i in batch if (i.id, method.name) not in self.done])
                    self._flush(wait=False)
        finally:  # on an interruption too: what was answered is scored and written
            try:
                self._flush(wait=True)
            finally:
                self.run_s = time.perf_counter() - start
                self.bar.close()

    def _answer(self, method, items: list[Item]) -> None:
        if not items:
            return
        start = time.perf_counter()
        try:
            results, error = method.run(self.experts, [i.prompt for i in items], **self.generate), None
        except Exception as err:  # noqa: BLE001 - recorded on each item, never dropped
            results, error = [None] * len(items), f"{type(err).__name__}: {err}"
        wall = time.perf_counter() - start
        self.generation_s += wall
        for item, result in zip(items, results):
            record = {"item": item.id, "method": method.name, "task": self.task, "correct": False, "answer": None,
                      "reason": "error" if error else None, "error": error, "text": result.text if result else None,
                      "tokens": result.usage["tokens"] if result else None,
                      "wall_s": wall / len(items), "batch": len(items), "settings": self.settings,
                      "run": self.run_settings, "item_sha": item.fingerprint()}
            if result is not None:  # what the trace view and the findings read
                record["usage"] = {k: result.usage[k] for k in _USAGE if k in result.usage}
                if result.trace:
                    record["trace"], record["route"] = result.trace, result.route
            if result is None:
                verdict = {}
            elif self.pool is not None:
                verdict = self.pool.submit(score, self.task, item, result.text, limits=self.limits)
            else:
                verdict = score(self.task, item, result.text, limits=self.limits)
            self.pending.append((record, verdict))

    def _flush(self, *, wait: bool) -> None:
        """Write the records whose score is known, in order (all of them with ``wait``)."""
        while self.pending:
            record, verdict = self.pending[0]
            if isinstance(verdict, concurrent.futures.Future):
                if not (wait or verdict.done()):
                    return
                try:
                    verdict = verdict.result()
                except Exception as err:  # noqa: BLE001 - e.g. no room for the sandbox's files
                    verdict = {"reason": "error", "error": f"scoring: {type(err).__name__}: {err}"}
            record.update(verdict)
            self.writer.write(record)
            self.pending.pop(0)
            self.done[(record["item"], record["method"])] = record
            self.counts[record["method"]][0] += bool(record["correct"])
            self.counts[record["method"]][1] += 1
            self.bar.update(1)
            self.bar.set_postfix_str(" | ".join(f"{name} {c / n:.0%}" for name, (c, n) in self.counts.items() if n),
                                     refresh=False)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def overhead_fraction(self) -> float:
        return (self.run_s - self.generation_s) / self.run_s if self.run_s > 0 else 0.0
