"""Soft Thinking runners: one model, its KV cache, and the rows of every expert (role) that uses it, for one
generation (a new runner per generation: its cache, masks and counters are that generation's own).

Experts that share weights (one model in several roles) run as one batched forward each step: rows are
role-major, ``row = role * B + b``. A step's input is a packet; its embedding is ``soft_embed`` with the
model's own input-embedding matrix and embedding scale, so an explicit token (the packet {(id, 1.0)})
gives exactly what the model's embedding layer gives. Prompts are left-padded; position ids follow the
attention mask as transformers' ``generate`` computes them.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .experts import Expert
from .kv import KVSettings, cache_nbytes
from .settings import check_fields, setting
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


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix that every row starts with."""
    n = 0
    for column in zip(*rows):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


@dataclasses.dataclass(kw_only=True)
class RunnerSettings:
    """How the runners build and prefill the prompts (fields of DLMoMConfig)."""

    chat: bool = setting(True, "apply each tokenizer's chat template (with the expert's role as system prompt)",
                         flag="--no-chat")
    share_prefill: bool = setting(True, "roles of one model prefill the prompt prefix they have in common once")

    def __post_init__(self):
        check_fields(self)


class SoftThinkingRunner:
    """Runs ``experts`` (all on the same model) over a batch of B prompts.

    Rows are the (role, prompt) pairs, role-major (``row = role * B + b``). Only the *active* rows are in the
    batch and the cache: ``keep_rows`` removes rows the router dropped or whose prompt finished, and every
    later forward skips them. Methods that return logits give [R, B, V_model] with zeros in inactive rows.
    """

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
        # Tokens per row [R, B] (role, prompt): computed in prefills, taken from a shared prefix, decoded.
        self.prefill_tokens = self.shared_prefill_tokens = self.decode_tokens = torch.zeros(0, 0, dtype=torch.long)
        self.kv = KVSettings()  # the prefill / decode cache's settings; set by prefill
        self.cache, self._peak_cache, self._grid = None, 0, None
        self.batch = 0
        self.room: int | None = None  # tokens that fit after the longest prompt of the last prefill (None: no limit)
        self.active = torch.zeros(0, dtype=torch.long)

    @property
    def roles(self) -> int:
        return len(self.experts)

    @property
    def live(self) -> bool:
        """Whether any row is still in the batch."""
        return self.active.numel() > 0

    def _new_cache(self, kind: str | None = None):
        return self.kv.new_cache(self.model.config, kind)

    def cache_nbytes(self) -> int:
        """Bytes the prefill / decode cache holds now (the active rows of all roles)."""
        return cache_nbytes(self.cache)

    def peak_cache_bytes(self) -> int:
        """The most bytes the cache has held in this generation (it grows until rows leave it)."""
        self._peak_cache = max(self._peak_cache, self.cache_nbytes())
        return self._peak_cache

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

    @staticmethod
    def _count(counts: torch.Tensor, new_mask: torch.Tensor, rows: torch.Tensor) -> None:
        """Add each row's new positions (new_mask [N, L]) to ``counts`` [R, B] at its row (rows [N], role-major)."""
        counts.view(-1).index_add_(0, rows.cpu(), new_mask.sum(-1).cpu())

    def _scatter(self, logits: torch.Tensor) -> torch.Tensor:
        """[R, B, V] from the last-position logits [N_active, 1, V] of the active rows (zeros elsewhere).
        Once rows have left, one [R * B, V] buffer is refilled every step (valid until the next feed)."""
        if self.active.numel() == self.roles * self.batch:
            return logits[:, -1].view(self.roles, self.batch, -1)
        if self._grid is None:
            self._grid = logits.new_zeros(self.roles * self.batch, logits.shape[-1])
        self._grid[self.active.to(logits.device)] = logits[:, -1]
        return self._grid.view(self.roles, self.batch, -1)

    def prefill(self, prompts: list[str], *, chat: bool, kv: KVSettings | None = None,
                share_prefix: bool = True) -> torch.Tensor:
        """Start a generation: reset the counters, prefill every role's prompt for every prompt into a new
        cache of ``kv`` (default: full precision); returns next-token logits [R, B, V_model]. A prompt longer than the model's
        positions raises ValueError before any forward; ``room`` is then how many tokens fit after the longest.

        With ``share_prefix`` and several roles, the token prefix that all roles' prompts of one prompt have in
        common (e.g. the chat template's opening) is computed once and its cache copied to every role; each role
        then prefills only the rest. ``shared_prefill_tokens`` [R, B] counts per row the prompt tokens it took from
        that shared prefix instead of computing them (the first role computes the prefix: it is in its
        ``prefill_tokens``)."""
        self.kv = kv or KVSettings()
        self.forward_s = 0.0
        self.batch = B = len(prompts)
        self.prefill_tokens, self.shared_prefill_tokens, self.decode_tokens = (
            torch.zeros(self.roles, B, dtype=torch.long) for _ in range(3))
        rows = [e.prompt_ids(p, chat=chat) for e in self.experts for p in prompts]
        # Before any forward: a prompt past the model's positions is refused here, not run.
        rooms = [e.context_room(rows[r * B:(r + 1) * B]) for r, e in enumerate(self.experts)]
        self.room = min((n for n in rooms if n is not None), default=None)
        self.fed = [list(r) for r in rows]  # token ids each row's cache holds (token feeds only, not packets)
        self.active = torch.arange(len(rows))
        self.cache, self._peak_cache, self._grid = self._new_cache(), 0, None
        # Shared prefix per prompt; at least one token of every row stays in the suffix (it gives the logits).
        shared = [0] * B
        if share_prefix and self.roles > 1:
            shared = [min(_common_prefix(rows[b::B]), min(len(r) for r in rows[b::B]) - 1) for b in range(B)]
        mask, next_pos = None, torch.zeros(B, dtype=torch.long, device=self.device)
        if any(shared):
            ids, new_mask = _left_pad([rows[b][:shared[b]] for b in range(B)], self.pad_id, self.device)
            _, mask, next_pos = self._run(new_mask, self.cache, None, next_pos, 1, input_ids=ids)
            self._count(self.prefill_tokens, new_mask, torch.arange(B))  # computed once, by the first role
            self.shared_prefill_tokens[1:] += torch.tensor(shared)
            to_rows = torch.arange(self.roles * B, device=self.device) % B  # role-major copies of the B rows
            self.cache.reorder_cache(to_rows)
            mask, next_pos = mask[to_rows], next_pos[to_rows]
        else:
            next_pos = next_pos.repeat(self.roles)
        suffixes = [r[shared[i % B]:] for i, r in enumerate(rows)]
        ids, new_mask = _left_pad(suffixes, self.pad_id, self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, mask, next_pos, 1, input_ids=ids)
        self._count(self.prefill_tokens, new_mask, self.active)
        return self._scatter(logits)

    def rows_per_prompt(self) -> torch.Tensor:
        """[B]: how many active rows (roles) each prompt has."""
        return torch.bincount(self.active % self.batch, minlength=self.batch)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows where ``keep`` [R, B] (bool) is True among the active ones: the others leave the
        batch, the cache, and every later forward (a routed-out role, a finished prompt)."""
        flat = keep.reshape(-1).to(torch.bool).cpu()
        stay = flat[self.active]
        if bool(stay.all()):
            return
        self.peak_cache_bytes()
        if self._grid is not None:
            self._grid[self.active[~stay].to(self._grid.device)] = 0
        self.active = self.active[stay]
        if not self.live:
            self.cache = self.mask = self.next_pos = None  # nothing left to run: free the cache
            return
        index = stay.nonzero()[:, 0].to(self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]

    def feed_packet(self, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Feed one packet per prompt (ids, probs [B, k]) to every active row; returns logits [R, B, V_model]."""
        b = (self.active % self.batch).to(ids.device)
        emb = soft_embed(ids[b], probs[b], self.weight, scale=self.scale)
        new_mask = torch.ones(emb.shape[0], 1, dtype=torch.long, device=self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, self.mask, self.next_pos, 1,
                                                     inputs_embeds=emb.unsqueeze(1))
        self._count(self.decode_tokens, new_mask, self.active)
        return self._scatter(logits)

    def feed_tokens(self, per_prompt: list[list[int]]) -> torch.Tensor | None:
        """Feed a variable number of token ids per prompt to every active row (the Text-Bridge); None when
        no active row gets any."""
        rows = [per_prompt[i % self.batch] for i in self.active.tolist()]
        if not any(rows):
            return None
        for i, new in zip(self.active.tolist(), rows):
            self.fed[i].extend(new)
        ids, new_mask = _left_pad(rows, self.pad_id, self.device)
        logits, self.mask, self.next_pos = self._run(new_mask, self.cache, self.mask, self.next_pos, 1,
                                                     input_ids=ids)
        self._count(self.decode_tokens, new_mask, self.active)
        return self._scatter(logits)

    def teacher_forced(self, rows: list[list[int]], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, keep, V_model] of the last ``keep`` positions, the left-padded ids [N, L]) of token rows
        (role-major, ``len(rows)`` a multiple of the roles), in one forward over a fresh full-precision cache (a
        compressed one would only cost time here). Within a generation (one row per role and prompt of its
        prefill, ``row = role * B + b``) their tokens count as prefilled by those rows."""
        ids, mask = _left_pad(rows, self.pad_id, self.device)
        zero = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        logits, _, _ = self._run(mask, self._new_cache("full"), None, zero, keep, input_ids=ids)
        if len(rows) == self.prefill_tokens.numel():
            self._count(self.prefill_tokens, mask, torch.arange(len(rows)))
        return logits, ids
