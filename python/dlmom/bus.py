"""The latent bus: packets between experts (with their byte counts) and the Text-Bridge.

Experts that share a vocabulary receive the step's packet (ids, probs) directly. An expert with another
tokenizer is fed by the Text-Bridge: the step's top-1 token, decoded to text with the primary tokenizer
and re-encoded with its own, so its KV cache follows the same text; its logits reach the consensus through
a vocabulary alignment. ``Bus`` does all of this for one generation and counts the bytes.
"""
from __future__ import annotations

import torch

from .placement import gather


def packet_bytes(ids: torch.Tensor, probs: torch.Tensor) -> int:
    """Bytes of one row's packet as sent: k ids plus k probabilities, at their element sizes."""
    return ids.shape[-1] * (ids.element_size() + probs.element_size())


class TextBridge:
    """Turns the primary token stream of each row into new tokens of another tokenizer.

    The whole text is re-encoded each step and only the tokens past those already fed are sent, so a
    fragment never picks up a tokenizer's word-start marker of its own. When the new text re-tokenises
    what was already fed (a merge across the boundary), the fragment alone is encoded instead and the
    event is counted in ``resyncs``.
    """

    def __init__(self, source_tokenizer, target_tokenizer, batch: int):
        self.source = source_tokenizer
        self.target = target_tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.sent: list[str] = [""] * batch  # text already fed to the target
        self.fed: list[list[int]] = [[] for _ in range(batch)]  # target ids fed (after the prompt)
        self.resyncs = 0

    def push(self, ids: list[int | None]) -> tuple[list[list[int]], list[int]]:
        """Append each row's token (None: nothing this step); return per row the target ids to feed and the
        bytes of text that crossed the bridge."""
        out, nbytes = [], [0] * len(ids)
        for row, tok in enumerate(ids):
            if tok is not None:
                self.tokens[row].append(int(tok))
            text = self.source.decode(self.tokens[row], skip_special_tokens=True)
            # Hold back an incomplete multi-byte character until its last byte arrives.
            if text.endswith("\ufffd") or not text.startswith(self.sent[row]) or text == self.sent[row]:
                out.append([])
                continue
            full = self.target.encode(text, add_special_tokens=False)
            held = self.fed[row]
            if full[:len(held)] == held:
                new = full[len(held):]
            else:
                self.resyncs += 1
                new = self.target.encode(text[len(self.sent[row]):], add_special_tokens=False)
            nbytes[row] = len(text[len(self.sent[row]):].encode())
            self.sent[row] = text
            held.extend(new)
            out.append(new)
        return out, nbytes


def vocab_alignment(source_tokenizer, target_tokenizer, source_size: int) -> torch.Tensor:
    """[source_size] int64: for each source token id, the target id with the same text, or -1."""
    target_index: dict[str, int] = {}
    for i, text in enumerate(target_tokenizer.batch_decode([[i] for i in range(len(target_tokenizer))])):
        target_index.setdefault(text, i)
    texts = source_tokenizer.batch_decode([[i] for i in range(source_size)])
    return torch.tensor([target_index.get(t, -1) for t in texts], dtype=torch.long)


