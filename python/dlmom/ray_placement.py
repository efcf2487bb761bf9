"""``placement="ray"``: one Ray actor per model group (its model, tokenizer, roles and the generation's
SoftThinkingRunner); the generation in the driver talks to each through a ``RemoteRunner``, a runner-shaped
proxy.

What crosses an actor boundary per decode step, and why it is the smallest exchange that keeps the results
those of local placement: in, the step's input as the local runner gets it, the packet (ids int64 and probs
[B, k]; B prompts, k the packet size) or the Text-Bridge's new token ids; out, the next-token logits of the
actor's *active* rows only ([rows, V_model] in the model's dtype; the proxy puts zeros in the rows that left, as
the local runner does). The consensus (TIES merge, gate, agreement) and the router's preview read every
logit of the full vocabulary, so a top-k or a cut to the primary vocabulary would change results. Rows leaving
the batch send a [R, B] mask once; the prefill sends the prompts' text. ``usage["ray"]`` counts these bytes
(tensor payloads and token ids at 8 bytes; Ray's own framing is not counted), the rounds (one per prefill or
step), the seconds the driver spent from issuing a round to holding its results (``wait_s``), and of those
the seconds beyond the slowest actor's own compute (``overhead_s``: communication, serialisation, scheduling).

Every actor's forward of a step is issued (``.remote``) before any is waited on (``dlmom.placement.gather``),
so one step costs about the slowest expert plus communication. An actor that dies, or does not answer within
``ray_timeout_s``, ends the generation with a RuntimeError naming its experts; every actor of the DLMoM is
killed then, and the next generate starts them again. Starting an actor and loading its model has its own
limit, ``ray_load_timeout_s``.
"""
from __future__ import annotations

import os
import time
import uuid

import torch

from .experts import SINGLE_EXPERT, Expert, as_expert
from .placement import Pending
from .soft_thinking import SoftThinkingRunner

_INSTALL = "pip install 'dlmom[ray]'"
_FORWARDS = ("prefill", "feed_packet", "feed_tokens")  # their answers are (logits, the actor's seconds, ...)


def import_ray():
    """The ray module, or ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"placement='ray' needs Ray, which is not installed: {_INSTALL}") from None
    return ray


def connect(address: str | None):
    """Ray, initialised: the running instance, else the cluster at ``address`` (None: RAY_ADDRESS, else a new
    local instance)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    return ray


class ExpertActor:
    """Lives in a Ray actor: one model in its roles, and the current generation's runner. ``source`` is a
    (model, tokenizer) pair or a hub id / folder / GGUF path loaded here; ``roles``: (name, system prompt)."""

    def __init__(self, source, roles: list[tuple[str, str | None]], device: str):
        from .loading import load_pretrained

        if isinstance(source, str):
            model, tokenizer = load_pretrained(source, device=device)
        else:
            model, tokenizer = source
            model.to(device)
        self.experts = [Expert(model, tokenizer, name=name, system_prompt=prompt) for name, prompt in roles]
        self.runner: SoftThinkingRunner | None = None

    def describe(self) -> dict:
        """What the driver needs of the model without holding it."""
        e = self.experts[0]
        return {"tokenizer": e.tokenizer, "vocab_rows": e.embedding.shape[0], "embed_scale": e.embed_scale,
                "max_positions": e.max_positions, "eos_ids": sorted(e.eos_ids()), "parameters": e.num_parameters(),
                "device": str(e.device), "pid": os.getpid()}

    def _active(self, logits: torch.Tensor, start: float) -> tuple[torch.Tensor, float]:
        """(the active rows' logits [N, V] on the CPU, seconds since ``start``)."""
        rows = logits.reshape(-1, logits.shape[-1])[self.runner.active.to(logits.device)]
        return rows.cpu(), time.perf_counter() - start

    def prefill(self, prompts, chat, kv, share_prefix):
        start = time.perf_counter()
        self.runner = SoftThinkingRunner(self.experts)
        logits = self.runner.prefill(prompts, chat=chat, kv=kv, share_prefix=share_prefix)
        return (*self._active(logits, start), self.runner.room)

    def feed_packet(self, ids, probs):
        start, device = time.perf_counter(), self.runner.device
        return self._active(self.runner.feed_packet(ids.to(device), probs.to(device)), start)

    def feed_tokens(self, per_prompt):
        start = time.perf_counter()
        return self._active(self.runner.feed_tokens(per_prompt), start)

    def keep_rows(self, keep):
        self.runner.keep_rows(keep)

    def teacher_forced(self, rows, keep):
        logits, ids = self.runner.teacher_forced(rows, keep)
        return logits.cpu(), ids.cpu()

    def stats(self) -> dict:
        r = self.runner
        return {"forward_s": r.forward_s, "prefill_tokens": r.prefill_tokens, "decode_tokens": r.decode_tokens,
                "shared_prefill_tokens": r.shared_prefill_tokens, "peak_cache_bytes": r.peak_cache_bytes()}


