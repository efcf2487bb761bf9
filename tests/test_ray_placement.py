"""placement="ray" on one local Ray instance (2 CPUs, tiny random models): the same answers as local placement
for every controller, with roles of one model, two models and a Text-Bridge pair; a killed actor ends the
generation with an error naming its expert and leaves no actor behind; a later generate starts them again."""
import builtins
import sys
import time

import pytest
import torch

from dlmom import DLMoM, DLMoMConfig, Expert
from dlmom import ray_placement
from tiny_models import gemma3, llama, tokenizer

PROMPTS = ["What is 12 * 7?", "Write a function that returns the sum of a list of numbers."]
CONTROLLERS = ["explicit", "latent", "swir"]


def _experts(kind: str) -> list:
    tok = tokenizer()
    if kind == "roles":
        model = llama(tok)
        return [Expert(model, tok, name=f"role{i}", system_prompt=f"You are expert {i}.") for i in range(3)]
    if kind == "two-models":
        return [Expert(llama(tok, seed=0), tok, name="m0"), Expert(llama(tok, seed=1, layers=3), tok, name="m1")]
    a, b = tokenizer("bytes", 300), tokenizer("words", 420)  # a Text-Bridge pair
    return [Expert(llama(a, seed=0), a, name="bytes-llama"), Expert(gemma3(b, seed=1), b, name="words-gemma")]


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="placement='ray' needs Ray: pip install 'dlmom[ray]'")
    # The dashboard serves Ray's state API (list_actors), which the fault test reads.
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mixtures(ray):
    """Per expert set: (local DLMoM, ray DLMoM), built once (an actor takes seconds to start)."""
    built = {}

    def get(kind):
        if kind not in built:
            experts = _experts(kind)
            built[kind] = DLMoM(experts), DLMoM(experts, DLMoMConfig(placement="ray"))
        return built[kind]
    yield get
    for _, remote in built.values():
        remote.close()


def _config(placement: str, controller: str) -> DLMoMConfig:
    return DLMoMConfig(placement=placement, controller=controller, top_k=4, do_sample=True, noise="gumbel",
                       entropy_threshold=0.5)


@pytest.mark.parametrize("kind", ["roles", "two-models", "bridge"])
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_ray_placement_gives_the_local_answers(mixtures, kind, controller):
    local, remote = mixtures(kind)
    # The actors do not depend on the loop's settings: one ray mixture serves every controller.
    local.config, remote.config = _config("local", controller), _config("ray", controller)
    want = local.generate(PROMPTS, max_new_tokens=12, seed=5)
    got = remote.generate(PROMPTS, max_new_tokens=12, seed=5)
    assert [r.text for r in got] == [r.text for r in want]
    assert [[s["top"] for s in r.trace] for r in got] == [[s["top"] for s in r.trace] for r in want]
    assert [r.route for r in got] == [r.route for r in want]
    assert got.usage["experts"] == want.usage["experts"]  # tokens and cache bytes, counted in the actors
    assert "ray" not in want.usage
    ray_usage = got.usage["ray"]
    assert ray_usage["actors"] == len(remote.groups) and ray_usage["rounds"] >= 2
    assert ray_usage["bytes_in"] > 0 and ray_usage["bytes_out"] > 0 and 0 <= ray_usage["overhead_s"]


def test_a_step_sends_the_packet_and_gets_the_active_rows_logits(mixtures):
    _, remote = mixtures("two-models")
    remote.config = DLMoMConfig(placement="ray", controller="latent", top_k=4, preview_tokens=0)
    generation = remote.start(PROMPTS, max_new_tokens=3, seed=0)
    res = generation.run()
    assert all(len(r.trace) == 3 for r in res)  # no prompt finished early: every round had every row
    B, k, V = len(PROMPTS), 4, len(tokenizer())
    prompt_bytes = sum(len(p.encode()) for p in PROMPTS)
    # Rounds: the prefill, then one delivery per step but the last; two actors each.
    assert res.usage["ray"]["rounds"] == 3
    stats_out = sum(3 * r.roles * B * 8 for r in generation.runners)  # the [R, B] token counters, read at the end
    assert res.usage["ray"]["bytes_in"] == 2 * prompt_bytes + 2 * 2 * B * k * (8 + 4)
    assert res.usage["ray"]["bytes_out"] == 3 * 2 * B * V * 4 + stats_out


