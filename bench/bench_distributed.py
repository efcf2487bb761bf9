"""Local vs Ray placement: per decode step, the time and the bytes that cross actor boundaries, and the share
of the step spent beyond the slowest actor's compute (communication, serialisation, scheduling).

No model hub here: the experts are random Llamas at SmolLM2-135M's shape (30 layers, hidden 576, 49152-row
vocabulary, tied embeddings) on the tests' tiny tokenizer, so the compute per step and the logits per row
(49152 float32 = 192 KiB) are SmolLM2's; the answers are noise. Per-step numbers are the difference between a
run of --steps steps and a run of one step (the prefill cancels). Then a projection, stated as such, for three
7B experts. Writes bench/results/distributed-cpu.json.

    python bench/bench_distributed.py --steps 16 --experts 2 3
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from bench_common import print_table, write_results  # noqa: E402
from dlmom import DLMoM, DLMoMConfig, Expert  # noqa: E402
from tiny_models import tokenizer  # noqa: E402

PROMPTS = ["What is 12 * 7? Then add 3 to it.", "Write a function that returns the sum of a list of numbers."]


def smollm2_shaped(tok, seed: int):
    """A random Llama with SmolLM2-135M's shape (its vocabulary rows padded past the tiny tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(config).eval()


def measure(moe: DLMoM, steps: int, repeats: int) -> dict:
    """Per decode step: seconds, and for Ray the bytes in / out and the overhead seconds."""
    def run(n):
        best = None
        for _ in range(repeats):
            start = time.perf_counter()
            res = moe.generate(PROMPTS, max_new_tokens=n, seed=0)
            wall = time.perf_counter() - start
            assert all(len(r.trace) == n for r in res), "a prompt ended early: the step counts would differ"
            if best is None or wall < best[0]:
                best = (wall, res.usage.get("ray", {}))
        return best
    moe.generate(PROMPTS, max_new_tokens=2, seed=0)  # warm up
    (w1, u1), (wn, un) = run(1), run(steps)
    per = steps - 1
    row = {"ms_per_step": round(1000 * (wn - w1) / per, 2)}
    if un:
        row.update(bytes_in_per_step=round((un["bytes_in"] - u1["bytes_in"]) / per),
                   bytes_out_per_step=round((un["bytes_out"] - u1["bytes_out"]) / per),
                   overhead_ms_per_step=round(1000 * (un["overhead_s"] - u1["overhead_s"]) / per, 2),
                   overhead_share=round((un["overhead_s"] - u1["overhead_s"]) / (wn - w1), 3))
    return row


def projection(rows: list[dict]) -> dict:
    """Three 7B experts (Qwen2.5-7B's 152064-row vocabulary, bf16 logits), from the measured fixed overhead per
    round: a projection, not a measurement."""
    fixed_ms = min(r["overhead_ms_per_step"] for r in rows if "overhead_ms_per_step" in r)
    out_bytes = 3 * len(PROMPTS) * 152064 * 2
    return {"note": "projection, not measured: 3 x 7B experts, bf16 logits of 152064 rows, 2 prompts",
            "bytes_out_per_step": out_bytes,
            "comm_ms_one_node_pcie_25GBps": round(fixed_ms + 1000 * out_bytes / 25e9, 2),
            "comm_ms_three_nodes_10GbE": round(fixed_ms + 1000 * out_bytes / 1.25e9, 2),
            "fixed_overhead_ms_measured_here": fixed_ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measured run (default: 16)")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 3], help="expert counts (default: 2 3)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measure, the fastest kept (default: 2)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance (default: 2)")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    tok = tokenizer()
    rows = []
    for n in args.experts:
        experts = [Expert(smollm2_shaped(tok, seed), tok, name=f"smollm2-shaped-{seed}") for seed in range(n)]
        for placement in ("local", "ray"):
            moe = DLMoM(experts, DLMoMConfig(placement=placement, controller="latent", top_k=8, preview_tokens=0))
            rows.append({"experts": n, "placement": placement, **measure(moe, args.steps, args.repeats)})
            moe.close()
            print_table(rows[-1:])
    path = write_results("distributed", "cpu", rows, extra={"projection": projection(rows), "steps": args.steps,
                                                            "prompts": len(PROMPTS), "top_k": 8})
    print_table(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
