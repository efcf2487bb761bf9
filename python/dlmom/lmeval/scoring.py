"""Log-likelihood of a continuation under the mixture's consensus, teacher-forced.

Each expert reads its own context (its role and chat template, as in a generation) followed by the
continuation's tokens as explicit steps; an explicit token is the one-hot packet, whose soft embedding is exactly
the model's token embedding, so the whole row runs as one teacher-forced forward per runner (a model and all its
roles) instead of one step per token. At every continuation position the experts' logits go through the same
bus (slice to the primary vocabulary) and ``consensus.combine`` (the config's consensus: TIES with its theta and
elect, or contrastive with its contrast and plausibility; and its gate) as a decode step; the score is the sum over
the continuation of ``log_softmax(merged logits)`` at its tokens: the consensus distribution at temperature 1 over
the whole vocabulary (no top-k, top-p or packet temperature, which shape packets, not the distribution). Under
contrastive consensus a token outside the lead's plausible set scores -inf, as it can never be chosen. Every
expert has weight 1 and the lead is the largest expert (``lead="router"`` too): the router's weights come from a
generation, and a score has none.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import consensus
from ..bus import Bus
from ..soft_thinking import SoftThinkingRunner


@dataclasses.dataclass
class Item:
    """One request, tokenised: per expert (in ``DLMoM.experts`` order) its context ids, and the continuation ids
    on the primary vocabulary (shared by every expert)."""

    contexts: list[list[int]]
    continuation: list[int]


def check_shared_vocabulary(moe) -> None:
    """ValueError when an expert has another tokenizer than the primary one: a teacher-forced score needs every
    expert to read the same continuation tokens."""
    others = [g[0].name for g, bridged in zip(moe.groups, moe.bridged) if bridged]
    if others:
        raise ValueError(f"loglikelihood needs every expert on the primary expert's tokenizer; "
                         f"{', '.join(repr(n) for n in others)} use{'s' if len(others) == 1 else ''} another one "
                         f"(the Text-Bridge serves generation only): score with experts that share "
                         f"{moe.primary.name!r}'s tokenizer, or run generative tasks only")


def prefix_token(expert) -> int:
    """The token a request with an empty context is conditioned on: BOS, else EOS (as lm-eval's HF model)."""
    tok = expert.tokenizer
    token = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if token is None:
        raise ValueError(f"expert {expert.name!r}: its tokenizer has neither a BOS nor an EOS token to condition an "
                         f"empty context on")
    return token


def uses_template(expert, chat: bool) -> bool:
    """Whether ``expert.prompt_ids(..., chat=chat)`` renders the chat template (else the raw text)."""
    return chat and bool(getattr(expert.tokenizer, "chat_template", None))


def pair(moe, context: str, continuation: str) -> Item:
    """A (context, continuation) request as every expert reads it. As lm-eval's HF model does, trailing spaces of
    the context move to the continuation, and on raw text the continuation's tokens are those of context +
    continuation past the context's own (so a word is tokenised as in running text); after a chat template the
    continuation opens the assistant's turn and is tokenised alone. An empty context becomes BOS (else EOS)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    chat, primary = moe.config.chat, moe.primary
    contexts = [e.prompt_ids(context, chat=chat) for e in moe.experts]
    if uses_template(primary, chat):
        tail = primary.tokenizer.encode(continuation, add_special_tokens=False)
    else:
        whole = primary.prompt_ids(context + continuation, chat=False)
        tail = whole[len(contexts[0]):]
    return Item([ids or [prefix_token(e)] for ids, e in zip(contexts, moe.experts)], tail)


def fit(item: Item, experts) -> tuple[Item, bool]:
    """``item`` with each context cut from the left so that context + continuation fit the expert's positions (as
    lm-eval's HF model truncates), and whether a cut was made; ValueError when the continuation alone does not fit."""
    contexts, cut = [], False
    for ids, e in zip(item.contexts, experts):
        limit = e.max_positions
        room = None if limit is None else limit - len(item.continuation) + 1  # the last token is never fed
        if room is not None and room < 1:
            raise ValueError(f"a continuation of {len(item.continuation)} tokens does not fit the {limit} positions "
                             f"of expert {e.name!r}")
        cut |= room is not None and len(ids) > room
        contexts.append(ids if room is None else ids[-room:])
    return Item(contexts, item.continuation), cut


def score(moe, items: list[Item], *, batch_size: int, progress: bool = False) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether it is the consensus' greedy choice at every step) per item,
    in order; ``batch_size`` items per forward (longest first, so the first batch shows the memory peak)."""
    from tqdm.auto import tqdm

    check_shared_vocabulary(moe)
    fitted = [fit(item, moe.experts) for item in items]
    cuts = sum(cut for _, cut in fitted)
    if cuts:
        warnings.warn(f"{cuts} of {len(items)} requests had their context cut from the left to fit the experts' "
                      f"positions", UserWarning, stacklevel=3)
    order = sorted(range(len(items)), key=lambda i: -max(len(c) for c in fitted[i][0].contexts)
                   - len(fitted[i][0].continuation))
    out: list[tuple[float, bool]] = [(0.0, True)] * len(items)  # an empty continuation: log 1, greedy
    todo = [i for i in order if fitted[i][0].continuation]
    with tqdm(total=len(todo), desc="scoring", disable=not progress, unit="request") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for i, result in zip(batch, score_batch(moe, [fitted[i][0] for i in batch])):
                out[i] = result
            bar.update(len(batch))
    return out


def score_batch(moe, items: list[Item]) -> list[tuple[float, bool]]:
    """One teacher-forced forward per runner over ``items`` (each with a non-empty continuation), then the
    consensus at every continuation position [P = sum of continuation lengths]."""
    runners = [SoftThinkingRunner(group) for group in moe.groups]
    lengths = [len(item.continuation) for item in items]
    keep = max(lengths)
    # The last `n` of the `keep` kept positions of a row (left-padded) predict its `n` continuation tokens.
    wanted = torch.arange(keep).view(1, -1) >= keep - torch.tensor(lengths).view(-1, 1)  # [N, keep]
    per_runner, first = [], 0
    for runner in runners:
        rows = [item.contexts[first + r] + item.continuation[:-1] for r in range(runner.roles) for item in items]
        logits, _ = runner.teacher_forced(rows, keep)  # [R * N, keep, V_model]
        logits = logits.view(runner.roles, len(items), keep, -1)
        per_runner.append(logits[:, wanted.to(logits.device)])  # [R, P, V_model]
        first += runner.roles
    stacked = Bus(runners, moe.bridged, moe.primary, moe.alignments).stack(per_runner)  # [E, P, V]
    lead = torch.full((stacked.shape[1],), moe.largest, dtype=torch.long, device=stacked.device)
    merged, _ = consensus.combine(stacked, lead, None, moe.config, mode=moe.consensus)  # [P, V]
    targets = torch.tensor([t for item in items for t in item.continuation], device=merged.device)
    logp = torch.log_softmax(merged, dim=-1).gather(-1, targets.view(-1, 1))[:, 0]
    greedy = merged.argmax(-1) == targets
    return [(float(lp.sum()), bool(g.all())) for lp, g in zip(logp.split(lengths), greedy.split(lengths))]
