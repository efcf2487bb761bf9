"""dlmom.lmeval: the mixture as an lm-evaluation-harness model, end to end on task YAMLs written here over local
JSONL files (no network), and its scores against transformers' own log-probabilities."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import llama, tokenizer

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install -e '.[eval]')")

GEN_DOCS = [{"question": "What is 3 * 4?", "answer": " 12"}, {"question": "Then add 5 to get", "answer": " 17"},
            {"question": "Write a function that returns", "answer": " the sum"}]
MC_DOCS = [{"question": "What is 2 * 3? The answer is", "choices": ["6", "5", "8"], "label": 0},
           {"question": "Plan the steps, solve the", "choices": ["problem", "answer"], "label": 0},
           {"question": "Then add 4 to get", "choices": ["10", "100", "1"], "label": 2}]
GEN_TASK = """task: dlmom_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: dlmom_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing reaches the network: the hub and datasets are offline (also when already imported)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """Two tasks of our own: a generative one (until ".") and a multiple-choice one, over local JSONL files."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, docs, task in (("gen", GEN_DOCS, GEN_TASK), ("mc", MC_DOCS, MC_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(task.format(data=data))
    return str(folder)


def hf_logprob(model, ids: list[int], n: int) -> float:
    """transformers' log-probability of the last ``n`` of ``ids`` given the ones before."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[len(ids) - n - 1 + j, t]) for j, t in enumerate(ids[len(ids) - n:]))


