"""What a user would run instead of DL-MoM, measured the same way: one expert alone, a text pipeline, a
self-consistency vote, and LatentMAS.

``run(method, experts, prompts, ...)`` answers prompts with one of METHODS and returns a ``Results`` list
(one ``Result`` per prompt) as the engine does, so one harness compares them:

- ``"dlmom"``: the engine (``DLMoM(experts, config).generate``).
- ``"single"``: one expert alone (``expert``: its index, default the first), transformers' ``generate`` on
  its chat-templated prompt; greedy unless ``config.do_sample`` (then ``config.temperature``/``top_p``).
- ``"text-mas"``: the experts in their roles as a sequential text pipeline. Agent i reads the prompt and
  the full text answers of agents 0..i-1 and writes its own with the same ``max_new_tokens``; the last
  agent's text is the answer. Roles that share a model still run one after another: that is the baseline.
- ``"vote"``: self-consistency. Every expert samples ``vote_samples`` answers (transformers' ``generate``,
  always sampling, with ``config.temperature`` and ``config.top_p``; ``temperature`` must be > 0) of up to
  ``max_new_tokens`` tokens each; each answer's final answer (``dlmom.answers.final_answer``: the last
  number GSM8K style, else the normalised last line; blank answers abstain) is a vote and the most voted
  wins. A tie goes to the tied answer whose sample has the lowest bits per byte under the expert that wrote
  it (``dlmom.router.bits_per_byte``, the router's score, teacher-forced on that expert's own prompt and
  answer; these scoring forwards run only for tied prompts and count as that prompt's prefilled tokens;
  equal scores: the expert listed first). The text is the winning sample's (the first one with the winning
  answer, or the one that broke the tie). Token budget: DL-MoM on an item runs every expert over its
  prompt and at most ``max_new_tokens`` steps, so its ``usage["tokens"]`` is at most the sum over experts
  of (prompt tokens + max_new_tokens); one sample from every expert costs exactly that bound, so the
  default ``vote_samples=1`` matches DL-MoM's budget, and ``vote_samples=n`` spends n times it (each sample
  prefills its prompt again, as ``generate`` with repeated rows does). Same seed, same samples and votes.
- ``"latent-mas"``: LatentMAS (``dlmom.latent_mas``): the roles of one model in order on one KV cache, each
  but the last taking ``latent_steps`` latent steps (default 10, this module's choice) after its prompt, the
  last decoding greedily. Greedy: ``seed`` changes nothing.

Baselines batch the prompts (left padding, as the engine does) and return a ``Results`` list like the
engine's: each Result's usage is its prompt's (``dlmom.results.prompt_usage``), the list's ``usage`` the
batch's totals. Usage counts what the forwards processed, like the engine's: ``prefill_tokens`` are the
non-pad prompt tokens, ``decode_tokens`` one per row per decode forward (``generate`` keeps feeding rows
that already ended until the whole batch ends, and so does the engine; a latent step of latent-mas is one
decode token per row, as a latent packet is in the engine). ``generated_tokens`` counts only the tokens each row produced up to and including its
end-of-sequence token. ``latent_steps``: the prompt's latent steps (latent-mas), 0 otherwise.
``expert_forward_s`` is the time inside the models' forwards; ``bus_bytes`` is, for text-mas, the UTF-8
bytes of answer text handed from agent to agent (an answer read by two later agents counts twice), 0 for
the others (latent-mas hands over nothing: its agents read one cache in place).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time

import torch

from .answers import final_answer
from .engine import DLMoM, DLMoMConfig, check_generate_args
from .experts import Expert, as_experts, fit_budget
from .latent_mas import latent_mas as _latent_mas_pass
from .results import Result, Results, batch_usage, cut_at_stop, prompt_usage
from .router import bits_per_byte
from .soft_thinking import SoftThinkingRunner, _left_pad

METHODS = ("dlmom", "single", "text-mas", "vote", "latent-mas")
LATENT_STEPS = 10  # latent-mas's default latent steps per agent (our choice; see dlmom.latent_mas)
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
             generated: list[int], bus_bytes: list[int], start: float, clock: list[float], *,
             latent_steps: list[int] | None = None) -> Results:
    """Results with per-prompt usage (``counts[b]``: prompt b's counts per agent) and the batch's totals."""
    wall = time.perf_counter() - start
    latent_steps = latent_steps or [0] * len(texts)
    per_prompt = [prompt_usage(method, c, wall_s=wall, generated_tokens=g, bus_bytes=n, latent_steps=m)
                  for c, g, n, m in zip(counts, generated, bus_bytes, latent_steps)]
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


def vote(experts, prompts: list[str], *, samples: int = 1, max_new_tokens: int = 256,
         config: DLMoMConfig | None = None, stop: list[str] | None = None, progress: bool = False) -> Results:
    """Self-consistency over the experts (see the module docstring). trace: one record per sample (agent,
    sample index, text, extracted answer; bits_per_byte when it was scored for a tie), then one record
    ``{"vote": {"tally", "answer", "tied", "decided_by", "agent", "sample"}}``."""
    from tqdm.auto import tqdm

    config = config or DLMoMConfig()
    sampling = dataclasses.replace(config, do_sample=True)
    start, clock = time.perf_counter(), [0.0]
    B = len(prompts)
    rows = [p for p in prompts for _ in range(samples)]  # row = b * samples + s
    draws: list[list[dict]] = [[] for _ in prompts]  # per prompt, expert-major then sample order
    counts: list[list[dict]] = [[] for _ in prompts]  # per prompt, per expert (its samples summed)
    generated = [0] * B
    for k, agent in enumerate(tqdm(experts, desc="vote experts", disable=not progress, unit="expert")):
        texts, c, g = _answer(agent, rows, max_new_tokens=max_new_tokens, config=sampling, clock=clock)
        for b in range(B):
            mine = range(b * samples, (b + 1) * samples)
            counts[b].append({"expert": agent.name, "prefill_tokens": sum(c[r]["prefill_tokens"] for r in mine),
                              "decode_tokens": sum(c[r]["decode_tokens"] for r in mine)})
            generated[b] += sum(g[r] for r in mine)
        for r, text in enumerate(texts):
            text = cut_at_stop(text, stop or [])[0]
            draws[r // samples].append({"agent": agent.name, "sample": r % samples, "text": text,
                                        "answer": final_answer(text), "_expert": k})
    tallies = [collections.Counter(d["answer"] for d in ds if d["answer"] is not None) for ds in draws]
    tied = [[a for a, n in t.items() if n == max(t.values())] for t in tallies]
    _score_ties(experts, prompts, draws, tied, chat=config.chat, counts=counts, clock=clock)
    texts, traces = [], []
    for ds, tally, best in zip(draws, tallies, tied):
        if not best:
            pick, decided = ds[0], "none"
        elif len(best) == 1:
            pick, decided = next(d for d in ds if d["answer"] == best[0]), "majority"
        else:  # min keeps the first of equal scores: the expert listed first
            pick, decided = min((d for d in ds if d["answer"] in best), key=lambda d: d["bits_per_byte"]), \
                "bits_per_byte"
        trace = [{k: v for k, v in d.items() if k != "_expert"} for d in ds]
        trace.append({"vote": {"tally": dict(tally), "answer": pick["answer"] if best else None,
                               "tied": best if len(best) > 1 else [], "decided_by": decided,
                               "agent": pick["agent"], "sample": pick["sample"]}})
        texts.append(pick["text"])
        traces.append(trace)
    return _results("vote", texts, traces, counts, generated, [0] * B, start, clock)


def _score_ties(experts: list[Expert], prompts: list[str], draws: list[list[dict]], tied: list[list[str]], *,
                chat: bool, counts: list[list[dict]], clock: list[float]) -> None:
    """For prompts whose vote is tied: each sample with a tied answer gets ``bits_per_byte`` under the expert that
    wrote it (its prompt, then its text, teacher-forced); those tokens count as that expert's prefill for the
    prompt."""
    for k, agent in enumerate(experts):
        scored = [(b, d) for b, ds in enumerate(draws) if len(tied[b]) > 1
                  for d in ds if d["_expert"] == k and d["answer"] in tied[b]]
        if not scored:
            continue
        runner = SoftThinkingRunner([agent])
        bpb = bits_per_byte(runner, [prompts[b] for b, _ in scored], [d["text"] for _, d in scored], chat=chat)
        for (b, d), x in zip(scored, bpb[0].tolist()):
            d["bits_per_byte"] = round(x, 6)
            # What bits_per_byte feeds: the prompt's ids, then the text's.
            counts[b][k]["prefill_tokens"] += len(agent.prompt_ids(prompts[b], chat=chat)) + len(
                agent.tokenizer.encode(d["text"], add_special_tokens=False))
        clock[0] += runner.forward_s


def latent_mas(experts, prompts: list[str], *, latent_steps: int = LATENT_STEPS, max_new_tokens: int = 256,
               config: DLMoMConfig | None = None, stop: list[str] | None = None, progress: bool = False
               ) -> Results:
    """LatentMAS on one model's roles (dlmom.latent_mas). trace: one record per agent (its prompt, its latent
    steps, the top-1 token of each latent step as text; the last agent's answer text)."""
    config = config or DLMoMConfig()
    start, clock = time.perf_counter(), [0.0]
    texts, traces, counts, generated = _latent_mas_pass(experts, prompts, latent_steps=latent_steps,
                                                        max_new_tokens=max_new_tokens, chat=config.chat,
                                                        clock=clock, progress=progress)
    texts = [cut_at_stop(t, stop or [])[0] for t in texts]
    latent = [latent_steps * (len(experts) - 1)] * len(prompts)
    return _results("latent-mas", texts, traces, counts, generated, [0] * len(prompts), start, clock,
                    latent_steps=latent)


def _check_count(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def run(method: str, experts, prompts, *, max_new_tokens: int = 256, config: DLMoMConfig | None = None,
        expert: int = 0, seed: int | None = None, stop=None, progress: bool = False, vote_samples: int = 1,
        latent_steps: int = LATENT_STEPS) -> Results:
    """Answer ``prompts`` with ``method`` (one of METHODS) on ``experts`` (as DLMoM takes them); one Result
    per prompt. ``config`` is the engine's; baselines read ``chat``, ``do_sample``, ``temperature`` and
    ``top_p`` from it. ``expert``: which expert ``"single"`` runs (an index into ``experts``).
    ``vote_samples``: samples per expert for ``"vote"`` (1 matches DL-MoM's token budget, see the module
    docstring). ``latent_steps``: latent steps per agent (all but the last) for ``"latent-mas"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config is not None and not isinstance(config, DLMoMConfig):
        raise ValueError(f"config must be a DLMoMConfig, got {type(config).__name__}")
    _check_count("vote_samples", vote_samples, 1)
    _check_count("latent_steps", latent_steps, 0)
    if method == "vote" and config is not None and config.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for method 'vote' (it samples with transformers' generate), "
                         f"got {config.temperature}")
    if method == "dlmom":
        return DLMoM(experts, config).generate(prompts, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                                               progress=progress)
    # The same checks and messages as the engine's.
    experts = as_experts(experts)
    prompts, stops = check_generate_args(prompts, max_new_tokens, seed, stop)
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < len(experts):
        raise ValueError(f"expert must be an index in [0, {len(experts) - 1}], got {expert!r}")
    common = dict(max_new_tokens=max_new_tokens, config=config, stop=stops)
    with _seeded(seed, experts[0].device):
        if method == "single":
            return single(experts, list(prompts), expert=expert, **common)
        if method == "vote":
            return vote(experts, list(prompts), samples=vote_samples, progress=progress, **common)
        if method == "latent-mas":
            return latent_mas(experts, list(prompts), latent_steps=latent_steps, progress=progress, **common)
        return text_mas(experts, list(prompts), **common)