class RemoteExpert(Expert):
    """An expert whose model lives in a Ray actor: its name, role and tokenizer here, the rest as the actor
    described it (``info``). Its device is the driver's CPU, where its logits arrive."""

    def __init__(self, name: str, system_prompt: str | None, info: dict, *, num_gpus=0.0, num_cpus=None):
        self.model, self.tokenizer, self.name, self.system_prompt = None, info["tokenizer"], name, system_prompt
        self.num_gpus, self.num_cpus, self.info = num_gpus, num_cpus, info

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def embedding(self):
        raise AttributeError(f"expert {self.name!r} runs in a Ray actor: its embedding matrix is not in this process")

    @property
    def embed_scale(self) -> float:
        return self.info["embed_scale"]

    @property
    def vocab_size(self) -> int:
        return min(len(self.tokenizer), self.info["vocab_rows"])

    @property
    def max_positions(self) -> int | None:
        return self.info["max_positions"]

    def eos_ids(self) -> set[int]:
        return set(self.info["eos_ids"])

    def num_parameters(self) -> int:
        return self.info["parameters"]


class StepResult(Pending):
    """One actor request in flight: its object ref, the bytes it sent, and how to turn its answer into the
    runner's value (``finish``)."""

    def __init__(self, runner: "RemoteRunner", method: str, ref, bytes_in: int, finish):
        self.runner, self.ref, self.bytes_in, self.finish = runner, ref, bytes_in, finish
        self.issued = time.perf_counter()
        self.forward = method in _FORWARDS

    def resolve_all(self, pending: list["StepResult"]) -> list:
        return self.runner.placement.wait(pending)


