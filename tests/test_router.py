"""The router ranks experts by bits per byte of a preview."""
import torch

from dlmom import Expert, router
from dlmom.soft_thinking import SoftThinkingRunner
from tiny_models import hf_greedy, llama, tokenizer


def fit(model, tok, prompts, answers, steps=25):
    """A few Adam steps so the model's own greedy answer is the given text (a random model writes bytes
    that do not survive decoding)."""
    rows = [Expert(model, tok).prompt_ids(p, chat=True) + tok.encode(a) for p, a in zip(prompts, answers)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        for row in rows:
            ids = torch.tensor([row])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def test_the_expert_that_wrote_the_preview_ranks_first():
    tok, other_tok = tokenizer("bytes", 300), tokenizer("words", 420)
    author, stranger = llama(tok, seed=3), llama(other_tok, seed=4)
    prompts = ["What is 12 * 7?", "Add 3 to 5."]
    torch.manual_seed(0)
    fit(author, tok, prompts, ["The answer is 84.", "The answer is 8."])
    previews = [hf_greedy(author, tok, p, 6) for p in prompts]
    assert previews[0].startswith("The answer"), previews
    runners = [SoftThinkingRunner([Expert(stranger, other_tok, name="stranger")]),
               SoftThinkingRunner([Expert(author, tok, name="author")])]
    bpb = router.score(runners, prompts, previews, chat=True)
    assert bpb.shape == (2, 2) and bool((bpb > 0).all())
    assert bool((bpb[1] < bpb[0]).all()), bpb  # per byte: comparable across the two tokenizers
    kept, weights = router.select(bpb, top_m=1)
    assert kept.tolist() == [[False, False], [True, True]]
    assert weights[1].tolist() == [1.0, 1.0] and weights[0].tolist() == [0.0, 0.0]


def test_select_keeps_all_and_weights_by_distance_to_best():
    bpb = torch.tensor([[1.0], [1.5], [3.0]])
    kept, weights = router.select(bpb, None)
    assert kept.all()
    torch.testing.assert_close(weights[:, 0], torch.exp(-torch.tensor([0.0, 0.5, 2.0])))
