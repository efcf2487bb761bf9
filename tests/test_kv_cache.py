"""KIVICache: a transformers Cache holding keys per channel and values per token in 2 bits."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import dlmom
import tiny_models
from dlmom.kv_cache import KIVILayer, cache_nbytes, new_cache


@pytest.fixture(scope="module")
def tok():
    return tiny_models.tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_models.llama(tok)


def _ids(tok, n: int, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tok), (batch, n), generator=g)


def _dense_nbytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _half_step_error(q, x: torch.Tensor) -> torch.Tensor:
    """|dequant(q) - x| - scale / 2 per element (<= 0 where the half-step bound holds)."""
    deq = dlmom.kv_dequant2(q, dtype=torch.float32)
    G = q.group_size
    n = x.shape[q.axis]
    half = q.scale.float().repeat_interleave(G, dim=q.axis).narrow(q.axis, 0, n) / 2
    return (deq - x.float()).abs() - half


def _forward(model, ids, cache, kwarg: str):
    with torch.inference_mode():
        if kwarg == "cache":
            return model(ids, cache=cache).logits
        with pytest.warns(FutureWarning, match="past_key_values"):
            return model(ids, past_key_values=cache).logits


# ---------------------------------------------------------------- exact while nothing is quantised

@pytest.mark.parametrize("kwarg", ["cache", "past_key_values"])
def test_forward_equals_dynamic_cache_when_residual_covers_the_sequence(model, tok, kwarg):
    ids = _ids(tok, 100, batch=2)
    full, kivi = DynamicCache(config=model.config), dlmom.KIVICache(group_size=32, residual_length=128)
    assert torch.equal(_forward(model, ids[:, :90], kivi, kwarg), _forward(model, ids[:, :90], full, "cache"))
    for t in range(90, 100):  # decode steps, one token each
        assert torch.equal(_forward(model, ids[:, t:t + 1], kivi, kwarg),
                           _forward(model, ids[:, t:t + 1], full, "cache"))
    assert kivi.get_seq_length() == 100
    assert all(not layer.quantized_keys and layer.quantized_values is None for layer in kivi.layers)
    assert kivi.nbytes() == _dense_nbytes(full)


@pytest.mark.parametrize("kwarg", ["cache", "past_key_values"])
def test_generate_equals_dynamic_cache_when_residual_covers_the_sequence(model, tok, kwarg):
    ids = _ids(tok, 40, seed=1)
    args = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        want = model.generate(ids, **args)
        if kwarg == "cache":
            got = model.generate(ids, cache=dlmom.KIVICache(group_size=32, residual_length=64), **args)
        else:
            with pytest.warns(FutureWarning, match="past_key_values"):
                got = model.generate(ids, past_key_values=dlmom.KIVICache(group_size=32, residual_length=64), **args)
    assert torch.equal(got, want)


def test_sliding_window_model_equals_dynamic_cache(tok):
    # Gemma 3 has sliding-window layers: KIVICache keeps them whole and the model's mask applies the window.
    model = tiny_models.gemma3(tok)
    ids = _ids(tok, 40, batch=2, seed=6)
    args = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, cache=dlmom.KIVICache(group_size=32, residual_length=64), **args),
                           model.generate(ids, **args))


# ---------------------------------------------------------------- what is quantised, and how well

def _filled_layer(keys: torch.Tensor, values: torch.Tensor, *, prefill: int, group_size: int,
                  residual_length: int) -> tuple[KIVILayer, torch.Tensor, torch.Tensor]:
    """A layer fed ``prefill`` tokens in bulk, then the rest one at a time; returns it and the last update."""
    layer = KIVILayer(group_size=group_size, residual_length=residual_length)
    out = layer.update(keys[..., :prefill, :], values[..., :prefill, :])
    for t in range(prefill, keys.shape[-2]):
        out = layer.update(keys[..., t:t + 1, :], values[..., t:t + 1, :])
    return layer, *out


@pytest.mark.parametrize("prefill,n", [(300, 300), (20, 150), (256, 257)])
@pytest.mark.parametrize("group_size,residual_length", [(32, 64), (8, 24), (3, 6)])
def test_quantised_parts_are_within_half_a_step(prefill, n, group_size, residual_length):
    g = torch.Generator().manual_seed(n + group_size)
    keys = torch.randn(2, 3, n, 16, generator=g) * torch.linspace(0.1, 4, 16)  # channels of different ranges
    values = torch.randn(2, 3, n, 16, generator=g)
    layer, _, _ = _filled_layer(keys, values, prefill=prefill, group_size=group_size,
                                residual_length=residual_length)
    R = residual_length
    nk = (n - 1) // R * R  # keys: whole blocks of R, 1..R left in full precision
    nv = max(n - R, 0)  # values: a sliding window of R
    assert layer.keys.shape[-2] == n - nk and layer.values.shape[-2] == n - nv
    assert torch.equal(layer.keys, keys[..., nk:, :]) and torch.equal(layer.values, values[..., nv:, :])
    start = 0
    for q in layer.quantized_keys:
        assert q.axis == -2 and q.group_size == group_size and q.shape[-2] % R == 0
        assert (_half_step_error(q, keys[..., start:start + q.shape[-2], :]) <= 1e-6).all()
        start += q.shape[-2]
    assert start == nk
    q = layer.quantized_values
    assert (q is None) == (nv == 0)
    if q is not None:
        assert q.axis == -1 and q.shape[-2] == nv
        assert (_half_step_error(q, values[..., :nv, :]) <= 1e-6).all()
    # What attention sees next: the dequantised history, then the full-precision tails.
    dk, dv = layer._dequantized()
    step_k, step_v = layer.update(keys[..., :1, :], values[..., :1, :])
    assert torch.equal(step_k[..., :nk, :], dk) and torch.equal(step_v[..., :nv, :], dv)
    assert torch.equal(step_k[..., nk:n, :], keys[..., nk:, :])
    assert layer.get_seq_length() == n + 1


def test_constant_groups_are_exact():
    g = torch.Generator().manual_seed(0)
    n, D = 200, 16
    # keys constant along tokens in every channel (a key group is G tokens of one channel), values constant
    # along channels in every token (a value group is G channels of one token)
    keys = torch.randn(1, 2, 1, D, generator=g).expand(1, 2, n, D).contiguous()
    values = torch.randn(1, 2, n, 1, generator=g).expand(1, 2, n, D).contiguous()
    layer, out_k, out_v = _filled_layer(keys, values, prefill=150, group_size=16, residual_length=32)
    assert layer.quantized_keys and layer.quantized_values is not None
    assert torch.equal(out_k, keys) and torch.equal(out_v, values)


def test_nbytes_at_2048_tokens_is_at_most_a_quarter_of_dynamic_cache(model, tok):
    ids = _ids(tok, 2048, seed=2)
    full, kivi = DynamicCache(config=model.config), dlmom.KIVICache()
    _forward(model, ids[:, :2000], full, "cache")
    _forward(model, ids[:, :2000], kivi, "cache")
    for t in range(2000, 2048):
        _forward(model, ids[:, t:t + 1], full, "cache")
        _forward(model, ids[:, t:t + 1], kivi, "cache")
    assert kivi.get_seq_length() == full.get_seq_length() == 2048
    held = sum(sum(q.nbytes() for q in layer.quantized_keys) + layer.quantized_values.nbytes()
               + layer.keys.nbytes + layer.values.nbytes for layer in kivi.layers)
    assert kivi.nbytes() == held
    assert kivi.nbytes() <= 0.25 * _dense_nbytes(full), kivi.nbytes() / _dense_nbytes(full)


def test_greedy_generate_runs_and_agrees_with_the_full_cache(model, tok):
    n, new = 300, 32
    ids = _ids(tok, n, seed=3)
    args = dict(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        want = model.generate(ids, **args)
        got = model.generate(ids, cache=dlmom.KIVICache(group_size=32, residual_length=64), **args)
    assert got.shape == want.shape and torch.equal(got[:, :n], ids)
    # A random tiny model's top two logits are often within ~0.04 of each other, so a free-running greedy
    # sequence follows the first flip it meets. Agreement is therefore counted step by step on the full
    # cache's greedy path: the token KIVICache's greedy step would pick after the same prefix.
    cache = dlmom.KIVICache(group_size=32, residual_length=64)
    picks = [_forward(model, want[:, :n], cache, "cache")[0, -1].argmax()]
    for t in range(n, n + new - 1):
        picks.append(_forward(model, want[:, t:t + 1], cache, "cache")[0, -1].argmax())
    agree = (torch.stack(picks) == want[0, n:]).float().mean().item()
    assert cache.layers[0].quantized_keys, "the test must exercise the quantised path"
    assert agree >= 0.9, agree


# ---------------------------------------------------------------- what the engine may do with a cache

def test_batch_select_and_reorder_move_every_part(model, tok):
    ids = _ids(tok, 150, batch=3, seed=4)
    both = dlmom.KIVICache(group_size=32, residual_length=64)
    _forward(model, ids, both, "cache")
    both.batch_select_indices(torch.tensor([2, 0]))
    both.reorder_cache(torch.tensor([1, 0]))  # rows are now [0, 2]
    nxt = _ids(tok, 1, batch=3, seed=5)
    got = _forward(model, nxt[[0, 2]], both, "cache")
    for row, i in enumerate([0, 2]):
        alone = dlmom.KIVICache(group_size=32, residual_length=64)
        _forward(model, ids[i:i + 1], alone, "cache")
        torch.testing.assert_close(got[row:row + 1], _forward(model, nxt[i:i + 1], alone, "cache"),
                                   rtol=1e-5, atol=1e-5)


def test_crop_inside_the_full_precision_keys():
    keys, values = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    layer, _, _ = _filled_layer(keys, values, prefill=100, group_size=8, residual_length=32)
    # keys: 96 quantised, 4 full precision; values: 68 quantised, 32 full precision
    layer.crop(-3)
    assert layer.get_seq_length() == 97 and layer.keys.shape[-2] == 1 and layer.values.shape[-2] == 29
    with pytest.raises(ValueError, match="full precision"):
        layer.crop(-2)
    short = KIVILayer(group_size=8, residual_length=32)
    short.update(keys[..., :40, :], values[..., :40, :])  # keys 32 + 8, values 8 quantised + 32
    short.crop(-8)
    assert short.get_seq_length() == 32 and short.values.shape[-2] == 24
    short.crop(0)  # nothing to drop
    assert short.get_seq_length() == 32
    layer.crop(-1)
    assert layer.get_seq_length() == 96 and layer.values.shape[-2] == 28


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs,name", [
    (dict(group_size=0), "group_size"),
    (dict(group_size=-4, residual_length=8), "group_size"),
    (dict(group_size=2.0), "group_size"),
    (dict(group_size=32, residual_length=100), "residual_length"),
    (dict(group_size=32, residual_length=0), "residual_length"),
    (dict(group_size=8, residual_length=True), "residual_length"),
])
def test_bad_configuration_raises_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dlmom.KIVICache(**kwargs)


def test_new_cache_and_cache_nbytes(model, tok):
    full, kivi = new_cache("full", model.config), new_cache("kivi", model.config, group_size=8, residual_length=16)
    assert isinstance(full, DynamicCache) and isinstance(kivi, dlmom.KIVICache) and kivi.residual_length == 16
    assert cache_nbytes(None) == cache_nbytes(full) == 0
    _forward(model, _ids(tok, 20), full, "cache")
    assert cache_nbytes(full) == _dense_nbytes(full) > 0
    with pytest.raises(ValueError, match="kv must be one of"):
        new_cache("zip", model.config)


def test_exported_lazily():
    assert "KIVICache" in dlmom.__all__
    from dlmom.kv_cache import KIVICache

    assert dlmom.KIVICache is KIVICache
    assert repr(KIVICache()) == "KIVICache(group_size=32, residual_length=128, layers=0)"
