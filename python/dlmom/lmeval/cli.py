"""`dlmom lm-eval`: lm-evaluation-harness tasks on a mixture, with lm-eval's option names and results table."""
from __future__ import annotations

import argparse
import importlib.util
import logging


def add_parser(sub) -> None:
    """Register `dlmom lm-eval` on the subparsers of `dlmom`'s parser."""
    from ..engine import DLMoMConfig
    from ..settings import add_flags

    p = sub.add_parser(
        "lm-eval", help="evaluate a mixture on lm-evaluation-harness tasks",
        description="Run lm-evaluation-harness tasks on a mixture of experts (model 'dlmom') and print lm-eval's "
                    "results table. generate_until tasks run the mixture's generation; loglikelihood (multiple "
                    "choice) and rolling (perplexity) tasks score under the consensus distribution (log-softmax of "
                    "the consensus's logits: TIES, or contrastive with --consensus contrastive, gated by --gate; "
                    "temperature 1), which needs every expert on one tokenizer. Options "
                    "take lm-eval's names (--include_path; --include-path works too).",
        epilog="Needs the eval extra: pip install 'dlmom[eval]'. The same model from Python: "
               "lm_eval.simple_evaluate(model=dlmom.lmeval.DLMoMLM([...]), tasks=[...]); from lm-eval's own "
               "command line: python -m dlmom.lmeval --model dlmom --model_args 'experts=A|B,top_k=8' --tasks T.")
    p.add_argument("--tasks", "-t", nargs="+", required=True, metavar="TASK",
                   help="task or group names (comma- or space-separated; lm-eval's glob patterns work)")
    p.add_argument("--include_path", "--include-path", metavar="DIR",
                   help="a folder of task YAML files of your own, added to lm-eval's tasks")
    p.add_argument("--num_fewshot", "--num-fewshot", "-f", type=int, metavar="N",
                   help="examples in the few-shot context (default: the task's)")
    p.add_argument("--limit", "-L", type=float, metavar="N",
                   help="at most N examples per task (a fraction of the task when below 1); for testing only")
    p.add_argument("--batch_size", "--batch-size", "-b", type=int, default=1, metavar="N",
                   help="requests per engine call or scoring forward (default 1)")
    p.add_argument("--gen_kwargs", "--gen-kwargs", metavar="K=V,...",
                   help="override the tasks' generation_kwargs, e.g. do_sample=true,temperature=0.7 (dlmom takes "
                        "until, max_gen_toks, do_sample, temperature, top_p)")
    p.add_argument("--output_path", "--output-path", "-o", metavar="PATH",
                   help="write lm-eval's results JSON under this folder (a path ending in .json names the file; "
                        "lm-eval adds the date)")
    p.add_argument("--log_samples", "--log-samples", "-s", action="store_true",
                   help="with --output_path, also write every request and response")
    p.add_argument("--seed", type=int, metavar="N",
                   help="seed of python, numpy, torch and the few-shot sampler (default: lm-eval's 0 and 1234)")
    p.add_argument("--experts", nargs="+", metavar="MODEL",
                   help="hub ids, local model folders or .gguf files; the first sets the shared vocabulary "
                        "(default: SmolLM2-135M-Instruct in three roles)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device for all experts (default cpu)")
    add_flags(p.add_argument_group("mixture settings (DLMoMConfig's fields, one flag each)"), DLMoMConfig)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, and no logging or warnings of the libraries on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import cli

    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("dlmom lm-eval needs the lm-evaluation-harness: pip install 'dlmom[eval]'")
    model_args = _model_args(args)
    if args.output_path is None and args.log_samples:
        raise ValueError("argument --log_samples: needs --output_path (where the samples are written)")
    with cli._library_output(args.quiet):
        if args.quiet:
            logging.getLogger("lm_eval").setLevel(logging.ERROR)
        results, tracker = _evaluate(args, model_args)
    from lm_eval.utils import make_table

    if tracker is not None:
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
    experts = ", ".join(results["config"].get("dlmom_experts", []))
    cli._stdout(f"dlmom (experts: {experts}), gen_kwargs: ({args.gen_kwargs or ''}), limit: {args.limit}, "
                f"num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")
    cli._stdout(make_table(results), raw=True)
    if results.get("groups"):
        cli._stdout(make_table(results, "groups"), raw=True)
    return 0


def _model_args(args: argparse.Namespace) -> dict:
    """DLMoMLM's arguments, each checked before the task index or a model loads (both take a while)."""
    from ..cli import _blame
    from ..engine import DLMoMConfig
    from ..loading import check_device, locate
    from ..settings import field_names
    from .model import check_sampling

    fields = {name: getattr(args, name) for name in field_names(DLMoMConfig)}
    try:
        check_sampling(DLMoMConfig(**fields))
    except ValueError as err:
        raise ValueError(_blame(err)) from None
    if args.batch_size < 1:
        raise ValueError(f"argument --batch_size: must be an integer >= 1, got {args.batch_size}")
    try:
        check_device(args.device)
    except ValueError as err:
        raise ValueError(f"argument --device: {err}") from None
    for spec in args.experts or ():
        locate(spec)
    return {"experts": args.experts, "dtype": args.dtype, "device": args.device, "progress": not args.quiet,
            **fields}


def _tasks(manager, names: list[str]) -> list[str]:
    """The task names (comma-separated ones split, glob patterns expanded); ValueError naming the unknown ones."""
    names = [n for name in names for n in name.split(",") if n]
    missing = [n for n in names if not manager.match_tasks([n])]
    if missing:
        raise ValueError(f"argument --tasks: no such task: {', '.join(missing)} (lm-eval knows "
                         f"{len(manager.all_tasks)} tasks, groups and tags; add a folder of your own task YAML files "
                         f"with --include_path; `lm-eval ls tasks` lists them)")
    return list(dict.fromkeys(t for n in names for t in manager.match_tasks([n])))


def _evaluate(args: argparse.Namespace, model_args: dict):
    """(lm-eval's results dict, its EvaluationTracker or None) of the run."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from . import model  # noqa: F401  registers "dlmom"

    manager = TaskManager(include_path=args.include_path)
    tasks = _tasks(manager, args.tasks)
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    seeds = {} if args.seed is None else {f"{kind}_seed": args.seed for kind in
                                          ("random", "numpy_random", "torch_random", "fewshot_random")}
    results = simple_evaluate(model="dlmom", model_args=model_args, tasks=tasks, num_fewshot=args.num_fewshot,
                              batch_size=args.batch_size, limit=limit, log_samples=args.log_samples,
                              evaluation_tracker=tracker, gen_kwargs=args.gen_kwargs, task_manager=manager, **seeds)
    return results, tracker
