"""What the bench_e2e sections share: the prompts, the expert sets, and one measured call turned into a row.

Expert sets (``load_experts``): ``"default"``, the embedded default (SmolLM2-135M-Instruct in the three
roles of ``dlmom.experts.DEFAULT_ROLES``); ``"qwen"``, Qwen2.5-Coder-0.5B-Instruct then SmolLM2-135M-Instruct,
two tokenizers, so SmolLM2 meets the primary vocabulary (Qwen's) through the Text-Bridge.
"""
from __future__ import annotations

import copy
import pathlib
import re
import resource
import threading

import torch

# (prompt, expected number or None for code tasks)
PROMPTS = [
    ("A shop sells pencils at 3 dollars each. Tom buys 7 pencils. How many dollars does he pay?", 21),
    ("Sara has 45 apples and gives away 17. How many apples does she have left?", 28),
    ("A train travels 60 km per hour for 3 hours. How many km does it travel?", 180),
    ("There are 4 boxes with 12 eggs in each box. How many eggs are there in total?", 48),
    ("A book costs 15 dollars. Anna pays with a 50 dollar bill. How much change does she get?", 35),
    ("Ben reads 8 pages a day. How many pages does he read in 2 weeks?", 112),
    ("A class has 30 students and 2/5 of them are girls. How many girls are in the class?", 12),
    ("Mia saves 25 dollars a month. How many dollars has she saved after 6 months?", 150),
    ("A rectangle is 9 cm long and 4 cm wide. What is its area in square cm?", 36),
    ("Tim had 100 marbles, lost 23, then found 14. How many marbles does he have now?", 91),
    ("A baker makes 96 cookies and packs them in bags of 8. How many bags does he fill?", 12),
    ("What is 17 multiplied by 6, plus 10?", 112),
    ("Write a Python function that returns the largest number in a list.", None),
    ("Write a Python function that reverses a string.", None),
    ("Write a Python function that checks whether a number is prime.", None),
    ("Write a Python function that counts the vowels in a string.", None),
    ("Write a Python function that returns the sum of the even numbers in a list.", None),
    ("Write a Python function that computes the factorial of n.", None),
    ("What does this Python code print: x = [1, 2, 3]; print(sum(x) * 2)?", 12),
    ("Write a Python function that returns the n-th Fibonacci number.", None),
]
# A fourth role for the scaling table's 4-expert point (the default has three).
EXTRA_ROLE = ("critic", "You are a critic. Look for a mistake in the obvious answer, then answer concisely.")
QWEN_GGUF = pathlib.Path("/root/.cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def correct(text: str, expected: int | None) -> bool:
    return expected is not None and str(expected) in re.findall(r"\d+", text.replace(",", ""))


def smollm2(dtype: torch.dtype, device: str):
    """(model, tokenizer) of the embedded default."""
    from dlmom.loading import DEFAULT_MODEL_HUB_ID, default_gguf_path, load_pretrained

    gguf = default_gguf_path()
    return load_pretrained(gguf if gguf is not None else DEFAULT_MODEL_HUB_ID, dtype=dtype, device=device)


def role_experts(model, tokenizer, n: int, *, separate: bool = False) -> list:
    """The first ``n`` (1..4) roles of the default plus EXTRA_ROLE on one SmolLM2. ``separate``: role i > 0
    runs on its own deep copy of the model, so the roles do not share one batched forward."""
    from dlmom.experts import DEFAULT_ROLES, Expert

    roles = [*DEFAULT_ROLES.items(), EXTRA_ROLE]
    if not 1 <= n <= len(roles):
        raise ValueError(f"role_experts: n must be in [1, {len(roles)}], got {n}")
    models = [model] + [copy.deepcopy(model) if separate else model for _ in range(n - 1)]
    return [Expert(m, tokenizer, name=f"SmolLM2-135M-Instruct/{role}", system_prompt=prompt)
            for m, (role, prompt) in zip(models, roles[:n])]


def load_experts(kind: str, *, dtype: torch.dtype, device: str, qwen_gguf: pathlib.Path = QWEN_GGUF) -> list:
    """The expert set ``kind`` ("default" or "qwen"), see the module docstring."""
    from dlmom.experts import DEFAULT_ROLES, Expert
    from dlmom.loading import load_pretrained

    if kind == "default":
        return role_experts(*smollm2(dtype, device), 3)
    if kind != "qwen":
        raise ValueError(f"load_experts: kind must be 'default' or 'qwen', got {kind!r}")
    solver = DEFAULT_ROLES["solver"]
    # Qwen first: its tokenizer is the primary vocabulary, so the stronger model reads the latent packets
    # and writes the answer text; the smaller SmolLM2 follows the text through the Text-Bridge.
    qwen = Expert(*load_pretrained(qwen_gguf, dtype=dtype, device=device), name="Qwen2.5-Coder-0.5B-Instruct",
                  system_prompt=solver)
    small = Expert(*smollm2(dtype, device), name="SmolLM2-135M-Instruct", system_prompt=solver)
    return [qwen, small]


class PeakRSS:
    """Largest resident set of this process, sampled every 5 ms while the ``with`` block runs."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.loaded = self.peak = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def method_call(method: str, experts: list):
    """(kind, a function answering (prompts, max_new_tokens)) for a bench method name: dlmom-<controller>
    (dlmom-<controller>-top<M>: the router keeps M experts per prompt),
    single-<role or model name>, text-mas. A dlmom method keeps one DLMoM instance across calls, so one-time
    set-up (the vocabulary alignment of a bridged expert) happens in the warm-up call, like loading."""
    from dlmom import DLMoM, DLMoMConfig
    from dlmom.baselines import run

    if method.startswith("dlmom-"):
        controller, _, top = method.split("-", 1)[1].partition("-top")  # dlmom-swir-top1: the router keeps 1
        mixture = DLMoM(experts, DLMoMConfig(controller=controller, top_m=int(top) if top else None))
        return "dlmom", lambda prompts, tokens: mixture.generate(prompts, max_new_tokens=tokens, seed=0)
    if method.startswith("single-"):
        name = method.split("-", 1)[1]
        index = next((i for i, e in enumerate(experts) if e.name.lower().split("/")[-1].startswith(name)), None)
        if index is None:
            raise ValueError(f"method {method!r}: no expert named {name!r} in {[e.name for e in experts]}")
        return "single", lambda prompts, tokens: run("single", experts, prompts, max_new_tokens=tokens, expert=index)
    if method == "text-mas":
        return "text-mas", lambda prompts, tokens: run("text-mas", experts, prompts, max_new_tokens=tokens)
    raise ValueError(f"method must be dlmom-<controller>[-top<M>], single-<expert> or text-mas, got {method!r}")


def measure(method: str, experts: list, n: int, max_new_tokens: int, repeats: int) -> dict:
    """Run ``method`` on the first ``n`` prompts (one batch) after a warm-up call; the row of the fastest of
    ``repeats`` measured calls, with the peak memory of all of them."""
    kind, answer = method_call(method, experts)
    prompts = [p for p, _ in PROMPTS[:n]]
    answer(prompts[:1], 2)  # warm-up: first-call costs out of the timing
    cuda = experts[0].device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(experts[0].device)
    with PeakRSS() as mem:
        runs = [answer(prompts, max_new_tokens) for _ in range(repeats)]
    walls = [r.usage["wall_s"] for r in runs]
    results = runs[walls.index(min(walls))]
    usage = results.usage  # the whole batch's
    prefill, decode, generated = usage["prefill_tokens"], usage["decode_tokens"], usage["generated_tokens"]
    wall, forward = usage["wall_s"], usage["expert_forward_s"]
    row = {
        "method": method, "prompts": n, "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
        "repeats": repeats, "wall_s": round(wall, 3), "wall_s_slowest": round(max(walls), 3),
        "expert_forward_s": round(forward, 3), "overhead_fraction": round((wall - forward) / wall, 4),
        "tokens_generated": generated, "tokens_processed": prefill + decode, "prefill_tokens": prefill,
        "decode_tokens": decode, "latent_steps": usage["latent_steps"],
        "bus_bytes": usage["bus_bytes"], "bus_kind": {"dlmom": "packets", "text-mas": "text"}.get(kind, "-"),
        "peak_mem_bytes": mem.peak, "loaded_rss_bytes": mem.loaded,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "correct": sum(correct(r.text, e) for r, (_, e) in zip(results, PROMPTS[:n])),
        "scored": sum(e is not None for _, e in PROMPTS[:n]),
        "first_answer": results[0].text[:80],
        "bridge_resyncs": usage.get("bridge_resyncs", 0),
        "decode_steps": max(len(r.trace) for r in results) if kind == "dlmom" else None,
        "experts": [e.name for e in experts],
    }
    if cuda:
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(experts[0].device)
    return row

