"""Loading experts: the GGUF conversion cache (verified on read, written atomically) and clear errors for
files and folders that are not models. Tiny models only: a GGUF file is written here with the `gguf`
package from a tiny random Llama, so the real transformers conversion runs in a second."""
import json
import re
import socket
import subprocess
import sys

import pytest
import torch

from dlmom import gguf_cache as gc
from dlmom import loading
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
    assert gc.check_safetensors(saved) is None


@pytest.mark.parametrize("keep", [0, 5, 8, 40, "half", "minus1"])
def test_check_safetensors_names_a_truncated_file(saved, keep):
    size = saved.stat().st_size
    keep = {"half": size // 2, "minus1": size - 1}.get(keep, keep)
    with open(saved, "r+b") as f:
        f.truncate(keep)
    reason = gc.check_safetensors(saved)
    assert reason is not None and "truncated" in reason, reason


def test_check_safetensors_rejects_trailing_bytes_and_a_garbled_header(saved):
    with open(saved, "ab") as f:
        f.write(b"\0" * 16)
    assert "bytes" in gc.check_safetensors(saved)
    with open(saved, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{")
    assert "header" in gc.check_safetensors(saved)


# ---- the GGUF conversion cache ----

def test_tiny_gguf_converts_to_the_same_model(tiny_gguf, cache):
    path, model, tok = tiny_gguf
    loaded, loaded_tok = loading.load_pretrained(path)
    assert loaded_tok.encode("What is 12 * 7?") == tok.encode("What is 12 * 7?")
    torch.testing.assert_close(logits(loaded, loaded_tok), logits(model, tok))
    (entry,) = [cache / name for name in entries(cache)]
    assert gc._cache_problem(entry) is None


def test_cache_is_converted_once(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    loading.load_pretrained(path)
    calls = []
    real = gc._convert_gguf
    monkeypatch.setattr(gc, "_convert_gguf", lambda *a: calls.append(a) or real(*a))
    loading.load_pretrained(path)
    assert calls == []


@pytest.mark.parametrize("damage", ["truncate-weights", "empty-weights", "delete-tokenizer", "edit-config",
                                    "delete-manifest-and-truncate-weights"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning_naming_it(tiny_gguf, cache, damage):
    path, model, tok = tiny_gguf
    loading.load_pretrained(path)
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
        with open(weights, "r+b") as f:
            f.truncate(size - 1)
    with pytest.warns(gc.DLMoMWarning, match=str(entry)) as caught:
        loaded, loaded_tok = loading.load_pretrained(path)
    assert "rebuilding" in str(caught[0].message)
    if damage.endswith("weights"):
        assert "model.safetensors" in str(caught[0].message) and "truncated" in str(caught[0].message)
    torch.testing.assert_close(logits(loaded, loaded_tok), logits(model, tok))
    assert weights.stat().st_size == size and gc._cache_problem(entry) is None
    assert entries(cache) == [entry.name]  # nothing left beside the rebuilt entry


def test_an_entry_of_an_older_dlmom_is_checked_and_kept(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    loading.load_pretrained(path)
    (entry,) = [cache / name for name in entries(cache)]
    (entry / "dlmom-cache.json").unlink()  # older entries have no manifest
    monkeypatch.setattr(gc, "_convert_gguf", lambda *a: pytest.fail("a sound entry was converted again"))
    model, tok = loading.load_pretrained(path)
    torch.testing.assert_close(logits(model, tok), logits(tiny_gguf[1], tiny_gguf[2]))
    assert gc._cache_problem(entry) is None  # adopted: a manifest of what is there now


def test_failed_conversion_leaves_no_entry_and_names_the_cache(tiny_gguf, cache, monkeypatch):
    path = tiny_gguf[0]
    real = gc._convert_gguf

    def disk_full(gguf, dtype, out):
        real(gguf, dtype, out)
        with open(out / "model.safetensors", "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gc, "_convert_gguf", disk_full)
    with pytest.raises(OSError, match="No space left on device.*; free space there or set DLMOM_CACHE") as err:
        loading.load_pretrained(path)
    assert str(cache) in str(err.value) and path.name in str(err.value)
    assert entries(cache) == []  # neither a half-written entry nor a .partial folder
    monkeypatch.setattr(gc, "_convert_gguf", real)
    loading.load_pretrained(path)
    (entry,) = [cache / name for name in entries(cache)]
    assert gc._cache_problem(entry) is None


def test_stale_partial_folders_are_removed_and_live_ones_kept(tiny_gguf, cache):
    path = tiny_gguf[0]
    loading.load_pretrained(path)
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
        loading.load_pretrained(path)
        assert entries(cache) == sorted([name, live.name])
        assert gc._cache_problem(cache / name) is None
    finally:
        alive.kill()
        alive.wait()


def test_unwritable_cache_is_named(tiny_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DLMOM_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError, match="DLMOM_CACHE") as err:
        loading.load_pretrained(tiny_gguf[0])
    assert str(blocker / "cache") in str(err.value)


# ---- files and folders that are not models: one clear error naming the path and what is wrong ----

@pytest.fixture
def model_folder(tmp_path, model, tok):
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_error(spec):
    """The exception load_pretrained raises for ``spec``, checked to be a one-line error naming it."""
    with pytest.raises((ValueError, OSError)) as err:
        loading.load_pretrained(spec)
    message = str(err.value)
    assert message.startswith(f"expert {str(spec)!r}: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("content", [b"hello", b"", b"GGU", b"PK\x03\x04 a zip file"])
def test_a_file_named_gguf_that_is_not_one(tmp_path, content, cache):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    message = load_error(path)
    assert "not a GGUF file" in message and "magic" in message
    assert entries(cache) == []


@pytest.mark.parametrize("keep", [4, 16, 100, 2000, "half", "minus1"])
def test_a_cut_gguf_file_is_named_truncated(tiny_gguf, tmp_path, keep, cache):
    data = tiny_gguf[0].read_bytes()
    keep = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    assert "truncated" in load_error(path)
    assert entries(cache) == []


def test_check_gguf_accepts_the_tiny_and_rejects_a_bad_version(tiny_gguf, tmp_path):
    assert gc.check_gguf(tiny_gguf[0]) is None
    data = bytearray(tiny_gguf[0].read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    path = tmp_path / "v99.gguf"
    path.write_bytes(bytes(data))
    assert "version 99" in gc.check_gguf(path)


def test_a_gguf_file_under_another_name_is_loaded(tiny_gguf, tmp_path, cache):
    path = tmp_path / "MODEL.GGUF"
    path.write_bytes(tiny_gguf[0].read_bytes())
    model, tok = loading.load_pretrained(path)
    torch.testing.assert_close(logits(model, tok), logits(tiny_gguf[1], tiny_gguf[2]))


def test_a_folder_that_is_not_a_model(tmp_path, model_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "folder has no config.json" in load_error(empty) and "not a transformers model folder" in \
        load_error(empty)
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{garbage")
    assert "config.json is not valid JSON" in load_error(bad_config)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_folder / "config.json").read_text())
    assert "no weights" in load_error(no_weights)


def test_an_unreadable_folder(model_folder, monkeypatch):
    def denied(folder):  # what stat() says in a folder this user may not search (root may: so simulated)
        raise PermissionError(13, "Permission denied", str(folder / "config.json"))

    monkeypatch.setattr(loading, "_folder_problem", denied)
    assert "folder is unreadable ([Errno 13] Permission denied" in load_error(model_folder)


def test_a_folder_with_a_truncated_safetensors_file(model_folder):
    weights = model_folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    message = load_error(model_folder)
    assert "model.safetensors" in message and "truncated" in message


def test_a_folder_without_a_tokenizer(model_folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_folder / name).unlink()
    assert "tokenizer" in load_error(model_folder)


def test_a_loaded_folder_still_works(model_folder, model, tok):
    loaded, loaded_tok = loading.load_pretrained(model_folder)
    torch.testing.assert_close(logits(loaded, loaded_tok), logits(model, tok))


def test_other_things_that_are_not_models(tmp_path, model_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "empty" in load_error("")
    assert "pass the folder" in load_error(model_folder / "model.safetensors")
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    assert "broken symbolic link" in load_error(link)
    assert "no such file or folder" in load_error("./my_model")
    assert "no such file or folder" in load_error("some/deep/folder")
    assert "no such GGUF file" in load_error("nowhere.gguf")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A model hub that refuses connections at once, and an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.mark.parametrize("spec", ["my_model", "models/foo"])
def test_a_missing_folder_that_looks_like_a_hub_id_fails_fast(spec, offline_hub, tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    message = load_error(spec)
    assert time.perf_counter() - start < 15  # one attempt, not transformers' retries with back-off
    assert "no such local file or folder" in message and "unreachable" in message and "127.0.0.1:9" in message
    assert "local model folder or .gguf file" in message


def test_hub_offline_names_hf_hub_offline(offline_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in load_error("org/model")


# ---- arguments of the wrong kind: one clear error naming the argument ----

def test_a_string_where_a_tokenizer_belongs(model, tok):
    from dlmom import DLMoM, Expert

    with pytest.raises(ValueError, match=r"tokenizer must be a transformers tokenizer, got the string 'gpt2'.*"
                                         r"AutoTokenizer\.from_pretrained\('gpt2'\)"):
        Expert(model, "gpt2")
    with pytest.raises(ValueError, match=r"^experts\[1\]: tokenizer must be a transformers tokenizer, got the "
                                         r"string 'tok'"):
        DLMoM([(model, tok), (model, "tok")])
    with pytest.raises(ValueError, match=r"model must be a loaded transformers causal LM, got the string 'gpt2'"):
        Expert("gpt2", tok)
    with pytest.raises(ValueError, match=r"tokenizer must be a transformers tokenizer, got Tokenizer \(it has no "
                                         r"convert_ids_to_tokens, __len__\)"):
        Expert(model, tok.backend_tokenizer)  # the tokenizers library's object, not transformers'
    with pytest.raises(ValueError, match="name must be a string, got int 5"):
        Expert(model, tok, name=5)
    with pytest.raises(ValueError, match="system_prompt must be a string or None, got list"):
        Expert(model, tok, system_prompt=["You are a solver."])


@pytest.mark.parametrize("device, message", [
    ("banana", "not a torch device"),
    ("cuda:-1", "not a torch device"),
    ("cuda:99", "cuda"),
    ("meta", "meta tensors hold no data"),
    ("privateuseone", "not available"),
    (["cpu"], "not a torch device"),
])
def test_check_device_names_the_device_and_the_problem(device, message):
    with pytest.raises(ValueError, match="^" + re.escape(f"device {device!r}: ")) as err:
        loading.check_device(device)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_check_device_cuda_without_cuda():
    with pytest.raises(ValueError, match="^device 'cuda': cuda is not available") as err:
        loading.check_device("cuda")
    assert ("built without CUDA" in str(err.value)) == (torch.version.cuda is None)


def test_check_device_accepts_usable_devices():
    assert loading.check_device("cpu") == torch.device("cpu")
    assert loading.check_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert loading.check_device("cuda:0") == torch.device("cuda:0")


def test_load_pretrained_checks_the_device_first(model_folder):
    with pytest.raises(ValueError, match="^device 'cuda:99': "):
        loading.load_pretrained(model_folder, device="cuda:99")
