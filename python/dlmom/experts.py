"""Experts: a causal LM, its tokenizer and a role (a system prompt); building them from what users pass.

Loading a model from a hub id, a folder or a GGUF file is dlmom.loading's; the GGUF conversion cache is
dlmom.gguf_cache's.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings

import torch

from . import loading


# The embedded default: one model in three roles.
DEFAULT_ROLES = {
    "planner": "You are a planner. Work out the steps needed to answer, then answer concisely.",
    "solver": "You are a careful solver. Answer the question accurately and concisely.",
    "checker": "You are a checker. Verify each step before you state the final answer concisely.",
}


_MARKER = "dlmom0prompt0marker"  # stands in for the prompt to show where a chat template puts it


@dataclasses.dataclass
class Expert:
    """One expert: a causal LM with its tokenizer, a name, and an optional role (a system prompt).

    ``num_gpus`` / ``num_cpus``: what its model's Ray actor reserves under ``placement="ray"`` (roles of one
    model share one actor, which reserves the most any of them asks; num_cpus None: Ray's default for an
    actor). With ``num_gpus`` > 0 the actor moves the model to its GPU. Ignored under ``placement="local"``."""

    model: torch.nn.Module
    tokenizer: object
    name: str = ""
    system_prompt: str | None = None
    num_gpus: float = 0.0
    num_cpus: float | None = None

    def __post_init__(self):
        if isinstance(self.model, (str, bytes, os.PathLike)):
            raise ValueError(f"Expert: model must be a loaded transformers causal LM, got the string {str(self.model)!r}; "
                             f"pass a hub id, folder or .gguf path alone as an expert (DLMoM([{str(self.model)!r}])) "
                             f"or load it with dlmom.loading.load_pretrained")
        if not hasattr(self.model, "get_input_embeddings") or not callable(self.model):
            raise ValueError(f"Expert: model must be a transformers causal LM, got {type(self.model).__name__}")
        tok = self.tokenizer
        if isinstance(tok, (str, bytes, os.PathLike)):
            raise ValueError(f"Expert: tokenizer must be a transformers tokenizer, got the string {str(tok)!r}; load "
                             f"it first: AutoTokenizer.from_pretrained({str(tok)!r})")
        missing = [m for m in ("encode", "decode", "convert_ids_to_tokens", "__len__") if not callable(getattr(tok, m, None))]
        if missing:
            raise ValueError(f"Expert: tokenizer must be a transformers tokenizer, got {type(tok).__name__} (it has no "
                             f"{', '.join(missing)})")
        if not isinstance(self.name, str):
            raise ValueError(f"Expert: name must be a string, got {type(self.name).__name__} {self.name!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"Expert: system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
        for field in ("num_gpus", "num_cpus"):
            value = getattr(self, field)
            if not (value is None and field == "num_cpus") and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not value >= 0):
                raise ValueError(f"Expert: {field} must be a number >= 0{' or None' if field == 'num_cpus' else ''}, "
                                 f"got {value!r}")
        if not self.name:
            self.name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def embedding(self) -> torch.Tensor:
        """The input-embedding matrix [V_model, D]."""
        return self.model.get_input_embeddings().weight

    @property
    def embed_scale(self) -> float:
        """The model's embedding multiplier (sqrt(hidden) for Gemma), as its embedding layer applies it."""
        scale = getattr(self.model.get_input_embeddings(), "embed_scale", None)
        if scale is None:
            return 1.0
        if torch.is_tensor(scale):  # stored in the weight dtype; use the value the layer multiplies by
            return float(scale.to(self.embedding.dtype).float())
        return float(scale)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's real vocabulary (embedding matrices are often padded beyond it)."""
        return min(len(self.tokenizer), self.embedding.shape[0])

    def vocab_key(self) -> tuple:
        """Experts with equal keys share token ids: they can exchange packets directly."""
        tok = self.tokenizer
        return (type(tok).__name__, len(tok), tok.convert_ids_to_tokens(list(range(min(64, len(tok))))).__repr__(),
                tok.convert_ids_to_tokens(len(tok) - 1))

    def prompt_ids(self, prompt: str, *, chat: bool) -> list[int]:
        """Token ids of a prompt: the chat template with this expert's system prompt, or the raw text.

        The prompt is user text: a control string of the tokenizer in it (``<|im_start|>system ...``) is
        tokenised as plain text, never as the control token, so a prompt cannot open a turn of its own."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            return self._chat_ids(prompt)
        text = prompt if not self.system_prompt else f"{self.system_prompt}\n\n{prompt}"
        return tok.encode(text, split_special_tokens=True)

    def prompt_head_ids(self, *, chat: bool) -> list[int]:
        """The token ids ``prompt_ids`` puts before the user's text: the chat template's head with this expert's
        system prompt, or the tokenizer's start tokens and the system prompt's paragraph."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            head = self._render(_MARKER).partition(_MARKER)[0]
            return tok.encode(head, add_special_tokens=False)
        return tok.encode(f"{self.system_prompt}\n\n" if self.system_prompt else "", split_special_tokens=True)

    def _render(self, content: str) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _chat_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        text = self._render(prompt)
        controls = [s for s in _control_strings(tok) if s in prompt]
        if not controls:  # the common case: exactly what apply_chat_template(tokenize=True) gives
            return tok.encode(text, add_special_tokens=False)
        # The template around the user's text keeps its control tokens; the text itself is split. A marker
        # in place of the prompt shows where the template puts it (and what it does to it, e.g. a trim).
        head, sep, tail = self._render(_MARKER).partition(_MARKER)
        if not sep or not text.startswith(head) or not text.endswith(tail) or len(text) < len(head) + len(tail):
            raise ValueError(f"expert {self.name!r}: the prompt contains the tokenizer's control string "
                             f"{controls[0]!r} and the chat template does not place the prompt where it can be kept "
                             "as plain text; remove the control string or pass chat=False")
        body = text[len(head):len(text) - len(tail)]
        return (tok.encode(head, add_special_tokens=False) + tok.encode(body, add_special_tokens=False,
                                                                          split_special_tokens=True)
                + tok.encode(tail, add_special_tokens=False))

    @property
    def max_positions(self) -> int | None:
        """The most positions the model takes (its config's max_position_embeddings); None when it states none."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(config, "max_position_embeddings", None)
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def context_room(self, rows: list[list[int]]) -> int | None:
        """How many tokens can be generated after each of ``rows`` (prompt ids) within the model's positions
        (the last one is never fed back, so a prompt of exactly max_positions tokens still answers one);
        None when the model states no limit. ValueError names a prompt that alone is longer."""
        limit = self.max_positions
        if limit is None:
            return None
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        n = len(rows[longest])
        if n > limit:
            raise ValueError(f"prompts[{longest}] is {n} tokens for expert {self.name!r} (its chat template and "
                             f"role included), more than the {limit} positions its model takes: shorten the prompt")
        return limit - n + 1

    def eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids


def _control_strings(tokenizer) -> list[str]:
    """The texts that the tokenizer turns into special (control) tokens."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added))
    return sorted((s for s in found if s), key=len, reverse=True)


