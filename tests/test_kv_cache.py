"""KIVICache and MiniCache: transformers Caches holding 2-bit keys and values, and merged adjacent layers."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

import dlmom
import tiny_models
from dlmom.kv import KV_MODES, KIVILayer, MiniCacheLayer, cache_nbytes, new_cache


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


def _retained_half_step_error(got: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """|got - x| - scale / 2 per element, scale that of 2-bit per-token quantisation of x [..., D] (KIVI's value
    rule, which is how a merged pair's retained vectors are stored: each alone, groups over its channels)."""
    q = dlmom.kv_quant2(x.float().contiguous(), group_size=group_size, axis=-1)
    half = q.scale.repeat_interleave(group_size, dim=-1)[..., :x.shape[-1]] / 2
    return (got.float() - x.float()).abs() - half


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
    dk, dv = layer.archived()
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
    from dlmom.kv import KIVICache

    assert dlmom.KIVICache is KIVICache
    assert repr(KIVICache()) == "KIVICache(group_size=32, residual_length=128, layers=0)"


# ================================================================ MiniCache: merged adjacent layers

MERGED = ["minicache", "kivi+minicache"]


@pytest.fixture(scope="module")
def deep(tok):
    """A 5-layer Llama: mid-depth (5 // 2 = 2) merges the pair (2, 3) and leaves layer 4 on its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _merged(kind: str, *, residual_length: int = 32, config=None, **merge):
    if kind == "minicache":
        return dlmom.MiniCache(residual_length=residual_length, config=config, **merge)
    return dlmom.KIVICache(group_size=8, residual_length=residual_length, merge_layers=True, config=config, **merge)


def _slerp_reference(xa: torch.Tensor, xb: torch.Tensor, t: float, threshold: float):
    """MiniCache by the book, in float64: magnitudes, SLERP of the unit directions (xa's own direction where
    arccos(cos) / pi > threshold), and that keep mask."""
    xa, xb = xa.double(), xb.double()
    ma, mb = xa.norm(dim=-1, keepdim=True), xb.norm(dim=-1, keepdim=True)
    ua, ub = xa / ma, xb / mb
    theta = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    slerp = (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / torch.sin(theta)
    keep = theta / math.pi > threshold
    return ma, mb, torch.where(keep, ua, slerp), keep.squeeze(-1)


def _pair_states(n: int, *, seed: int, same: bool = False) -> list[torch.Tensor]:
    """Keys and values [2, 3, n, 16] of two layers: the second is the first plus noise of a random size per
    token, so the angles between them spread over both sides of a threshold around 0.25 (45 degrees)."""
    g = torch.Generator().manual_seed(seed)
    k0, v0 = torch.randn(2, 3, n, 16, generator=g) * torch.linspace(0.2, 3, 16), torch.randn(2, 3, n, 16, generator=g)
    if same:
        return [k0, v0, k0.clone(), v0.clone()]
    noise = lambda x: x + torch.rand(2, 3, n, 1, generator=g) * 2 * torch.randn(x.shape, generator=g) * x.std()
    return [k0, v0, noise(k0), noise(v0)]


def _feed_pair(cache, states: list[torch.Tensor], *, prefill: int):
    """Prefill two layers with ``prefill`` tokens, then the rest one by one. Returns each layer's whole history as
    the next update reads it back (archived part, then the windows): [keys0, values0, keys1, values1]."""
    k0, v0, k1, v1 = states
    cache.update(k0[..., :prefill, :], v0[..., :prefill, :], 0)
    cache.update(k1[..., :prefill, :], v1[..., :prefill, :], 1)
    for t in range(prefill, k0.shape[-2]):
        cache.update(k0[..., t:t + 1, :], v0[..., t:t + 1, :], 0)
        cache.update(k1[..., t:t + 1, :], v1[..., t:t + 1, :], 1)
    out = []
    for layer in cache.layers:
        dk, dv = layer.archived()
        out += [torch.cat([dk, layer.keys], dim=-2), torch.cat([dv, layer.values], dim=-2)]
    return out


# ---------------------------------------------------------------- exact while nothing is archived

@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("kind", MERGED)
def test_merged_cache_equals_dynamic_cache_while_the_window_covers_the_sequence(deep, tok, kind, with_config):
    ids = _ids(tok, 100, batch=2, seed=7)
    full = DynamicCache(config=deep.config)
    merged = _merged(kind, residual_length=128, config=deep.config if with_config else None)
    assert torch.equal(_forward(deep, ids[:, :90], merged, "cache"), _forward(deep, ids[:, :90], full, "cache"))
    for t in range(90, 100):
        assert torch.equal(_forward(deep, ids[:, t:t + 1], merged, "cache"),
                           _forward(deep, ids[:, t:t + 1], full, "cache"))
    assert merged.num_layers == 5 and [layer.role for layer in merged.layers] == ["own", "own", "a", "b", "own"]
    assert merged.nbytes() == _dense_nbytes(full)


# ---------------------------------------------------------------- what a merged pair restores

@pytest.mark.parametrize("t,threshold", [(0.6, 0.25), (0.3, 0.4)])
@pytest.mark.parametrize("prefill,n", [(70, 70), (20, 90)])
def test_minicache_restores_magnitude_times_slerp_and_retained_tokens_exactly(t, threshold, prefill, n):
    states = _pair_states(n, seed=prefill + n)
    R = 16
    cache = dlmom.MiniCache(residual_length=R, merge_start=0, merge_t=t, merge_threshold=threshold,
                            config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=prefill)
    na = n - R  # archived (merged) tokens of both kinds: sliding windows of R
    for kind in (0, 1):
        xa, xb = states[kind][..., :na, :], states[2 + kind][..., :na, :]
        ma, mb, direction, keep = _slerp_reference(xa, xb, t, threshold)
        assert 0 < keep.sum() < keep.numel(), "the test needs merged and retained tokens"
        torch.testing.assert_close(out[kind][..., :na, :].double(), ma * direction, rtol=1e-5, atol=1e-5)
        want_b = torch.where(keep.unsqueeze(-1), xb.double(), mb * direction)
        torch.testing.assert_close(out[2 + kind][..., :na, :].double(), want_b, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[2 + kind][..., :na, :][keep], xb[keep])  # retained: the layer's own vector
        for layer in (0, 1):  # the window: exact
            assert torch.equal(out[2 * layer + kind][..., na:n, :], states[2 * layer + kind][..., na:, :])
        stream = cache.layers[0].archives[kind].stream
        assert stream.pending is None and len(stream) == na and len(stream.retained) == keep.sum()


@pytest.mark.parametrize("prefill,n", [(70, 70), (20, 90)])
def test_kivi_merged_pair_restores_within_half_a_step_of_the_slerp_direction(prefill, n):
    t, threshold, G, R = 0.6, 0.25, 8, 16
    states = _pair_states(n, seed=n)
    cache = dlmom.KIVICache(group_size=G, residual_length=R, merge_layers=True, merge_start=0, merge_t=t,
                            merge_threshold=threshold, config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=prefill)
    a, b = cache.layers
    archived = {0: (n - 1) // R * R, 1: n - R}  # keys: whole blocks of R; values: a sliding window of R
    for kind, q in ((0, a.quantized_keys), (1, [a.quantized_values])):
        na = archived[kind]
        assert b.quantized_keys == a.quantized_keys and sum(x.shape[-2] for x in q) == na  # one copy, shared
        xa, xb = states[kind][..., :na, :], states[2 + kind][..., :na, :]
        ma, mb, direction, keep = _slerp_reference(xa, xb, t, threshold)
        assert 0 < keep.sum() < keep.numel(), "the test needs merged and retained tokens"
        start = 0
        for block in q:  # the merged direction is what is quantised, by KIVI's rule for its kind
            assert block.axis == (-2 if kind == 0 else -1)
            m = block.shape[-2]
            assert (_half_step_error(block, direction[..., start:start + m, :].float()) <= 1e-5).all()
            start += m
        deq = torch.cat([dlmom.kv_dequant2(block) for block in q], dim=-2).double()
        torch.testing.assert_close(out[kind][..., :na, :].double(), ma * deq, rtol=1e-5, atol=1e-5)
        got_b = out[2 + kind][..., :na, :]
        torch.testing.assert_close(got_b[~keep].double(), (mb * deq)[~keep], rtol=1e-5, atol=1e-5)
        # retained: layer l+1's own vector, 2-bit per token like the rest of the archive
        assert (_retained_half_step_error(got_b, xb, G)[keep] <= 1e-6).all()
        assert not torch.equal(got_b[keep], xb[keep]), "retained vectors are quantised under KIVI"


@pytest.mark.parametrize("kind", MERGED)
@pytest.mark.parametrize("t", [0.0, 0.6, 1.0])
def test_identical_adjacent_layers_restore_exactly(kind, t):
    states = _pair_states(80, seed=11, same=True)
    cache = _merged(kind, residual_length=16, merge_start=0, merge_t=t, merge_threshold=0.0,
                    config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=60)
    stream = cache.layers[0].archives[1].stream
    assert len(stream) == 64 and len(stream.retained) == 0  # identical directions: nothing is retained
    if kind == "minicache":
        for got, want in zip(out, states):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # the one quantised direction, within half a step of each layer's own, times its magnitude
        a = cache.layers[0]
        for kind, q in ((0, a.quantized_keys[0]), (1, a.quantized_values)):
            x, n = states[kind], q.shape[-2]
            assert torch.equal(out[kind], out[2 + kind])
            norm = x[..., :n, :].norm(dim=-1, keepdim=True)
            assert (_half_step_error(q, x[..., :n, :] / norm) <= 1e-6).all()
            torch.testing.assert_close(out[kind][..., :n, :], norm * dlmom.kv_dequant2(q), rtol=1e-6, atol=1e-6)
            assert torch.equal(out[kind][..., n:, :], x[..., n:, :])


@pytest.mark.parametrize("kind", MERGED)
def test_a_pair_that_retains_every_token_is_stored_as_two_unmerged_layers(kind):
    # Threshold 0 retains every token pair: merged, the pair would hold more than two unmerged layers, so it is
    # stored split, each layer exactly as an unmerged layer of the same cache stores it.
    states = _pair_states(80, seed=12)
    cache = _merged(kind, residual_length=16, merge_start=0, merge_threshold=0.0,
                    config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=60)
    for k in (0, 1):
        stream = cache.layers[0].archives[k].stream
        assert stream.split and len(stream) == 64 and stream.retained.mask is None
    plain = [MiniCacheLayer(residual_length=16) if kind == "minicache"
             else KIVILayer(group_size=8, residual_length=16) for _ in range(2)]
    for layer, k, v in zip(plain, states[::2], states[1::2]):
        layer.update(k[..., :60, :], v[..., :60, :])
        for t in range(60, 80):
            layer.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
    want = []
    for layer in plain:
        dk, dv = layer.archived()
        want += [torch.cat([dk, layer.keys], dim=-2), torch.cat([dv, layer.values], dim=-2)]
    for got, w, x in zip(out, want, states):
        assert torch.equal(got, w)
        if kind == "minicache":
            assert torch.equal(got, x)
    assert cache.nbytes() == sum(layer.nbytes() for layer in plain)


def test_retained_tokens_after_a_merged_start_cost_at_most_the_magnitudes():
    # The first tokens decide (merged: the layers are identical there); later ones are all retained. Then the
    # pair holds what two unmerged KIVI layers hold plus the magnitudes and the mask (group_size divides D, so
    # a retained key's 2-bit form per token costs what it costs per channel).
    n, first, G, R = 120, 60, 8, 16
    states = _pair_states(n, seed=14)
    for k in (0, 1):
        states[2 + k][..., :first, :] = states[k][..., :first, :]
    cache = _merged("kivi+minicache", residual_length=R, merge_start=0, merge_threshold=0.0,
                    config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=first)
    plain = [KIVILayer(group_size=G, residual_length=R) for _ in range(2)]
    for layer, k, v in zip(plain, states[::2], states[1::2]):
        layer.update(k[..., :first, :], v[..., :first, :])
        for t in range(first, n):
            layer.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
    extra = 0
    for k in (0, 1):
        stream = cache.layers[0].archives[k].stream
        na = len(stream)
        assert not stream.split and len(stream.retained) == 2 * 3 * (na - first)  # all pairs after `first`
        got, x = out[2 + k][..., first:na, :], states[2 + k][..., first:na, :]
        assert (_retained_half_step_error(got, x, G) <= 1e-6).all() and not torch.equal(got, x)
        extra += 2 * 3 * na * (2 * 4 + 1)  # two fp32 magnitudes and a mask byte per token and head
    assert cache.nbytes() <= sum(layer.nbytes() for layer in plain) + extra


def test_zero_vectors_restore_without_nan():
    states = _pair_states(40, seed=13)
    for x in states:
        x[:, :, ::3] = 0  # whole tokens zero in both layers, and in one layer only below
    states[2][:, :, 1::3] = 0
    cache = dlmom.MiniCache(residual_length=8, merge_start=0, config=LlamaConfig(num_hidden_layers=2))
    out = _feed_pair(cache, states, prefill=40)
    for got, want in zip(out, states):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[..., :32, :][..., ::3, :], want[..., :32, :][..., ::3, :])


# ---------------------------------------------------------------- memory and the model end to end

def test_merged_caches_hold_less_at_2048_tokens_and_never_more_than_unmerged(deep, tok):
    # A random model's adjacent layers are almost orthogonal (angle / pi ~ 0.5), so the default threshold would
    # retain nearly every token here: merge them all (threshold 1) to measure what merging itself saves, and
    # retain them all (threshold 0) to check that the pairs are then stored as unmerged layers, exactly.
    # group_size 8: with head_dim 16, a KIVI token costs more than the two magnitudes a merge adds (at 32 it
    # does not, and the keys would rightly be stored split even at threshold 1).
    ids = _ids(tok, 2048, seed=2)
    kivi = lambda **merge: dlmom.KIVICache(group_size=8, config=deep.config, **merge)
    caches = {"full": DynamicCache(config=deep.config), "kivi": kivi(),
              "minicache": dlmom.MiniCache(merge_start=1, merge_threshold=1.0, config=deep.config),
              "kivi+minicache": kivi(merge_layers=True, merge_start=1, merge_threshold=1.0),
              "minicache@0": dlmom.MiniCache(merge_start=1, merge_threshold=0.0, config=deep.config),
              "kivi+minicache@0": kivi(merge_layers=True, merge_start=1, merge_threshold=0.0)}
    last = {}
    for name, cache in caches.items():
        _forward(deep, ids[:, :2000], cache, "cache")
        for t in range(2000, 2048):
            last[name] = _forward(deep, ids[:, t:t + 1], cache, "cache")
    full, kivi = _dense_nbytes(caches["full"]), caches["kivi"].nbytes()
    mini, both = caches["minicache"].nbytes(), caches["kivi+minicache"].nbytes()
    assert mini < full and both < kivi, (mini / full, both / kivi)
    # What is held, counted from the parts: pairs (1, 2) and (3, 4) keep one direction each plus both
    # magnitudes [B, H, n] in fp32 and the bool mask of retained tokens; the windows (R = 128) stay per layer.
    B, H, D, n_k, n_v = 1, 2, 16, 1920, 2048 - 128
    layers = caches["kivi"].layers
    mags = 2 * (2 * 4 + 1) * B * H * (n_k + n_v)  # two pairs: two fp32 magnitudes and a mask byte
    want = kivi - sum(sum(q.nbytes() for q in layers[i].quantized_keys) + layers[i].quantized_values.nbytes()
                      for i in (2, 4)) + mags
    assert both == want, (both, want)
    want = full - 2 * B * H * (n_k + n_v) * D * 4 + mags  # minicache: one direction instead of two states per pair
    assert mini == want, (mini, want)
    # Everything retained: stored split, i.e. exactly the unmerged cache, bytes and outputs.
    assert caches["kivi+minicache@0"].nbytes() == kivi and caches["minicache@0"].nbytes() == full
    assert torch.equal(last["kivi+minicache@0"], last["kivi"]) and torch.equal(last["minicache@0"], last["full"])
    for name, cache in caches.items():
        streams = [s.stream for layer in cache.layers if getattr(layer, "role", None) == "a" for s in layer.archives]
        assert len(streams) == (0 if "minicache" not in name else 4)
        for s in streams:
            assert s.pending is None and s.split == name.endswith("@0") and len(s) == (n_v if s.split else len(s))
            assert s.split or len(s.retained) == 0


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("kind", MERGED)
def test_greedy_generate_runs_with_a_merged_cache(deep, tok, kind, with_config):
    n, new = 200, 16
    ids = _ids(tok, n, seed=3)
    args = dict(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    cache = _merged(kind, config=deep.config if with_config else None, merge_threshold=1.0)
    with torch.inference_mode():
        got = deep.generate(ids, cache=cache, **args)
    assert got.shape == (1, n + new) and torch.equal(got[:, :n], ids)
    assert cache.get_seq_length() == n + new - 1
    stream = cache.layers[2].archives[1].stream
    assert len(stream) == n + new - 1 - 32 and stream.pending is None  # values: all but the window merged


@pytest.mark.parametrize("kind", MERGED)
def test_lazy_layer_count_merges_at_the_second_forward_as_with_config(deep, tok, kind):
    ids = _ids(tok, 100, seed=8)
    lazy, known = _merged(kind, merge_threshold=1.0), _merged(kind, config=deep.config, merge_threshold=1.0)
    assert torch.equal(_forward(deep, ids[:, :90], lazy, "cache"), _forward(deep, ids[:, :90], known, "cache"))
    # Until the second forward the lazy cache cannot know that layers 2 and 3 merge: it holds them in full.
    assert lazy.num_layers is None and all(layer.role is None for layer in lazy.layers[2:])
    assert lazy.nbytes() > known.nbytes()
    for t in range(90, 100):
        torch.testing.assert_close(_forward(deep, ids[:, t:t + 1], lazy, "cache"),
                                   _forward(deep, ids[:, t:t + 1], known, "cache"), rtol=1e-5, atol=1e-5)
    assert [layer.role for layer in lazy.layers] == ["own", "own", "a", "b", "own"]
    assert lazy.nbytes() == known.nbytes()


# ---------------------------------------------------------------- what the engine may do with a merged cache

@pytest.mark.parametrize("threshold", [0.52, 0.0])
@pytest.mark.parametrize("kind", MERGED)
def test_batch_select_reorder_and_repeat_on_a_merged_cache(deep, tok, kind, threshold):
    ids = _ids(tok, 100, batch=3, seed=4)
    nxt = _ids(tok, 1, batch=3, seed=5)
    # threshold 0.52: a random model's layers are ~0.5 apart, so rows hold both merged and retained tokens, and
    # merging is still the cheaper form; threshold 0 retains every token, so the pair is stored split.
    both = _merged(kind, config=deep.config, merge_threshold=threshold)
    _forward(deep, ids, both, "cache")
    for stream in (s.stream for s in both.layers[2].archives):
        assert stream.split == (threshold == 0)
        if not stream.split:
            mask = stream.retained.mask  # [n, B, H]
            assert 0 < mask.sum() < mask.numel() and mask.any(2).any(0).all() and not mask.all(2).all(0).any()
    both.batch_select_indices(torch.tensor([2, 0]))
    both.reorder_cache(torch.tensor([1, 0]))  # rows are now [0, 2]
    both.batch_repeat_interleave(2)  # rows are now [0, 0, 2, 2]
    got = _forward(deep, nxt[[0, 0, 2, 2]], both, "cache")
    for row, i in enumerate([0, 0, 2, 2]):
        alone = _merged(kind, config=deep.config, merge_threshold=threshold)
        _forward(deep, ids[i:i + 1], alone, "cache")
        torch.testing.assert_close(got[row:row + 1], _forward(deep, nxt[i:i + 1], alone, "cache"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MERGED)
def test_crop_a_merged_cache_inside_the_windows_all_or_nothing(deep, tok, kind):
    cache = _merged(kind, config=deep.config)
    _forward(deep, _ids(tok, 70, seed=9), cache, "cache")
    window = cache.layers[2].keys.shape[-2]
    with pytest.raises(ValueError, match="full precision"):
        cache.crop(-(window + 1))
    assert all(layer.get_seq_length() == 70 for layer in cache.layers)  # nothing cropped
    cache.crop(-3)
    assert all(layer.get_seq_length() == 67 for layer in cache.layers)


# ---------------------------------------------------------------- configuration of merging

@pytest.mark.parametrize("kwargs,name", [
    (dict(merge_start=-1), "merge_start"),
    (dict(merge_start=1.0), "merge_start"),
    (dict(merge_t=-0.1), "merge_t"),
    (dict(merge_t=1.5), "merge_t"),
    (dict(merge_t="0.6"), "merge_t"),
    (dict(merge_threshold=-0.01), "merge_threshold"),
    (dict(merge_threshold=2), "merge_threshold"),
    (dict(merge_threshold=True), "merge_threshold"),
    (dict(merge_threshold=float("nan")), "merge_threshold"),
])
@pytest.mark.parametrize("kind", MERGED)
def test_bad_merge_configuration_raises_naming_the_argument(kind, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _merged(kind, **kwargs)


@pytest.mark.parametrize("kind", MERGED)
def test_merge_start_outside_the_layers_raises(deep, tok, kind):
    with pytest.raises(ValueError, match=r"merge_start must be in \[0, num_layers - 2 = 3\].*got 4"):
        _merged(kind, merge_start=4, config=deep.config)
    assert _merged(kind, merge_start=3, config=deep.config).num_layers == 5
    # Without a config the count is known when the second forward starts: it raises there, before merging.
    lazy = _merged(kind, merge_start=4)
    _forward(deep, _ids(tok, 40), lazy, "cache")
    with pytest.raises(ValueError, match=r"merge_start must be in \[0, num_layers - 2 = 3\].*got 4"):
        _forward(deep, _ids(tok, 1), lazy, "cache")
    with pytest.raises(ValueError, match="at least 2 layers"):
        _merged(kind, config=LlamaConfig(num_hidden_layers=1))


@pytest.mark.parametrize("kwargs,name", [
    (dict(residual_length=0), "residual_length"),
    (dict(residual_length=12.0), "residual_length"),
])
def test_minicache_bad_residual_length(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dlmom.MiniCache(**kwargs)
    with pytest.raises(ValueError, match="merge_layers"):
        dlmom.KIVICache(merge_layers=1)


def test_new_cache_builds_every_mode(deep):
    assert KV_MODES == ("full", "kivi", "minicache", "kivi+minicache")
    caches = {kv: new_cache(kv, deep.config, group_size=8, residual_length=16, merge_t=0.5) for kv in KV_MODES}
    assert isinstance(caches["full"], DynamicCache)
    assert isinstance(caches["kivi"], dlmom.KIVICache) and not caches["kivi"].merge_layers
    assert isinstance(caches["minicache"], dlmom.MiniCache) and caches["minicache"].residual_length == 16
    both = caches["kivi+minicache"]
    assert isinstance(both, dlmom.KIVICache) and both.merge_layers and both.group_size == 8
    assert both.num_layers == caches["minicache"].num_layers == 5 and both.merge_t == 0.5
    assert repr(both) == ("KIVICache(group_size=8, residual_length=16, merge_layers=True, merge_start=None, "
                          "merge_t=0.5, merge_threshold=0.25, layers=0)")
    assert "MiniCache" in dlmom.__all__ and dlmom.MiniCache is type(caches["minicache"])


def test_engine_config_takes_every_mode():
    for kv in KV_MODES:
        assert dlmom.DLMoMConfig(kv=kv).kv == kv
    with pytest.raises(ValueError, match="kv must be one of"):
        dlmom.DLMoMConfig(kv="minicache+kivi")
