"""The Text-Bridge and the vocabulary alignment between different tokenizers."""
import torch

from dlmom.bus import TextBridge, align_logits, packet_bytes, vocab_alignment
from tiny_models import tokenizer

TEXT = "What is 12 * 7? The answer is 84. Then add 19 to get 103."


def test_bridge_feeds_exactly_the_text():
    src, dst = tokenizer("bytes", 300), tokenizer("words", 420)
    bridge = TextBridge(src, dst, batch=1)
    total = 0
    for tok in src.encode(TEXT):
        _, (n,) = bridge.push([tok])
        total += n
    assert dst.decode(bridge.fed[0]) == TEXT
    assert total == len(TEXT.encode())
    assert bridge.push([None]) == ([[]], [0])


def test_bridge_holds_back_incomplete_characters():
    src, dst = tokenizer("bytes", 300), tokenizer("bytes", 260)
    bridge = TextBridge(src, dst, batch=1)
    ids = src.encode("é")  # two bytes, two tokens in a small byte-level vocabulary
    assert len(ids) == 2
    assert bridge.push([ids[0]]) == ([[]], [0])
    fed, n = bridge.push([ids[1]])
    assert dst.decode(fed[0]) == "é" and n == [2]


def test_alignment_maps_equal_strings_and_floors_the_rest():
    src, dst = tokenizer("bytes", 300), tokenizer("words", 420)
    mapping = vocab_alignment(src, dst, len(src))
    assert mapping.shape == (len(src),)
    for i in (mapping >= 0).nonzero()[:20, 0].tolist():
        assert src.decode([i]) == dst.decode([int(mapping[i])])
    assert bool((mapping < 0).any()), "different tokenizers must leave some tokens unmatched"
    logits = torch.randn(2, len(dst))
    aligned = align_logits(logits, mapping)
    assert aligned.shape == (2, len(src))
    hit = mapping >= 0
    assert torch.equal(aligned[:, hit], logits[:, mapping[hit]])
    assert torch.equal(aligned[:, ~hit], logits.amin(-1, keepdim=True).expand(2, int((~hit).sum())))


def test_packet_bytes_counts_ids_and_probs():
    assert packet_bytes(torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 16)) == 16 * 12
