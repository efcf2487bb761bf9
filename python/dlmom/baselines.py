"""What a user would run instead of DL-MoM, measured the same way: one expert alone, and a text pipeline.

``run(method, experts, prompts, ...)`` answers prompts with one of METHODS and returns the engine's
``Result`` list (one per prompt), so one harness compares them:

- ``"dlmom"``: the engine (``DLMoM(experts, config).generate``).
- ``"single"``: one expert alone (``expert``: its index, default the first), transformers' ``generate`` on
  its chat-templated prompt; greedy unless ``config.do_sample`` (then ``config.temperature``/``top_p``).
- ``"text-mas"``: the experts in their roles as a sequential text pipeline. Agent i reads the prompt and
  the full text answers of agents 0..i-1 and writes its own with the same ``max_new_tokens``; the last
  agent's text is the answer. Roles that share a model still run one after another: that is the baseline.

Baselines batch the prompts (left padding, as the engine does) and return a ``Results`` list like the
engine's: each Result's usage is its prompt's (``dlmom.results.prompt_usage``), the list's ``usage`` the
batch's totals. Usage counts what the forwards processed, like the engine's: ``prefill_tokens`` are the non-pad prompt tokens, ``decode_tokens`` one per
row per decode forward (``generate`` keeps feeding rows that already ended until the whole batch ends,
and so does the engine). ``generated_tokens`` counts only the tokens each row produced up to and
including its end-of-sequence token. ``expert_forward_s`` is the time inside the models' forwards (a hook
around each call); ``bus_bytes`` is, for text-mas, the UTF-8 bytes of answer text handed from agent to
agent (an answer read by two later agents counts twice), 0 for single.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch

from .engine import DLMoM, DLMoMConfig, check_generate_args
from .experts import Expert, as_experts, fit_budget
from .results import Result, Results, batch_usage, cut_at_stop, prompt_usage
from .soft_thinking import _left_pad

METHODS = ("dlmom", "single", "text-mas")
# transformers' generate samples from torch's process-wide RNG: seeded baseline runs take turns on it.
_GLOBAL_RNG = threading.Lock()


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """All randomness of one baseline call from ``seed``, without disturbing the caller's RNG state; seeded
    calls from several threads run one at a time, so each still reproduces."""
    if seed is None:
        yield
        return
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _forward_timer(model: torch.nn.Module, clock: list[float]):
    """Adds the seconds spent inside ``model``'s forward calls to ``clock[0]``."""
    started: list[float] = []

    def before(module, args, kwargs):
        started.append(time.perf_counter())

    def after(module, args, kwargs, output):
        if output is not None and hasattr(output, "logits") and output.logits.is_cuda:
            torch.cuda.synchronize(output.logits.device)
        clock[0] += time.perf_counter() - started.pop()

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _answer(expert: Expert, prompts: list[str], *, max_new_tokens: int, config: DLMoMConfig, clock: list[float],
            ) -> tuple[list[str], list[dict], list[int]]:
    """One expert's answers to a batch of prompts with transformers' generate: (texts, per prompt its token
    counts for ``prompt_usage``, per prompt the tokens generated)."""
    tok, model = expert.tokenizer, expert.model
    eos = expert.eos_ids()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos or {0})
    rows = [expert.prompt_ids(p, chat=config.chat) for p in prompts]
    max_new_tokens = fit_budget(max_new_tokens, [(expert, expert.context_room(rows))])
    ids, mask = _left_pad(rows, pad_id, expert.device)
    sampling = dict(do_sample=True, temperature=config.temperature, top_p=config.top_p) if config.do_sample \
        else dict(do_sample=False)
    with _forward_timer(model, clock), torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=sorted(eos) or None, **sampling)
    new = out[:, ids.shape[1]:].tolist()
    texts, generated = [], []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        generated.append(len(kept) + (end is not None))
        texts.append(tok.decode(kept, skip_special_tokens=True))
    steps = len(new[0]) if new else 0
    counts = [{"expert": expert.name, "prefill_tokens": n, "decode_tokens": max(steps - 1, 0)}
              for n in mask.sum(-1).tolist()]
    return texts, counts, generated


def _pipeline_prompt(prompt: str, earlier: list[tuple[str, str]]) -> str:
    """What a text-mas agent reads: the question, then every earlier agent's full answer."""
    if not earlier:
        return prompt
    parts = [f"Question: {prompt}", ""]
    for name, text in earlier:
        parts += [f"Answer from {name}:", text, ""]
    parts.append("Using the answers above, give your own answer to the question.")
    return "\n".join(parts)


