"""LatentMAS (Zou et al., "Latent Collaboration in Multi-Agent Systems", arXiv 2511.20639), written from the
paper's description: the roles of one model think in its hidden space on one shared KV cache.

The agents (roles) run in order on one growing KV cache. Each agent appends its own prompt (its role and the
question, chat-templated as every baseline's) to the cache; every agent but the last then takes ``m``
latent steps: the last hidden state ``h`` (the input of the LM head, i.e. the final layer's output after the
model's final norm, so that ``logits = h W_out^T``) becomes the next input embedding

    e = h W_a,   W_a = (W_out^T W_out + lambda I)^-1 W_out^T W_in,   lambda = 1e-5,

rescaled so that ||e|| is the mean norm of the input embeddings (the rows of the tokenizer's vocabulary,
times the model's embedding scale). W_out [V, D] is the LM head, W_in [V, D] the input embedding, so
W_a [D, D] solves min ||W_out W_a - W_in||^2 + lambda ||W_a||^2: it carries a vector from the output
space to the input space. The cache, with every earlier agent's prompt and latent thoughts, is the
working memory the next agent reads. The last agent appends its prompt and decodes the answer greedily in
text. With ``m = 0`` this is greedy decoding after the concatenated prompts.
"""
from __future__ import annotations

import time
import weakref

import torch

from .experts import Expert, fit_budget
from .kv import new_cache
from .soft_thinking import _left_pad

LAMBDA = 1e-5
_ALIGNMENTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def realignment(model: torch.nn.Module, *, lam: float = LAMBDA) -> torch.Tensor:
    """W_a [D, D] float32 on the model's device: (W_out^T W_out + lam I)^-1 W_out^T W_in, summed and solved in
    float64. Kept per model while its two matrices are unchanged."""
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if w_in.shape[1] != w_out.shape[1] or w_in.shape[0] != w_out.shape[0]:
        raise ValueError(f"latent-mas: the model's input embedding {tuple(w_in.shape)} and LM head "
                         f"{tuple(w_out.shape)} must both be [V, D] with one V and D")
    key = (w_in.data_ptr(), w_in._version, w_out.data_ptr(), w_out._version, lam)
    held = _ALIGNMENTS.get(model)
    if held is not None and held[0] == key:
        return held[1]
    D = w_in.shape[1]
    gram = torch.zeros(D, D, dtype=torch.float64, device=w_in.device)
    cross = torch.zeros(D, D, dtype=torch.float64, device=w_in.device)
    with torch.inference_mode():
        for s in range(0, w_in.shape[0], 8192):  # [8192, D] slices: no float64 copy of a whole matrix
            o, i = w_out[s:s + 8192].double(), w_in[s:s + 8192].double()
            gram += o.T @ o
            cross += o.T @ i
        gram.diagonal().add_(lam)
        w_a = torch.linalg.solve(gram, cross).float()
    _ALIGNMENTS[model] = (key, w_a)
    return w_a