def align_logits(logits: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """[B, V_target] logits -> [B, V_source] on the source vocabulary via ``mapping``; a token the target
    cannot spell gets the row's lowest finite logit: a vote against it, never a veto (-inf)."""
    x = logits.float()
    floor = torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf"))).amin(-1, keepdim=True)
    out = x[:, mapping.clamp(min=0).to(x.device)]
    return torch.where((mapping >= 0).to(x.device).view(1, -1), out, floor)


class Bus:
    """One generation's bus between the runners (one per model) and the consensus on the primary vocabulary.

    ``bridged[i]``: runner i has another tokenizer (Text-Bridge in, aligned logits out). ``alignments``: a
    cache of vocabulary alignments by runner index, kept across generations by the caller."""

    def __init__(self, runners, bridged: list[bool], primary, alignments: dict[int, torch.Tensor]):
        self.runners, self.bridged, self.primary, self.alignments = runners, bridged, primary, alignments
        batch = runners[0].batch
        self.bridges = {i: TextBridge(primary.tokenizer, r.tokenizer, batch) for i, r in enumerate(runners)
                        if bridged[i]}
        self.bytes = torch.zeros(batch, dtype=torch.long)  # per prompt: packets and bridge text sent
        # Deferred runners (the gate kept the lead alone): per prompt the explicit tokens not fed yet.
        self.pending: dict[int, list[list[int]]] = {}

    def _alignment(self, index: int) -> torch.Tensor:
        if index not in self.alignments:
            runner = self.runners[index]
            self.alignments[index] = vocab_alignment(self.primary.tokenizer, runner.tokenizer,
                                                     self.primary.vocab_size).to(runner.device)
        return self.alignments[index]

    def stack(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """[E, B, V_primary] float32 from every runner's [R, B, V_model] logits."""
        V = self.primary.vocab_size
        parts = []
        for i, x in enumerate(logits):
            if self.bridged[i]:
                R, B, _ = x.shape
                x = align_logits(x.reshape(R * B, -1), self._alignment(i)).view(R, B, V)
            parts.append(x[..., :V].float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def packet_bytes(self, ids: torch.Tensor, probs: torch.Tensor) -> list[int]:
        """Per prompt the bytes of this step's packet: one to each of its rows on the primary vocabulary."""
        receivers = sum((r.rows_per_prompt() for i, r in enumerate(self.runners) if not self.bridged[i]),
                        torch.zeros(len(ids), dtype=torch.long))
        return (receivers * packet_bytes(ids, probs)).tolist()

    def count(self, step_bytes: list[int], finished: torch.Tensor) -> None:
        """Add this step's packet bytes (``packet_bytes``) of the prompts still running."""
        self.bytes += torch.tensor(step_bytes, dtype=torch.long).masked_fill(finished, 0)

    @property
    def total_bytes(self) -> int:
        return int(self.bytes.sum())

    def deliver(self, logits: list[torch.Tensor], ids: torch.Tensor, probs: torch.Tensor,
                last_tokens: list[int | None], defer: frozenset[int] = frozenset()) -> list[torch.Tensor]:
        """Every runner with active rows takes the step's input: the packet (ids, probs [B, k]), or over the
        Text-Bridge the new text of ``last_tokens`` (per prompt, None: nothing). Returns the new logits (zeros
        in rows that left the batch: they have no weight in the consensus) and counts the bridge's bytes.

        A runner in ``defer`` (on the primary vocabulary; the step is an explicit token for every prompt) runs
        no forward: the token waits in ``pending`` and its logits stay those of an earlier step (stale) until
        ``catch_up`` feeds every waiting token in one forward."""
        new = []
        for i, runner in enumerate(self.runners):
            if not runner.live:
                new.append(torch.zeros_like(logits[i]))  # every row dropped or finished: no more forwards
            elif i in defer:
                waiting = self.pending.setdefault(i, [[] for _ in last_tokens])
                for b, token in enumerate(last_tokens):
                    if token is not None:
                        waiting[b].append(int(ids[b, 0]))
                new.append(logits[i])
            elif i in self.bridges:
                fed, n = self.bridges[i].push(last_tokens)
                self.bytes += torch.tensor(n, dtype=torch.long) * runner.rows_per_prompt()
                out = runner.feed_tokens(fed)
                new.append(logits[i] if out is None else out)
            else:
                new.append(runner.feed_packet(ids, probs))
        return gather(new)  # a remote runner's forwards were all issued above: they run together

    def catch_up(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feed every deferred runner its waiting tokens (one forward each); the logits with theirs fresh."""
        logits = list(logits)
        for i, waiting in self.pending.items():
            if self.runners[i].live:
                out = self.runners[i].feed_tokens(waiting)
                if out is not None:
                    logits[i] = out
        self.pending = {}
        return gather(logits)

    @property
    def resyncs(self) -> int:
        return sum(bridge.resyncs for bridge in self.bridges.values())