def _results(method: str, texts: list[str], traces: list[list[dict]], counts: list[list[dict]],
             generated: list[int], bus_bytes: list[int], start: float, clock: list[float]) -> Results:
    """Results with per-prompt usage (``counts[b]``: prompt b's counts per agent) and the batch's totals."""
    wall = time.perf_counter() - start
    per_prompt = [prompt_usage(method, c, wall_s=wall, generated_tokens=g, bus_bytes=n)
                  for c, g, n in zip(counts, generated, bus_bytes)]
    usage = batch_usage(method, per_prompt, wall_s=wall, expert_forward_s=clock[0])
    return Results([Result(t, trace, [], u) for t, trace, u in zip(texts, traces, per_prompt)], usage)


def single(experts, prompts: list[str], *, expert: int = 0, max_new_tokens: int = 256,
           config: DLMoMConfig | None = None, stop: list[str] | None = None) -> Results:
    """Expert ``expert`` alone. trace: one record (the agent, its prompt and answer) per prompt."""
    config = config or DLMoMConfig()
    chosen = experts[expert]
    start, clock = time.perf_counter(), [0.0]
    texts, counts, generated = _answer(chosen, prompts, max_new_tokens=max_new_tokens, config=config, clock=clock)
    texts = [cut_at_stop(t, stop or [])[0] for t in texts]
    traces = [[{"agent": chosen.name, "prompt": p, "text": t}] for p, t in zip(prompts, texts)]
    return _results("single", texts, traces, [[c] for c in counts], generated, [0] * len(prompts), start, clock)


def text_mas(experts, prompts: list[str], *, max_new_tokens: int = 256, config: DLMoMConfig | None = None,
             stop: list[str] | None = None) -> Results:
    """The sequential text pipeline. trace: one record per agent (its prompt and full answer)."""
    config = config or DLMoMConfig()
    start, clock = time.perf_counter(), [0.0]
    B = len(prompts)
    earlier: list[list[tuple[str, str]]] = [[] for _ in prompts]
    traces: list[list[dict]] = [[] for _ in prompts]
    counts: list[list[dict]] = [[] for _ in prompts]
    generated, bus_bytes, texts = [0] * B, [0] * B, [""] * B
    for agent in experts:
        asked = [_pipeline_prompt(p, e) for p, e in zip(prompts, earlier)]
        texts, c, g = _answer(agent, asked, max_new_tokens=max_new_tokens, config=config, clock=clock)
        for b, text in enumerate(texts):
            bus_bytes[b] += sum(len(t.encode()) for _, t in earlier[b])
            earlier[b].append((agent.name, text))
            traces[b].append({"agent": agent.name, "prompt": asked[b], "text": text})
            counts[b].append(c[b])
            generated[b] += g[b]
    texts = [cut_at_stop(t, stop or [])[0] for t in texts]
    return _results("text-mas", texts, traces, counts, generated, bus_bytes, start, clock)


def run(method: str, experts, prompts, *, max_new_tokens: int = 256, config: DLMoMConfig | None = None,
        expert: int = 0, seed: int | None = None, stop=None, progress: bool = False) -> Results:
    """Answer ``prompts`` with ``method`` (one of METHODS) on ``experts`` (as DLMoM takes them); one Result
    per prompt. ``config`` is the engine's; baselines read ``chat``, ``do_sample``, ``temperature`` and
    ``top_p`` from it. ``expert``: which expert ``"single"`` runs (an index into ``experts``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config is not None and not isinstance(config, DLMoMConfig):
        raise ValueError(f"config must be a DLMoMConfig, got {type(config).__name__}")
    if method == "dlmom":
        return DLMoM(experts, config).generate(prompts, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                                               progress=progress)
    # The same checks and messages as the engine's.
    experts = as_experts(experts)
    prompts, stops = check_generate_args(prompts, max_new_tokens, seed, stop)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < len(experts):
        raise ValueError(f"expert must be an index in [0, {len(experts) - 1}], got {expert!r}")
    with _seeded(seed, experts[0].device):
        if method == "single":
            return single(experts, list(prompts), expert=expert, max_new_tokens=max_new_tokens, config=config,
                          stop=stops)
        return text_mas(experts, list(prompts), max_new_tokens=max_new_tokens, config=config, stop=stops)
