"""Transcripts: the text and trace each prompt's steps make."""
from dlmom.results import Transcripts
from tiny_models import tokenizer

TEXT = "café über naïve 12€"


def steps(tok, ids, *, eos=()):
    t = Transcripts(tok, 1, eos=set(eos), stops=[])
    for i, x in enumerate(ids):
        t.record(0, step=i, mode="explicit", out=x, entropy=0.0, top_ids=[x], top_probs=[1.0], agreement=None,
                 switches=0, bus_bytes=0, switch=None, merged=True)
    return t


def test_a_character_split_over_tokens_shows_whole_on_the_token_that_ends_it():
    tok = tokenizer("bytes", 300)  # byte-level BPE: é, ü, ï and € take 2-3 tokens each
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 6  # the halves the trace used to show
    t = steps(tok, ids)
    tokens = [r["token"] for r in t.traces[0]]
    assert "".join(tokens) == TEXT == t.texts[0]
    assert "\ufffd" not in "".join(tokens) and "é" in tokens and "€" in tokens
    assert [r["id"] for r in t.traces[0]] == ids  # every step is still recorded with its own id


def test_the_end_of_sequence_step_adds_no_text():
    tok = tokenizer("bytes", 300)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    t = steps(tok, tok.encode("ok", add_special_tokens=False) + [eos], eos=[eos])
    assert t.traces[0][-1]["token"] == "" and t.texts[0] == "ok" and bool(t.finished[0])