def raw_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """(ids of context + continuation, continuation length) as lm-eval's HF model tokenises raw text."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok.encode(stripped) or [tok.bos_token_id]
    whole = tok.encode(stripped + continuation)
    tail = whole[len(tok.encode(stripped)):]
    return ctx + tail, len(tail)


def instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i, ("t", i, 1)) for i, args in enumerate(args_list)]


def evaluate(lm, task_folder, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=task_folder, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True)


PAIRS = [("What is 3 * 4?", " The answer is 12."), ("", "Plan the steps"), ("Then add 5 ", "to get 17."),
         ("Write a function", " that returns the sum of a list")]


@needs_lm_eval
def test_loglikelihood_of_one_expert_is_transformers_logprob(model, tok):
    from dlmom.lmeval import DLMoMLM

    lm = DLMoMLM([(model, tok)], chat=False, batch_size=3, progress=False)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    want = [hf_logprob(model, *raw_pair(tok, c, x)) for c, x in PAIRS]
    torch.testing.assert_close(torch.tensor([g for g, _ in got]), torch.tensor(want), atol=1e-4, rtol=1e-5)


@needs_lm_eval
def test_loglikelihood_with_chat_template_scores_the_assistant_turn(model, tok):
    from dlmom.experts import Expert
    from dlmom.lmeval import DLMoMLM

    expert = Expert(model, tok, name="solver", system_prompt="You are a careful solver.")
    lm = DLMoMLM([expert], batch_size=2, progress=False)  # chat is on by default
    got = lm.loglikelihood(instances("loglikelihood", PAIRS[:2]))
    for (context, continuation), (logprob, _) in zip(PAIRS[:2], got):
        ctx = tok.apply_chat_template([{"role": "system", "content": "You are a careful solver."},
                                       {"role": "user", "content": context}], add_generation_prompt=True,
                                      tokenize=False)
        tail = tok.encode(continuation, add_special_tokens=False)
        assert logprob == pytest.approx(hf_logprob(model, tok.encode(ctx, add_special_tokens=False) + tail,
                                                   len(tail)), abs=1e-4)


@needs_lm_eval
def test_loglikelihood_of_a_mixture_is_the_ties_consensus(tok):
    from dlmom import ties_merge
    from dlmom.lmeval import DLMoMLM

    models = [llama(tok, seed=1), llama(tok, seed=2), llama(tok, seed=3)]
    lm = DLMoMLM([(m, tok) for m in models], chat=False, theta=0.05, elect="mass", batch_size=2, progress=False)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        ids, n = raw_pair(tok, context, continuation)
        with torch.no_grad():
            logits = torch.stack([m(torch.tensor([ids])).logits[0, len(ids) - n - 1:-1].float() for m in models])
        merged = ties_merge(logits, theta=0.05, elect="mass")  # [n, V]
        targets = torch.tensor(ids[len(ids) - n:])
        want = torch.log_softmax(merged, -1).gather(-1, targets.view(-1, 1)).sum()
        assert logprob == pytest.approx(float(want), abs=1e-3)
        assert greedy == bool((merged.argmax(-1) == targets).all())


@needs_lm_eval
@pytest.mark.parametrize("settings", [dict(gate=1.0), dict(consensus="contrastive", contrast=0.7, plausibility=0.05)],
                         ids=["gate-closed", "contrastive"])
def test_loglikelihood_follows_the_configured_consensus(tok, settings):
    # A 4-layer and a 2-layer model: the 4-layer one leads. A closed gate scores with the lead alone;
    # contrastive consensus scores the lead's log-probs minus contrast x the other's, on the lead's plausible set.
    from dlmom import DLMoMConfig, consensus
    from dlmom.lmeval import DLMoMLM

    big, small = llama(tok, seed=1, layers=4), llama(tok, seed=2)
    lm = DLMoMLM([(small, tok), (big, tok)], config=DLMoMConfig(chat=False, **settings), batch_size=2,
                 progress=False)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    for (context, continuation), (logprob, _) in zip(PAIRS, got):
        ids, n = raw_pair(tok, context, continuation)
        if "gate" in settings:
            want = hf_logprob(big, ids, n)
        else:
            with torch.no_grad():
                logits = torch.stack([m(torch.tensor([ids])).logits[0, len(ids) - n - 1:-1].float()
                                      for m in (small, big)])
            scores = consensus.contrastive(logits, torch.full((n,), 1), None, contrast=0.7, plausibility=0.05)
            want = float(torch.log_softmax(scores, -1).gather(-1, torch.tensor(ids[len(ids) - n:]).view(-1, 1)).sum())
        assert logprob == pytest.approx(want, abs=1e-3)


@needs_lm_eval
def test_is_greedy_when_the_continuation_is_the_argmax(model, tok):
    """Token level (a random model's greedy bytes need not be text): transformers' greedy tokens are greedy."""
    from dlmom.lmeval import DLMoMLM, scoring

    ids = tok.encode("What is 7 * 8?")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = out[0, len(ids):].tolist()
    other = greedy[:-1] + [(greedy[-1] + 1) % len(tok)]
    lm = DLMoMLM([(model, tok)], chat=False, progress=False)
    (lp, is_greedy), (_, not_greedy) = scoring.score(lm.moe, [scoring.Item([ids], greedy), scoring.Item([ids], other)],
                                                      batch_size=2)
    assert is_greedy and not not_greedy
    assert lp == pytest.approx(hf_logprob(model, ids + greedy, len(greedy)), abs=1e-4)


@needs_lm_eval
def test_loglikelihood_rolling_is_the_text_logprob_after_bos(model, tok):
    from dlmom.lmeval import DLMoMLM

    text = "What is 3 * 4? The answer is 12. Then add 7 to get 19."
    lm = DLMoMLM([(model, tok), (model, tok)], chat=False, progress=False)  # one model in two roles: itself
    (got,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    tokens = tok.encode(text, add_special_tokens=False)
    assert got == pytest.approx(hf_logprob(model, [tok.bos_token_id] + tokens, len(tokens)), abs=1e-3)


@needs_lm_eval
def test_loglikelihood_refuses_experts_on_another_tokenizer(model, tok):
    from dlmom.lmeval import DLMoMLM

    words = tokenizer("words", 300)
    lm = DLMoMLM([(model, tok), (llama(words, seed=4), words)], chat=False, progress=False)
    with pytest.raises(ValueError, match="another one .*Text-Bridge serves generation only"):
        lm.loglikelihood(instances("loglikelihood", PAIRS[:1]))


@needs_lm_eval
@pytest.mark.parametrize("gen_kwargs, message", [
    ({"until": ["."], "num_beams": 4}, r"gen_kwargs \['num_beams'\] are not supported"),
    ({"do_sample": True, "temperature": 0.0}, "needs a temperature > 0"),
    ({"until": [""]}, "until must be a non-empty string"),
    ({"max_gen_toks": 0}, "max_gen_toks must be an integer >= 1"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must be a number in"),
])
def test_generate_until_rejects_what_it_cannot_honour(model, tok, gen_kwargs, message):
    from dlmom.lmeval import DLMoMLM

    lm = DLMoMLM([(model, tok)], chat=False, progress=False)
    with pytest.raises(ValueError, match=message):
        lm.generate_until(instances("generate_until", [("What is 3 * 4?", gen_kwargs)]))


@needs_lm_eval
def test_generate_until_samples_only_when_asked(model, tok):
    from dlmom.lmeval import DLMoMLM

    lm = DLMoMLM([(model, tok)], chat=False, controller="explicit", progress=False)
    prompt = "What is 3 * 4?"
    greedy = [("What is 3 * 4?", {"max_gen_toks": 8, "temperature": 5.0})] * 2  # temperature without do_sample
    sampled = [(prompt, {"max_gen_toks": 8, "do_sample": True, "temperature": 5.0})] * 4
    torch.manual_seed(0)
    texts = lm.generate_until(instances("generate_until", greedy + sampled))
    assert texts[0] == texts[1] == lm.moe.generate(prompt, max_new_tokens=8)[0].text
    assert len(set(texts[2:])) > 1  # four draws at temperature 5 from a random model differ


@needs_lm_eval
def test_simple_evaluate_end_to_end(model_folder, task_folder):
    """Both tasks through lm-eval by name ("dlmom" with model_args); the logged responses are transformers' own
    greedy answers (cut at "." within max_gen_toks) and log-probabilities."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmom.lmeval import model as _  # noqa: F401  registers "dlmom"
    from dlmom.results import cut_at_stop

    manager = TaskManager(include_path=task_folder, include_defaults=False)
    out = lm_eval.simple_evaluate(model="dlmom", model_args=f"experts={model_folder},chat=false,controller=explicit,"
                                  f"progress=false", tasks=["dlmom_tiny_gen", "dlmom_tiny_mc"], batch_size=2,
                                  task_manager=manager, log_samples=True)
    hf, tok = AutoModelForCausalLM.from_pretrained(model_folder), AutoTokenizer.from_pretrained(model_folder)
    gen = sorted(out["samples"]["dlmom_tiny_gen"], key=lambda s: s["doc_id"])
    for sample, doc in zip(gen, GEN_DOCS):
        ids = tok.encode(doc["question"])
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert sample["resps"][0][0] == cut_at_stop(tok.decode(new[0, len(ids):], skip_special_tokens=True), ["."])[0]
    mc = sorted(out["samples"]["dlmom_tiny_mc"], key=lambda s: s["doc_id"])
    correct = []
    for sample, doc in zip(mc, MC_DOCS):
        want = [hf_logprob(hf, *raw_pair(tok, doc["question"], " " + c)) for c in doc["choices"]]
        got = [r[0][0] for r in sample["resps"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-5)
        correct.append(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert out["results"]["dlmom_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert "exact_match,none" in out["results"]["dlmom_tiny_gen"]
    assert out["config"]["dlmom_experts"] == [model_folder]


def dlmom(*args, timeout=600):
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "dlmom", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_cli_help_names_lm_evals_options():
    done = dlmom("lm-eval", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--tasks", "--include_path", "--limit", "--output_path", "--batch_size", "--experts", "--top-k",
                   "--controller", "--no-chat"):
        assert option in done.stdout


@needs_lm_eval
def test_cli_prints_lm_evals_table(model_folder, task_folder, tmp_path):
    done = dlmom("lm-eval", "--tasks", "dlmom_tiny_mc", "--include-path", task_folder, "--experts", model_folder,
                 model_folder, "--no-chat", "--limit", "2", "--batch-size", "2", "--output_path", str(tmp_path),
                 "--quiet")
    assert done.returncode == 0, done.stderr
    assert "dlmom_tiny_mc" in done.stdout and "acc" in done.stdout and "|" in done.stdout
    written = list(tmp_path.rglob("results_*.json"))
    assert len(written) == 1 and "dlmom_tiny_mc" in json.loads(written[0].read_text())["results"]


@needs_lm_eval
@pytest.mark.parametrize("args, message", [
    (["--tasks", "x", "--top-k", "0"], "argument --top-k: top_k must be an integer >= 1"),
    (["--tasks", "x", "--sample"], "argument --sample: "),
    (["--tasks", "x", "--experts", "/no/such/model.gguf"], "no such GGUF file"),
])
def test_cli_bad_input_is_one_line(args, message):
    done = dlmom("lm-eval", *args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


@needs_lm_eval
def test_lm_evals_own_cli_reaches_dlmom(model_folder, task_folder):
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "dlmom.lmeval", "--model", "dlmom", "--model_args",
                           f"experts={model_folder}|{model_folder},chat=false,top_k=8,progress=false", "--tasks",
                           "dlmom_tiny_mc", "--include_path", task_folder, "--device", "cpu", "--limit", "2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "dlmom_tiny_mc" in done.stdout and "acc" in done.stdout
