"""The `dlmom` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from . import backend_info

    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"dlmom {info['version']}  (DLMOM_BACKEND={info['backend']})")
    print(f"  C++ CPU kernels:   {'built' if info['cpu_kernels'] else 'NOT built'}")
    archs = ", ".join(info["cuda_architectures"]) or "-"
    print(f"  CUDA kernels:      {'built for ' + archs if info['cuda_kernels_compiled'] else 'not built'}")
    print(f"  CUDA GPU present:  {'yes' if info['cuda_available'] else 'no'}")
    for op, impl in info["ops"].items():
        print(f"  {op:<12} cpu: {impl['cpu']:<12} cuda: {impl['cuda']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlmom", description="Deep-Latent Mixture of Models: several LMs reasoning together in latent space.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = sub.add_parser("info", help="show what was built and which kernel each op uses on CPU and CUDA",
                          description="Show the build (C++ / CUDA kernels, CUDA architectures) and which "
                                      "implementation each op will use on CPU and on CUDA tensors.")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, ImportError, OSError) as err:
        print(f"dlmom: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
