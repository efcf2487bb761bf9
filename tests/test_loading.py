"""Loading experts: the GGUF conversion cache (verified on read, written atomically) and clear errors for
files and folders that are not models. Tiny models only: a GGUF file is written here with the `gguf`
package from a tiny random Llama, so the real transformers conversion runs in a second."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from dlmom import experts as ex
from tiny_models import llama, tokenizer


def write_tiny_gguf(path, *, seed: int = 0):
    """A tiny random Llama and its byte-level BPE tokenizer as a GGUF file (F32, llama.cpp's layout:
    q/k rows permuted, as transformers undoes on load); returns (model, tokenizer)."""
    import gguf

    tok = tokenizer("bytes", 300)
    model = llama(tok, seed=seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, tensor in model.state_dict().items():
        x = tensor.float().numpy()
        if name in top:
            w.add_tensor(f"{top[name]}.weight", x)
            continue
        parts = name.split(".")  # model.layers.<i>.<module>[.<proj>].weight
        part = ".".join(parts[3:5]) if parts[3] in ("self_attn", "mlp") else parts[3]
        if part == "self_attn.q_proj":
            x = permute(x, cfg.num_attention_heads)
        elif part == "self_attn.k_proj":
            x = permute(x, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{parts[2]}.{sub[part]}.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DLMOM_CACHE", str(folder))
    return folder


def logits(model, tok, text="What is 12 * 7?"):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)])).logits


def entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---- the safetensors check (the cache's read-side verification, on any saved model) ----

@pytest.fixture
def saved(tmp_path, model, tok):
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return folder / "model.safetensors"


def test_check_safetensors_accepts_a_complete_file(saved):
    assert ex.check_safetensors(saved) is None


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "half", "minus1"])
def test_check_safetensors_names_a_truncated_file(saved, keep):
    size = saved.stat().st_size
    keep = {"half": size // 2, "minus1": size - 1}.get(keep, keep)
    with open(saved, "r+b") as f:
        f.truncate(keep)
    reason = ex.check_safetensors(saved)
    assert reason is not None and "truncated" in reason, reason


def test_check_safetensors_rejects_trailing_bytes_and_a_garbled_header(saved):
    with open(saved, "ab") as f:
        f.write(b"\0" * 16)
    assert "bytes" in ex.check_safetensors(saved)
    with open(saved, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{")
    assert "header" in ex.check_safetensors(saved)


# ---- the GGUF conversion cache ----

def test_tiny_gguf_converts_to_the_same_model(tiny_gguf, cache):
    path, model, tok = tiny_gguf
    loaded, loaded_tok = ex.load_pretrained(path)
    assert loaded_tok.encode("What is 12 * 7?") == tok.encode("What is 12 * 7?")
    torch.testing.assert_close(logits(loaded, loaded_tok), logits(model, tok))
    (entry,) = [cache / name for name in entries(cache)]
    assert ex._cache_problem(entry) is None


def test_cache_is_converted_once(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    ex.load_pretrained(path)
    calls = []
    real = ex._convert_gguf
    monkeypatch.setattr(ex, "_convert_gguf", lambda *a: calls.append(a) or real(*a))
    ex.load_pretrained(path)
    assert calls == []


@pytest.mark.parametrize("damage", ["truncate-weights", "empty-weights", "delete-tokenizer", "edit-config",
                                    "delete-manifest"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning_naming_it(tiny_gguf, cache, damage):
    path, model, tok = tiny_gguf
    ex.load_pretrained(path)
    (entry,) = [cache / name for name in entries(cache)]
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate-weights":  # a disk that filled, a copy cut short
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "empty-weights":
        weights.write_bytes(b"")
    elif damage == "delete-tokenizer":
        (entry / "tokenizer.json").unlink()
    elif damage == "edit-config":
        (entry / "config.json").write_text((entry / "config.json").read_text().replace("64", "65"))
    else:
        (entry / "dlmom-cache.json").unlink()
    with pytest.warns(ex.DLMoMWarning, match=str(entry)) as caught:
        loaded, loaded_tok = ex.load_pretrained(path)
    assert "rebuilding" in str(caught[0].message)
    if damage.endswith("weights"):
        assert "model.safetensors" in str(caught[0].message)
    torch.testing.assert_close(logits(loaded, loaded_tok), logits(model, tok))
    assert weights.stat().st_size == size and ex._cache_problem(entry) is None
    assert entries(cache) == [entry.name]  # nothing left beside the rebuilt entry


def test_failed_conversion_leaves_no_entry_and_names_the_cache(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    real = ex._convert_gguf

    def disk_full(gguf, dtype, out):
        real(gguf, dtype, out)
        with open(out / "model.safetensors", "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "_convert_gguf", disk_full)
    with pytest.raises(OSError, match="No space left on device") as err:
        ex.load_pretrained(path)
    assert str(cache) in str(err.value) and path.name in str(err.value)
    assert entries(cache) == []  # neither a half-written entry nor a .partial folder
    monkeypatch.setattr(ex, "_convert_gguf", real)
    ex.load_pretrained(path)
    (entry,) = [cache / name for name in entries(cache)]
    assert ex._cache_problem(entry) is None


def test_stale_partial_folders_are_removed_and_live_ones_kept(tiny_gguf, cache):
    path = tiny_gguf[0]
    ex.load_pretrained(path)
    (name,) = entries(cache)
    for p in cache.iterdir():  # start again from an empty cache, with leftovers of crashed conversions
        import shutil
        shutil.rmtree(p)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        stale = [cache / f"{name}.partial", cache / f"{name}.partial-{host}-{dead.pid}"]
        live = cache / f"{name}.partial-{host}-{alive.pid}"
        for folder in stale + [live]:
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"\0" * 10)
        ex.load_pretrained(path)
        assert entries(cache) == sorted([name, live.name])
        assert ex._cache_problem(cache / name) is None
    finally:
        alive.kill()
        alive.wait()


def test_unwritable_cache_is_named(tiny_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DLMOM_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError, match="DLMOM_CACHE") as err:
        ex.load_pretrained(tiny_gguf[0])
    assert str(blocker / "cache") in str(err.value)
