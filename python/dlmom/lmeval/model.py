"""dlmom as a model of EleutherAI's lm-evaluation-harness: ``DLMoMLM``, registered as "dlmom".

Python: ``lm_eval.simple_evaluate(model=DLMoMLM(["org/a", "org/b"], controller="swir"), tasks=[...])``, or by
name once this module is imported: ``simple_evaluate(model="dlmom", model_args="experts=org/a|org/b,top_k=8")``
(lm-eval splits model_args at commas, so experts are separated by ``|``; every DLMoMConfig field is a key).
"""
from __future__ import annotations

import copy
import dataclasses

import lm_eval.models  # noqa: F401  lm-eval's own models: its get_model imports them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..engine import DLMoM, DLMoMConfig
from ..loading import check_device
from ..settings import field_names
from . import scoring

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model's default
DEFAULT_MAX_LENGTH = 2048  # rolling windows for models whose config states no positions (lm-eval's HF default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one generate_until request asks for (its gen_kwargs, checked)."""

    until: tuple[str, ...]
    max_gen_toks: int
    do_sample: bool
    temperature: float | None  # only when sampling
    top_p: float | None  # only when sampling


def generation_of(gen_kwargs) -> Generation:
    """A request's gen_kwargs as a Generation. ``until``: stop strings; ``max_gen_toks``: the token budget
    (default 256); greedy unless ``do_sample`` is true, then ``temperature`` and ``top_p`` (default: the config's)
    set the packets' as well. Without do_sample, temperature and top_p are ignored (greedy). Any other key is an
    error: dlmom cannot honour it."""
    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"generate_until: gen_kwargs {unknown} are not supported by dlmom (it takes "
                         f"{', '.join(GEN_KWARGS)}); drop them from the task's generation_kwargs or --gen_kwargs")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) and s for s in until):
        raise ValueError(f"generate_until: until must be a non-empty string or a list of them, got {until!r}")
    budget = gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"generate_until: max_gen_toks must be an integer >= 1, got {budget!r}")
    sample = gen_kwargs.get("do_sample", False)
    if not isinstance(sample, bool):
        raise ValueError(f"generate_until: do_sample must be true or false, got {sample!r}")
    temperature, top_p = (gen_kwargs.get("temperature"), gen_kwargs.get("top_p")) if sample else (None, None)
    if sample and temperature is not None and temperature <= 0:
        raise ValueError(f"generate_until: do_sample needs a temperature > 0, got {temperature!r}")
    return Generation(tuple(until), budget, sample, temperature, top_p)


def check_sampling(config: DLMoMConfig) -> None:
    """In lm-eval each task chooses greedy or sampled generation (its gen_kwargs): a config that samples is an
    error rather than a setting that would be overridden unseen."""
    if config.do_sample:
        raise ValueError("do_sample must stay off: lm-eval tasks choose sampling themselves (generation_kwargs "
                         "do_sample, temperature, top_p; override them with --gen_kwargs do_sample=true,temperature=X)")