class SharedCache:
    """One model's KV cache for a batch of prompts, appended to segment by segment. A segment of several
    tokens is left-padded, so padding may sit inside the sequence: the attention mask hides it and position
    ids count only real positions. Each append returns the last position's logits [B, V] and the LM head's
    input there, h [B, D]."""

    def __init__(self, model: torch.nn.Module, batch: int, pad_id: int, clock: list[float]):
        self.model, self.pad_id, self.clock = model, pad_id, clock
        self.device = model.get_input_embeddings().weight.device
        self.cache = new_cache("full", model.config)
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)

    def _forward(self, new_mask: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        positions = (self.next_pos.view(-1, 1) + new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        seen: list[torch.Tensor] = []
        hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model(**inputs, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                                 use_cache=True, logits_to_keep=1)
        finally:
            hook.remove()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.clock[0] += time.perf_counter() - start
        self.next_pos = self.next_pos + new_mask.sum(-1)
        return out.logits[:, -1], seen[-1][:, -1]

    def append_tokens(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append token ids (one list per prompt, any lengths, at least one token in one of them)."""
        ids, new_mask = _left_pad(rows, self.pad_id, self.device)
        return self._forward(new_mask, input_ids=ids)

    def append_embeds(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one input embedding per prompt (embeds [B, D])."""
        new_mask = torch.ones(embeds.shape[0], 1, dtype=torch.long, device=self.device)
        return self._forward(new_mask, inputs_embeds=embeds.unsqueeze(1))


def check_one_model(experts: list[Expert]) -> None:
    """LatentMAS shares one cache, so every role must be the same model object."""
    first = experts[0].model
    others = [e.name for e in experts[1:] if e.model is not first]
    if others:
        raise ValueError(f"latent-mas: every expert must share one model object (the agents share one KV cache), "
                         f"but {others} use another model than {experts[0].name!r}: pass roles of one model, e.g. "
                         f"Expert(model, tok, name=..., system_prompt=...) for each")


def _room(experts: list[Expert], rows: list[list[list[int]]], latent: int, max_new_tokens: int) -> int:
    """max_new_tokens cut to the model's positions (with a warning); ValueError when the prompts and latent steps
    alone do not fit. rows: per agent, per prompt, the ids it appends."""
    last, limit = experts[-1], experts[-1].max_positions
    if limit is None:
        return max_new_tokens
    used = [sum(len(agent[b]) for agent in rows) + latent for b in range(len(rows[0]))]
    b = max(range(len(used)), key=used.__getitem__)
    if used[b] > limit:
        raise ValueError(f"latent-mas: prompts[{b}] takes {used[b]} positions on the shared cache (every agent's "
                         f"prompt and {latent} latent steps), more than the {limit} positions of {last.name!r}'s "
                         f"model: shorten the prompt, use fewer roles or fewer latent steps")
    return fit_budget(max_new_tokens, [(last, limit - used[b] + 1)])


def latent_mas(experts: list[Expert], prompts: list[str], *, latent_steps: int, max_new_tokens: int, chat: bool,
               clock: list[float], progress: bool = False
               ) -> tuple[list[str], list[list[dict]], list[list[dict]], list[int]]:
    """Run the agents on one cache; returns (answer texts, per prompt its trace (one record per agent), per
    prompt its token counts per agent (``prefill_tokens``, ``decode_tokens``: latent steps, then decode
    forwards), per prompt the tokens generated). Greedy throughout: no randomness."""
    from tqdm.auto import tqdm

    check_one_model(experts)
    model, tok = experts[0].model, experts[0].tokenizer
    eos = experts[-1].eos_ids()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(eos or {0})
    B = len(prompts)
    rows = [[e.prompt_ids(p, chat=chat) for p in prompts] for e in experts]  # [agent][prompt] ids
    max_new_tokens = _room(experts, rows, latent_steps * (len(experts) - 1), max_new_tokens)
    w_a = realignment(model)
    target = float(experts[0].embedding.detach()[:experts[0].vocab_size].float().norm(dim=-1).mean()) \
        * experts[0].embed_scale
    cache = SharedCache(model, B, pad_id, clock)
    traces: list[list[dict]] = [[] for _ in prompts]
    counts: list[list[dict]] = [[] for _ in prompts]
    for i, agent in enumerate(tqdm(experts, desc="latent-mas agents", disable=not progress, unit="agent")):
        logits, h = cache.append_tokens(rows[i])
        steps = 0 if i == len(experts) - 1 else latent_steps
        tops: list[list[int]] = [[] for _ in prompts]
        for _ in range(steps):
            e = h.float() @ w_a  # [B, D]
            e = e * (target / e.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            logits, h = cache.append_embeds(e.to(experts[0].embedding.dtype))
            for b, t in enumerate(logits.argmax(-1).tolist()):
                tops[b].append(t)
        for b, p in enumerate(prompts):
            counts[b].append({"expert": agent.name, "prefill_tokens": len(rows[i][b]), "decode_tokens": steps})
            # The top-1 token at each latent step: a reading aid, not something any agent reads.
            traces[b].append({"agent": agent.name, "prompt": p, "latent_steps": steps,
                              "latent_top1": tok.decode(tops[b], skip_special_tokens=False)})
    texts, decoded, generated = _greedy(cache, logits, tok, eos, pad_id, max_new_tokens)
    for b, text in enumerate(texts):
        traces[b][-1]["text"] = text
        counts[b][-1]["decode_tokens"] = decoded
    return texts, traces, counts, generated


def _greedy(cache: SharedCache, logits: torch.Tensor, tok, eos: set[int], pad_id: int, max_new_tokens: int
            ) -> tuple[list[str], int, list[int]]:
    """Greedy decoding from the last append's logits [B, V], as transformers' generate does it (a row that ended
    is fed padding until every row has); returns (texts, decode forwards (each one token of every row), per row
    the tokens generated up to and including its end-of-sequence token)."""
    B = logits.shape[0]
    kept: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    decoded, generated = 0, [0] * B
    for step in range(max_new_tokens):
        token = logits.argmax(-1).tolist()
        for b, t in enumerate(token):
            if done[b]:
                token[b] = pad_id
                continue
            generated[b] += 1
            if t in eos:
                done[b] = True
            else:
                kept[b].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, _ = cache.append_tokens([[t] for t in token])
        decoded += 1
    return [tok.decode(k, skip_special_tokens=True) for k in kept], decoded, generated
