"""Soft Thinking engines: one model, its KV cache, and the rows of every expert (role) that uses it.

Experts that share weights (one model in several roles) run as one batched forward each step: rows are
role-major, ``row = role * B + b``. A step's input is a packet; its embedding is ``soft_embed`` with the
model's own input-embedding matrix and embedding scale, so an explicit token (the packet {(id, 1.0)})
gives exactly what the model's embedding layer gives. Prompts are left-padded; position ids follow the
attention mask as transformers' ``generate`` computes them.
"""
from __future__ import annotations

import math
import time

import torch

from .experts import Expert
from .ops import soft_embed


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, L] ids, [N, L] mask) with each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class SoftThinkingEngine:
    """Runs ``experts`` (all on the same model) over a batch of B prompts."""

    def __init__(self, experts: list[Expert]):
        self.experts = experts
        self.model = experts[0].model
        self.tokenizer = experts[0].tokenizer
        self.device = experts[0].device
        self.weight = experts[0].embedding
        self.scale = experts[0].embed_scale
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (experts[0].eos_ids() or {0}).pop()
        self.forward_s = 0.0
        self.prefill_tokens = [0] * len(experts)
        self.decode_tokens = [0] * len(experts)
        # KV cache kind for prefill / decode (see dlmom.kv_cache.new_cache); set by each prefill.
        self.kv, self.kv_group_size, self.kv_residual_length = "full", 32, 128
        self.cache = None

    @property
    def roles(self) -> int:
        return len(self.experts)

    def _new_cache(self, kv: str | None = None):
        from .kv_cache import new_cache

        return new_cache(kv or self.kv, self.model.config, group_size=self.kv_group_size,
                         residual_length=self.kv_residual_length)

    def cache_nbytes(self) -> int:
        """Bytes the prefill / decode cache holds now (all rows of all roles)."""
        from .kv_cache import cache_nbytes

        return cache_nbytes(self.cache)

    def _run(self, new_mask: torch.Tensor, cache, mask: torch.Tensor | None, next_pos: torch.Tensor,
             keep: int, **inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward of new positions; returns (logits [N, keep or all, V], full mask, next positions)."""
        full = new_mask if mask is None else torch.cat([mask, new_mask], dim=1)
        positions = (next_pos.view(-1, 1) + new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(**inputs, attention_mask=full, position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=keep)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forward_s += time.perf_counter() - start
        return out.logits, full, next_pos + new_mask.sum(-1)

    def _count(self, counts: list[int], new_mask: torch.Tensor) -> None:
        per_row = new_mask.sum(-1).view(self.roles, -1).sum(-1).tolist()
        for r, n in enumerate(per_row):
            counts[r] += int(n)

    def prefill(self, prompts: list[str], *, chat: bool, kv: str = "full", kv_group_size: int = 32,
                kv_residual_length: int = 128) -> torch.Tensor:
        """Start a generation: reset the counters, prefill every role's prompt for every prompt into a new
        cache of kind ``kv``; returns next-token logits [R, B, V_model]."""
        self.kv, self.kv_group_size, self.kv_residual_length = kv, kv_group_size, kv_residual_length
        self.forward_s = 0.0
        self.prefill_tokens = [0] * self.roles
        self.decode_tokens = [0] * self.roles
        self.batch = len(prompts)
        rows = [e.prompt_ids(p, chat=chat) for e in self.experts for p in prompts]
        self.fed = [list(r) for r in rows]  # token ids each row's cache holds (token feeds only, not packets)
        ids, new_mask = _left_pad(rows, self.pad_id, self.device)
        self.cache = self._new_cache()
        zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, None, zero, 1, input_ids=ids)
        self._count(self.prefill_tokens, new_mask)
        return logits[:, -1].view(self.roles, self.batch, -1)

    def feed_packet(self, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Feed one packet per prompt (ids, probs [B, k]) to every role; returns logits [R, B, V_model]."""
        emb = soft_embed(ids.repeat(self.roles, 1), probs.repeat(self.roles, 1), self.weight, scale=self.scale)
        new_mask = torch.ones(emb.shape[0], 1, dtype=torch.long, device=self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, self.mask, self.next_pos, 1,
                                                     inputs_embeds=emb.unsqueeze(1))
        self._count(self.decode_tokens, new_mask)
        return logits[:, -1].view(self.roles, self.batch, -1)

    def feed_tokens(self, per_prompt: list[list[int]]) -> torch.Tensor | None:
        """Feed a variable number of token ids per prompt (the Text-Bridge); None when there is nothing."""
        if not any(per_prompt):
            return None
        rows = per_prompt * self.roles
        for held, new in zip(self.fed, rows):
            held.extend(new)
        ids, new_mask = _left_pad(rows, self.pad_id, self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, self.mask, self.next_pos, 1,
                                                     input_ids=ids)
        self._count(self.decode_tokens, new_mask)
        return logits[:, -1].view(self.roles, self.batch, -1)

    def bits_per_byte(self, prompts: list[str], continuations: list[str], *, chat: bool) -> torch.Tensor:
        """[R, B]: -log2 p(continuation | prompt) per byte of continuation text, for every role, teacher-forced
        in a fresh cache. Per byte, not per token: comparable across tokenizers."""
        rows, spans = [], []
        for e in self.experts:
            for p, text in zip(prompts, continuations):
                head = e.prompt_ids(p, chat=chat)
                tail = self.tokenizer.encode(text, add_special_tokens=False)
                rows.append(head + tail)
                spans.append(len(tail))
        ids, mask = _left_pad(rows, self.pad_id, self.device)
        zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        # Only the positions that predict a continuation token: the prompt's logits would be [N, L, V].
        # One teacher-forced forward: a compressed cache would only cost time here.
        keep = max(spans) + 1
        logits, _, _ = self._run(mask, self._new_cache("full"), None, zero, keep, input_ids=ids)  # [N, keep, V]
        self._count(self.prefill_tokens, mask)
        targets = ids[:, ids.shape[1] - keep + 1:, None]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets)[..., 0]  # [N, keep-1]
        bits = [-float(logp[i, keep - 1 - n:].sum()) / math.log(2) if n else 0.0 for i, n in enumerate(spans)]
        nbytes = [max(len(t.encode()), 1) for t in continuations] * self.roles
        return (torch.tensor(bits) / torch.tensor(nbytes, dtype=torch.float32)).view(self.roles, -1)
