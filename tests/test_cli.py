"""`dlmom run` and `dlmom info` as a user meets them: exit codes, stdout vs stderr, one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from tiny_models import llama, tokenizer


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random model saved as a local folder, as a user's own checkpoint would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = tokenizer("bytes", 300)
    llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def dlmom(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dlmom", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))


def test_run_json_prints_only_json(model_folder):
    done = dlmom("run", "What is 12 * 7?", "Add 3 to 5.", "--experts", model_folder, model_folder,
                 "--max-new-tokens", "6", "--seed", "1", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 2
    assert {"text", "trace", "route", "usage"} <= set(results[0])
    assert 1 <= len(results[0]["trace"]) <= 6


def test_run_kv_kivi_reports_cache_bytes(model_folder):
    done = dlmom("run", "What is 12 * 7?", "--experts", model_folder, "--max-new-tokens", "4", "--kv", "kivi",
                 "--json")
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)[0]["usage"]
    assert usage["kv"] == "kivi" and usage["experts"][0]["cache_bytes"] > 0


def test_run_prints_the_answer_on_stdout(model_folder):
    done = dlmom("run", "What is 12 * 7?", "--experts", model_folder, "--max-new-tokens", "4",
                 "--controller", "explicit")
    assert done.returncode == 0, done.stderr
    assert "steps" in done.stderr and "steps" not in done.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
    (["run", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["run", "hi", "--top-k", "many"], "argument --top-k: invalid int value"),
    (["run", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "hi", "--controller", "auto"], "invalid choice"),
    (["run", "hi", "--kv", "zip"], "invalid choice"),
    (["run", "hi", "--experts", "/no/such/model.gguf"], "no such GGUF file"),
    (["run", "hi", "--experts", "./no/such/folder"], "no such file or folder"),
    (["fly"], "invalid choice"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, model_folder):
    if args[:2] == ["run", "hi"] and "--experts" not in args:
        args = args + ["--experts", model_folder]
    done = dlmom(*args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""


def test_help_explains_every_option():
    done = dlmom("run", "--help")
    assert done.returncode == 0
    for option in ("--experts", "--max-new-tokens", "--controller", "--top-k", "--seed", "--json"):
        assert option in done.stdout


def test_info_json():
    done = dlmom("info", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["cpu_kernels"] is True