class RemoteRunner:
    """A SoftThinkingRunner's methods and counters for one model group in a Ray actor (see the module doc).
    It keeps the active rows itself (keep_rows is deterministic), so ``live`` and ``rows_per_prompt`` need no
    request; the forwards return StepResults for ``dlmom.placement.gather``."""

    roles, live, rows_per_prompt = SoftThinkingRunner.roles, SoftThinkingRunner.live, SoftThinkingRunner.rows_per_prompt

    def __init__(self, placement: "RayPlacement", index: int):
        self.placement, self.index, self.actor = placement, index, placement.actors[index]
        self.experts = placement.groups[index]
        self.tokenizer, self.device = self.experts[0].tokenizer, torch.device("cpu")
        self.batch, self.room, self.active = 0, None, torch.zeros(0, dtype=torch.long)
        self._stats: dict | None = None

    def _request(self, method: str, bytes_in: int, *args, finish=None) -> StepResult:
        self._stats = None
        ref = getattr(self.actor, method).remote(*args)
        return StepResult(self, method, ref, bytes_in, finish or self._scatter(self.active))

    def _scatter(self, active: torch.Tensor):
        """The answer's active-row logits [N, V] -> [R, B, V] with zeros in the other rows."""
        R, B = self.roles, self.batch

        def finish(answer):
            rows = answer[0]
            if len(active) == R * B:
                return rows.view(R, B, -1)
            grid = rows.new_zeros(R * B, rows.shape[-1])
            grid[active] = rows
            return grid.view(R, B, -1)
        return finish

    def prefill(self, prompts: list[str], *, chat: bool, kv=None, share_prefix: bool = True) -> StepResult:
        self.batch, self.active = len(prompts), torch.arange(self.roles * len(prompts))
        scatter = self._scatter(self.active)

        def finish(answer):
            self.room = answer[2]
            return scatter(answer)
        return self._request("prefill", sum(len(p.encode()) for p in prompts), prompts, chat, kv, share_prefix,
                             finish=finish)

    def feed_packet(self, ids: torch.Tensor, probs: torch.Tensor) -> StepResult:
        ids, probs = ids.cpu(), probs.cpu()
        return self._request("feed_packet", ids.nbytes + probs.nbytes, ids, probs)

    def feed_tokens(self, per_prompt: list[list[int]]) -> StepResult | None:
        if not any(per_prompt[i % self.batch] for i in self.active.tolist()):
            return None  # as the local runner: no active row gets a token
        return self._request("feed_tokens", 8 * sum(len(t) for t in per_prompt), per_prompt)

    def keep_rows(self, keep: torch.Tensor) -> None:
        keep = keep.to(torch.bool).cpu()
        stay = keep.reshape(-1)[self.active]
        if bool(stay.all()):
            return
        self.active = self.active[stay]
        self.placement.wait([self._request("keep_rows", keep.numel(), keep, finish=lambda answer: answer)])

    def teacher_forced(self, rows: list[list[int]], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = 8 * sum(len(r) for r in rows)
        return self.placement.wait([self._request("teacher_forced", tokens, rows, keep, finish=lambda a: a)])[0]

    # ---- the actor runner's counters, fetched once after the last forward ----

    def _stat(self, key: str):
        if self._stats is None:
            self._stats = self.placement.wait([self._request("stats", 0, finish=lambda a: a)])[0]
        return self._stats[key]

    forward_s = property(lambda self: self._stat("forward_s"))
    prefill_tokens = property(lambda self: self._stat("prefill_tokens"))
    shared_prefill_tokens = property(lambda self: self._stat("shared_prefill_tokens"))
    decode_tokens = property(lambda self: self._stat("decode_tokens"))

    def peak_cache_bytes(self) -> int:
        return self._stat("peak_cache_bytes")


def _payload(value) -> int:
    """Bytes of the tensors in an answer (ints and floats beside them are not counted)."""
    if torch.is_tensor(value):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(_payload(v) for v in value)
    if isinstance(value, dict):
        return sum(_payload(v) for v in value.values())
    return 0


def _groups(experts) -> list[tuple[object, list[Expert | str]]]:
    """(source, members) per model in order of first appearance: Experts and (model, tokenizer) pairs that
    share a model object are one group (source: the pair); a hub id / folder / GGUF path is a group alone
    (source: the path, loaded in its actor)."""
    if isinstance(experts, SINGLE_EXPERT) or not hasattr(experts, "__iter__"):
        experts = [experts]
    groups: dict[int, tuple[object, list]] = {}
    for i, item in enumerate(experts):
        if isinstance(item, (str, os.PathLike)):
            groups[-1 - i] = (os.fspath(item), [os.fspath(item)])
            continue
        expert = as_expert(item, i)
        groups.setdefault(id(expert.model), ((expert.model, expert.tokenizer), []))[1].append(expert)
    if not groups:
        raise ValueError("experts must hold at least one expert, got an empty list")
    return list(groups.values())


def _roles(members: list) -> list[tuple[str, str | None]]:
    """(name, system prompt) per member; a path is named as dlmom.experts.as_expert names it."""
    return [(m.name, m.system_prompt) if isinstance(m, Expert)
            else (os.path.basename(m) if m.endswith(".gguf") else m, None) for m in members]


class RayPlacement:
    """The actors of one DLMoM (one per model group) and the Ray-side usage of its current generation."""

    def __init__(self, experts, config):
        self.ray = connect(config.ray_address)
        self.timeout, self.load_timeout = config.ray_timeout_s, config.ray_load_timeout_s
        self.tag = f"dlmom-{uuid.uuid4().hex[:8]}"  # the actors' name prefix (Ray's state API shows it)
        self.sources, self.members = [], []
        for source, members in _groups(experts):
            # A loaded model crosses to the object store once; a restart reuses the stored copy.
            self.sources.append(source if isinstance(source, str) else self.ray.put(source))
            self.members.append(members)
        self.actors: list | None = None
        self.groups: list[list[RemoteExpert]] = []
        self.stats = self._zero()
        self._start()

    @staticmethod
    def _zero() -> dict:
        return {"bytes_in": 0, "bytes_out": 0, "rounds": 0, "wait_s": 0.0, "overhead_s": 0.0}

    def _resources(self, index: int) -> dict:
        """The Ray resources of group ``index``'s actor: the most any of its experts asks for. Only what was
        asked is passed: an actor given any resource holds 1 CPU for its whole life unless told otherwise,
        one given none only needs a CPU to be placed (Ray's defaults)."""
        experts = [m for m in self.members[index] if isinstance(m, Expert)]
        gpus = max((e.num_gpus for e in experts), default=0.0)
        cpus = [e.num_cpus for e in experts if e.num_cpus is not None]
        return {**({"num_gpus": gpus} if gpus else {}), **({"num_cpus": max(cpus)} if cpus else {})}

    def _start(self) -> None:
        """One actor per group, each loading its model; waits until every one has described it."""
        actor_class = self.ray.remote(ExpertActor)
        self.actors = []
        for i, (source, members) in enumerate(zip(self.sources, self.members)):
            resources = self._resources(i)
            device = "cuda" if resources.get("num_gpus") else "cpu"
            self.actors.append(actor_class.options(name=f"{self.tag}-{i}", max_restarts=0, **resources)
                               .remote(source, _roles(members), device))
        self.groups = []  # the driver's view while describing: named after the members
        infos = self._describe()
        self.groups = [[RemoteExpert(name, prompt, info, num_gpus=getattr(m, "num_gpus", 0.0),
                                     num_cpus=getattr(m, "num_cpus", None))
                        for m, (name, prompt) in zip(self.members[i], _roles(self.members[i]))]
                       for i, info in enumerate(infos)]

    def _describe(self) -> list[dict]:
        refs = [actor.describe.remote() for actor in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=self.load_timeout)
        out = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                self._fail(i, f"did not load its model within ray_load_timeout_s={self.load_timeout:g} s")
            out.append(self._get(i, ref))
        return out

    def names(self, index: int) -> str:
        return ", ".join(repr(name) for name, _ in _roles(self.members[index]))

    def _fail(self, index: int, why: str):
        self.close()
        raise RuntimeError(f"expert {self.names(index)} (Ray actor {self.tag}-{index}) {why}; every actor of this "
                           "DLMoM was stopped, the next generate starts them again")

    def _get(self, index: int, ref):
        """One ready answer; a dead actor or lost node becomes the RuntimeError naming the expert (an error
        raised by the expert's own code, e.g. a ValueError for a too-long prompt, is raised as it is)."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError:
            raise
        except exceptions.RayError as err:
            self._fail(index, f"stopped answering: its Ray actor died or its node left ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})")

    def wait(self, pending: list[StepResult]) -> list:
        """The values of ``pending`` (issued before), waiting for all of them together within the timeout."""
        refs = [p.ref for p in pending]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
        answers = []
        for p in pending:
            if p.ref not in ready:
                self._fail(p.runner.index, f"did not answer within ray_timeout_s={self.timeout:g} s")
            answers.append(self._get(p.runner.index, p.ref))
        end = time.perf_counter()
        wall = end - min(p.issued for p in pending)
        self.stats["bytes_in"] += sum(p.bytes_in for p in pending)
        self.stats["bytes_out"] += sum(_payload(a) for a in answers)
        self.stats["wait_s"] += wall
        if all(p.forward for p in pending):
            self.stats["rounds"] += 1
            self.stats["overhead_s"] += max(0.0, wall - max(a[1] for a in answers))
        return [p.finish(a) for p, a in zip(pending, answers)]

    def runners(self) -> list[RemoteRunner]:
        """A new generation's runner proxies (the actors started again if a failure stopped them)."""
        if self.actors is None:
            self._start()
        self.stats = self._zero()
        return [RemoteRunner(self, i) for i in range(len(self.actors))]

    def usage(self) -> dict:
        """``usage["ray"]``: this generation's bytes and seconds (see the module doc), per round too."""
        s = dict(self.stats)
        rounds = max(s["rounds"], 1)
        s.update(bytes_in_per_round=s["bytes_in"] / rounds, bytes_out_per_round=s["bytes_out"] / rounds,
                 actors=len(self.actors or []))
        return {"ray": s}

    def close(self) -> None:
        """Kill every actor of this DLMoM (its models and caches are released)."""
        for actor in self.actors or []:
            self.ray.kill(actor, no_restart=True)
        self.actors = None