def test_a_killed_actor_names_its_expert_and_leaves_no_actor(mixtures, ray, monkeypatch):
    from ray.util.state import list_actors, list_placement_groups

    _, remote = mixtures("two-models")
    remote.config = DLMoMConfig(placement="ray", controller="swir", top_k=4, ray_timeout_s=60)
    placement = remote.placement
    tag, victim = placement.tag, placement.actors[1]
    wait, calls = ray_placement.RayPlacement.wait, []

    def kill_mid_request(self, pending):  # the third round: its forwards are in flight when the actor dies
        calls.append(1)
        if len(calls) == 3:
            ray.kill(victim)
        return wait(self, pending)
    monkeypatch.setattr(ray_placement.RayPlacement, "wait", kill_mid_request)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"expert 'm1' \(Ray actor dlmom-\w+-1\) stopped answering"):
        remote.generate(PROMPTS, max_new_tokens=40, seed=0)
    assert time.perf_counter() - start < 60
    monkeypatch.setattr(ray_placement.RayPlacement, "wait", wait)
    for _ in range(100):  # the state API catches up with the kills within a moment
        alive = [a.name for a in list_actors() if a.name.startswith(tag) and a.state != "DEAD"]
        if not alive:
            break
        time.sleep(0.1)
    assert alive == []
    assert [g for g in list_placement_groups() if g.state != "REMOVED"] == []
    # The next generate starts the actors again and answers as before.
    local = mixtures("two-models")[0]
    local.config = _config("local", "swir")
    remote.config = _config("ray", "swir")
    assert [r.text for r in remote.generate(PROMPTS, max_new_tokens=8, seed=1)] == \
        [r.text for r in local.generate(PROMPTS, max_new_tokens=8, seed=1)]


class _HangAfter:
    """A forward hook that stops answering after ``n`` forwards: an actor that hangs instead of dying."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, module, args, output):
        self.n -= 1
        if self.n < 0:
            time.sleep(3600)


def test_a_silent_actor_fails_within_the_timeout(ray):
    from ray.util.state import list_actors

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels with the model
    tok = tokenizer()
    stuck = llama(tok, seed=2)
    stuck.register_forward_hook(_HangAfter(4))
    moe = DLMoM([Expert(llama(tok), tok, name="fine"), Expert(stuck, tok, name="stuck")],
                DLMoMConfig(placement="ray", ray_timeout_s=3, preview_tokens=0))
    tag, start = moe.placement.tag, time.perf_counter()
    with pytest.raises(RuntimeError, match=r"expert 'stuck' \(Ray actor dlmom-\w+-1\) did not answer within "
                                           r"ray_timeout_s=3 s"):
        moe.generate(PROMPTS, max_new_tokens=40)
    assert time.perf_counter() - start < 3 * 2 + 5  # one round's timeout, not a hang
    for _ in range(100):
        alive = [a.name for a in list_actors() if a.name.startswith(tag) and a.state != "DEAD"]
        if not alive:
            break
        time.sleep(0.1)
    assert alive == []


def test_placement_ray_without_ray_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    tok = tokenizer()
    with pytest.raises(ImportError, match=r"pip install 'dlmom\[ray\]'"):
        DLMoM([(llama(tok), tok)], DLMoMConfig(placement="ray"))


def test_placement_settings_are_checked():
    with pytest.raises(ValueError, match=r"DLMoMConfig: placement must be one of \('local', 'ray'\), got 'cluster'"):
        DLMoMConfig(placement="cluster")
    with pytest.raises(ValueError, match=r"ray_timeout_s must be a number in \(0"):
        DLMoMConfig(ray_timeout_s=0)
    tok = tokenizer()
    with pytest.raises(ValueError, match=r"Expert: num_gpus must be a number >= 0, got -1"):
        Expert(llama(tok), tok, num_gpus=-1)


def test_from_pretrained_under_ray_refuses_a_dtype_it_would_not_apply():
    with pytest.raises(ValueError, match=r"placement='ray' loads each model inside its actor, at float32"):
        DLMoM.from_pretrained(["some/model"], placement="ray", dtype=torch.bfloat16)
