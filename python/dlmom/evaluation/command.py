"""``dlmom eval``: methods side by side on the same items (registered by dlmom.cli.build_parser)."""
from __future__ import annotations

import argparse
import json
import math

DESCRIPTION = """\
Answer the items of --data with every method of --methods on the same experts (loaded once), score each
answer, and print per method the accuracy with its Wilson 95% interval, the mean tokens processed and the
mean wall time per item, then every dlmom variant paired against every other method on the same items
(wins, losses, ties, exact McNemar p). One JSON record per item and method goes to --out as it is made;
running the same command again continues from it without redoing what is there."""

EPILOG = """\
tasks and formats (JSONL, one object per line):
  gsm8k      "question", "answer" ending in "#### <number>". Prompt: the question, then an instruction to
             reason step by step and end with "The answer is N". Scored on the final number: inside the
             last \\boxed{}, else after the last ####, else after the last "answer is", else the last
             number; signs, thousands separators and decimals understood, 18 = 18.00.
  humaneval  "task_id", "prompt", "entry_point", "test" (defines check(candidate)). Prompt: asks for the
             whole function in one ```python block, then shows the function prompt. The code is the first
             code block (else the whole reply); a reply that defines the function replaces it, else it
             continues the prompt's body. pass@1: prompt/code + test + check(entry_point) run in a separate
             process (time, memory and file-size limits, no new processes, no network, its own temporary
             directory, a clean environment; see dlmom.evaluation.sandbox).
  jsonl      "prompt" (sent as it is), "answer" (string or number), optional "id". An answer that is a
             number is compared as a number with the reply's final number (as gsm8k); any other answer
             must equal the reply's final answer (after the last "answer is" / "answer:" on its line, else
             the last non-empty line) after normalisation (case, whitespace, surrounding quotes and
             punctuation).

methods: any of dlmom.baselines.METHODS; dlmom:CONTROLLER runs dlmom with that controller (dlmom:latent),
single:I expert I alone. An answer whose call raised is recorded with the message and counts as wrong.

--batch-size: items answered per call of a method. Larger batches use the hardware better (one forward
for many rows) but pad rows to one length, keep every row running until the longest answer ends (more
tokens processed), may change answers slightly (padding), and an error fails the whole batch."""


def add_eval_parser(sub) -> None:
    """The ``eval`` subcommand on ``sub`` (build_parser's subparsers)."""
    from ..cli import add_experts_flags
    from ..engine import DLMoMConfig
    from ..settings import add_flags
    from .formats import TASKS

    p = sub.add_parser("eval", help="compare methods on a data set (accuracy, tokens, time, paired tests)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS, help="the data's format and how answers are scored")
    p.add_argument("--data", required=True, metavar="FILE", help="a JSONL file of items (see below)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="JSONL records, one per item and method, appended as they are made (resumed from)")
    add_experts_flags(p)
    p.add_argument("--methods", default="single,text-mas,dlmom", metavar="LIST",
                   help="comma-separated methods (default single,text-mas,dlmom; see below)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    p.add_argument("--split", metavar="NAME", help='only the items whose "split" field is NAME (data/dev\'s files '
                   'hold dev and test items: develop on --split dev)')
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="per answer (default 256)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="items per call of a method (default 1)")
    p.add_argument("--expert", type=int, metavar="I", help="which expert single runs (default 0)")
    p.add_argument("--seed", type=int, help="seed of every call (sampling and packet noise)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device for all experts (default cpu)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="humaneval: seconds a program may run (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024, metavar="MB",
                   help="humaneval: address space of a program (default 1024)")
    p.add_argument("--retry-errors", action="store_true", help="do again the records of --out that hold an error")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars or library logging on stderr")
    add_flags(p.add_argument_group("mixture settings (DLMoMConfig's fields, one flag each)"), DLMoMConfig)
    p.set_defaults(func=run_eval)


def _checked(args: argparse.Namespace):
    """Everything that can be checked without a model, before one loads: (config, dtype, device, methods,
    items, limits)."""
    from ..cli import _blame, check_experts, dtype_of, expert_count
    from ..engine import DLMoMConfig, check_generate_args
    from ..loading import check_device
    from ..settings import field_names
    from . import records
    from .formats import read_items
    from .methods import parse_methods
    from .sandbox import Limits

    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"argument {option}: must be an integer >= 1, got {value}")
    try:
        check_generate_args(["-"], args.max_new_tokens, args.seed, None)
        config = DLMoMConfig(**{name: getattr(args, name) for name in field_names(DLMoMConfig)})
    except ValueError as err:
        raise ValueError(_blame(err)) from None
    n = expert_count(args)
    if args.expert is not None and not 0 <= args.expert < n:
        raise ValueError(f"argument --expert: an index in [0, {n - 1}], got {args.expert}")
    try:
        methods = parse_methods(args.methods, experts=n)
    except ValueError as err:
        raise ValueError(f"argument --methods: {str(err).removeprefix('methods: ')}") from None
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"argument --timeout: a number of seconds > 0, got {args.timeout}")
    if args.memory_mb < 64:
        raise ValueError(f"argument --memory-mb: an integer >= 64, got {args.memory_mb}")
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    try:
        device = check_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    try:
        items = read_items(args.task, args.data, limit=args.limit, split=args.split)
    except OSError as err:
        raise OSError(f"argument --data: cannot read {args.data}: {err.strerror or err}") from None
    records.read(args.out, settings=None, items={i.id: i.fingerprint() for i in items})
    check_experts(args.experts)
    return config, dtype_of(args.dtype), device, methods, items, limits


def run_eval(args: argparse.Namespace) -> int:
    from ..cli import _library_output, _stderr, _stdout
    from ..engine import DLMoM
    from .harness import evaluate
    from .report import format_table

    config, dtype, device, methods, items, limits = _checked(args)
    with _library_output(args.quiet):
        moe = DLMoM.from_pretrained(args.experts or None, roles=args.roles, config=config, dtype=dtype, device=device,
                                    progress=not args.quiet)
        try:
            ev = evaluate(args.task, items, moe.experts, [m.name for m in methods], out=args.out,
                          max_new_tokens=args.max_new_tokens, config=config, seed=args.seed,
                          batch_size=args.batch_size, expert=args.expert, limits=limits,
                          retry_errors=args.retry_errors, progress=not args.quiet)
        except KeyboardInterrupt:
            _stderr(f"dlmom eval: interrupted (Ctrl-C); the answers so far are in {args.out}: the same command "
                    f"continues from them")
            return 130
    if args.json:
        _stdout(json.dumps(ev.summary, indent=1), raw=True)
        return 0
    _stdout(format_table(ev.summary))
    s = ev.summary
    if s["generation_s"] > 0:
        _stdout(f"\n{len(ev.records)} records in {args.out}; time outside generation {s['overhead_fraction']:.2%} "
                f"of {s['run_s']:.1f} s (loading aside)")
    else:
        _stdout(f"\n{len(ev.records)} records in {args.out}, all there before this run: nothing left to answer")
    return 0