def fit_budget(max_new_tokens: int, rooms: list[tuple["Expert", int | None]]) -> int:
    """``max_new_tokens``, or what fits the tightest expert's context (``rooms``: (expert, context_room)) with a
    warning that names that expert: a budget past a model's positions is cut, never run silently."""
    known = [(room, e) for e, room in rooms if room is not None]
    if not known:
        return max_new_tokens
    room, tight = min(known, key=lambda x: x[0])
    if room >= max_new_tokens:
        return max_new_tokens
    warnings.warn(f"max_new_tokens={max_new_tokens} would run past the {tight.max_positions} positions of expert "
                  f"{tight.name!r} for the longest prompt: generating at most {room} tokens", UserWarning, stacklevel=3)
    return room


def default_experts(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[Expert]:
    """SmolLM2-135M-Instruct in three roles sharing one set of weights (the GGUF package when installed)."""
    gguf = loading.default_gguf_path()
    model, tokenizer = loading.load_pretrained(gguf if gguf is not None else loading.DEFAULT_MODEL_HUB_ID, dtype=dtype,
                                               device=device)
    return in_roles([Expert(model, tokenizer, name="SmolLM2-135M-Instruct")])


def in_roles(experts: list[Expert]) -> list[Expert]:
    """Each expert in each of DEFAULT_ROLES (planner, solver, checker), in that order: one Expert per role, its
    system prompt the role's, sharing the expert's model and tokenizer (one set of weights, one forward a step
    for all its roles), named ``<expert's name>/<role>``."""
    for i, expert in enumerate(experts):
        if expert.system_prompt is not None:
            raise ValueError(f"experts[{i}] ({expert.name!r}) has a system prompt already: roles give each expert "
                             f"theirs, so pass experts without one")
    return [dataclasses.replace(expert, name=f"{expert.name}/{role}", system_prompt=prompt)
            for expert in experts for role, prompt in DEFAULT_ROLES.items()]


def as_expert(item, index: int) -> Expert:
    """An Expert from an Expert, a (model, tokenizer) pair, or a hub id / folder / GGUF path."""
    if isinstance(item, Expert):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        try:
            return Expert(item[0], item[1])
        except ValueError as err:  # name the pair in the list
            raise ValueError(f"experts[{index}]: {str(err).removeprefix('Expert: ')}") from None
    if isinstance(item, (str, os.PathLike)):
        model, tokenizer = loading.load_pretrained(item)
        return Expert(model, tokenizer, name=pathlib.Path(item).name if str(item).endswith(".gguf") else str(item))
    raise ValueError(f"experts[{index}] must be an Expert, a (model, tokenizer) pair, a hub id, a folder or a "
                     f".gguf path, got {type(item).__name__}")


# What counts as one expert rather than a list of them (a tuple is a (model, tokenizer) pair).
SINGLE_EXPERT = (str, os.PathLike, Expert, tuple)


def as_experts(experts) -> list[Expert]:
    """A non-empty list of Experts from one expert spec or an iterable of them (see ``as_expert``)."""
    if isinstance(experts, SINGLE_EXPERT) or not hasattr(experts, "__iter__"):
        experts = [experts]
    experts = [as_expert(e, i) for i, e in enumerate(experts)]
    if not experts:
        raise ValueError("experts must hold at least one expert, got an empty list")
    return experts
