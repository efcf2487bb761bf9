"""Tiny random models and tokenizers trained on the spot: real transformers classes, no download."""
from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [f"What is {a} * {b}? The answer is {a * b}. Then add {a + b} to get {a * b + a + b}."
          for a in range(2, 30) for b in range(3, 17)] + [
    "Plan the steps, solve the problem, and check every step before the final answer.",
    "Write a function that returns the sum of a list of numbers.",
]


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str = "bytes", vocab_size: int = 300):
    """A PreTrainedTokenizerFast with a chat template: "bytes" is byte-level BPE, "words" a whitespace BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    if kind == "bytes":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        # SentencePiece-style word marks without a dummy prefix, as Gemma's tokenizer has.
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        tk.decoder = decoders.Metaspace(prepend_scheme="never")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + ["<unk>"])
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<unk>" if kind != "bytes" else None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(tok, *, seed: int = 0, extra_rows: int = 0, dtype=torch.float32, layers: int = 2):
    """A ``layers``-layer Llama with hidden 64 for ``tok`` (embedding padded by ``extra_rows``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def gemma3(tok, *, seed: int = 0):
    """A 2-layer Gemma 3 text model (scaled embeddings: x sqrt(hidden)) for ``tok``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, sliding_window=16, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return Gemma3ForCausalLM(config).eval()


def hf_greedy(model, tok, prompt: str, max_new_tokens: int, system: str | None = None) -> str:
    """transformers' own greedy generate on the chat-templated prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