@register_model("dlmom")
class DLMoMLM(LM):
    """A DL-MoM mixture as an lm-eval model.

    ``experts``: a DLMoM (used as it is), or what ``DLMoM.from_pretrained`` takes (a list, or one string of
    specs separated by ``|``; None: the default mixture), loaded in ``dtype`` on ``device``; ``config`` or
    DLMoMConfig fields as keywords. ``batch_size``: requests per engine call or scoring forward (a number;
    lm-eval's "auto" is not supported); ``max_batch_size`` is accepted and unused (it only bounds "auto").

    generate_until runs ``DLMoM.generate`` (see ``generation_of`` for gen_kwargs); loglikelihood and
    loglikelihood_rolling score under the consensus distribution (see dlmom.lmeval.scoring), which needs every
    expert on one tokenizer. Contexts are read as in a generation: each expert's role and, with ``chat`` (on by
    default), its chat template; loglikelihood_rolling scores raw token windows of the document (no role, no
    template). lm-eval's own chat templating (apply_chat_template) is refused: use the ``chat`` field.
    """

    def __init__(self, experts=None, *, config: DLMoMConfig | None = None, batch_size=1, max_batch_size=None,
                 device="cpu", dtype="float32", progress: bool = True, **fields):
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.progress = progress
        if isinstance(experts, DLMoM):
            if config is not None or fields:
                raise ValueError("DLMoMLM: with a DLMoM object pass no config or config fields (it has its config)")
            check_sampling(experts.config)
            self.moe = experts
        else:
            config = _config(config, fields)
            check_sampling(config)
            if dtype not in DTYPES and dtype not in DTYPES.values():
                raise ValueError(f"DLMoMLM: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            self.moe = DLMoM.from_pretrained(_expert_list(experts), config=config, dtype=DTYPES.get(dtype, dtype),
                                             device=check_device(device), progress=progress)
        self._device = self.moe.primary.device

    @property
    def config(self) -> DLMoMConfig:
        return self.moe.config

    def get_model_info(self) -> dict:
        """Added to lm-eval's results["config"]."""
        return {"dlmom_experts": [e.name for e in self.moe.experts], "dlmom_config": dataclasses.asdict(self.config)}

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        raise ValueError("dlmom applies each expert's own chat template with its role itself (the chat setting, on "
                         "by default; chat=False / --no-chat for raw text): run without lm-eval's "
                         "apply_chat_template")

    # ---- requests ----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Per request the generated text, cut before the first ``until`` string; requests with the same
        gen_kwargs run as batches of ``batch_size`` through ``DLMoM.generate`` (longest contexts first)."""
        from tqdm.auto import tqdm

        groups: dict[Generation, list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            if not isinstance(context, str) or not context:
                raise ValueError(f"generate_until: request {i} (task {request.task_name!r}, doc {request.doc_id}) "
                                 f"has an empty context; dlmom generates only after a prompt")
            groups.setdefault(generation_of(gen_kwargs), []).append(i)
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress) as bar:
            for gen, rows in groups.items():
                moe = self._variant(gen)
                rows.sort(key=lambda i: -len(requests[i].args[0]))
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start:start + self.batch_size]
                    results = moe.generate([requests[i].args[0] for i in chunk], max_new_tokens=gen.max_gen_toks,
                                           stop=list(gen.until) or None)
                    for i, result in zip(chunk, results):
                        out[i] = result.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
                    bar.update(len(chunk))
        return out

    def _variant(self, gen: Generation) -> DLMoM:
        """The mixture with this request's sampling settings (the same experts, alignments and lock)."""
        changes = {"do_sample": gen.do_sample}
        if gen.temperature is not None:
            changes["temperature"] = gen.temperature
        if gen.top_p is not None:
            changes["top_p"] = gen.top_p
        try:
            config = dataclasses.replace(self.config, **changes)
        except ValueError as err:
            raise ValueError(f"generate_until: gen_kwargs: {str(err).removeprefix('DLMoMConfig: ')}") from None
        variant = copy.copy(self.moe)
        variant.config = config
        return variant

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context, continuation) request, under the consensus."""
        scoring.check_shared_vocabulary(self.moe)
        items = [scoring.pair(self.moe, *request.args) for request in requests]
        results = scoring.score(self.moe, items, batch_size=self.batch_size,
                                progress=self.progress and not disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per (text,) request, under the consensus: lm-eval's disjoint rolling windows of the
        primary tokenizer's tokens, the first conditioned on BOS (else EOS), as long as the shortest expert's
        positions allow."""
        scoring.check_shared_vocabulary(self.moe)
        primary, experts = self.moe.primary, self.moe.experts
        length = min((e.max_positions for e in experts if e.max_positions), default=DEFAULT_MAX_LENGTH)
        items, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            tokens = primary.tokenizer.encode(text, add_special_tokens=False)
            windows = get_rolling_token_windows(token_list=tokens, prefix_token=scoring.prefix_token(primary),
                                                max_seq_len=length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                items.append(scoring.Item([list(context)] * len(experts), list(continuation)))
                owner.append(n)
        scores = scoring.score(self.moe, items, batch_size=self.batch_size,
                               progress=self.progress and not disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, scores):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


def _batch_size(value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DLMoMLM: batch_size must be an integer >= 1 (lm-eval's 'auto' is not supported), "
                         f"got {value!r}")
    return value


def _config(config: DLMoMConfig | None, fields: dict) -> DLMoMConfig:
    """The config from ``config`` or from DLMoMConfig fields (lm-eval's model_args), not both."""
    known = field_names(DLMoMConfig)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"DLMoMLM: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (the "
                         f"arguments are experts, config, batch_size, device, dtype, progress and DLMoMConfig's "
                         f"fields: {', '.join(known)})")
    if config is not None:
        if fields:
            raise ValueError(f"DLMoMLM: pass either config or config fields, not both (got {sorted(fields)})")
        if not isinstance(config, DLMoMConfig):
            raise ValueError(f"DLMoMLM: config must be a DLMoMConfig, got {type(config).__name__}")
        return config
    return DLMoMConfig(**fields)


def _expert_list(experts):
    """None (the default mixture), or a list of expert specs; one string is split at ``|``."""
    if isinstance(experts, str):
        specs = [s.strip() for s in experts.split("|")]
        if not all(specs):
            raise ValueError(f"DLMoMLM: experts is a list of models separated by '|', got {experts!r}")
        return specs
    return experts
