"""The ``ramnet`` command line. Each task adds its own subcommand here."""

from __future__ import annotations

import argparse
import sys

import torch

from . import __version__
from .cli_support import Parser, configure_logging
from .lm.cli import add_lm_commands
from .mqar.cli import add_mqar_commands
from .ops.ram import PATHS
from .ops.triton_support import HAS_TRITON, triton_runs_on
from .provenance import device_name, environment
from .trace.cli import add_trace_command


def cmd_info(args: argparse.Namespace) -> int:
    env = environment("cpu")
    print(f"ramnet {env['ramnet']}" + (f" (git {env['git_rev']})" if env["git_rev"] else ""))
    print(f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        print(f"device {device}: {device_name(device)}")
    # Only the paths that can run here: the triton path needs Triton, and CUDA or its interpreter.
    runnable = [p for p in PATHS if p != "triton" or any(triton_runs_on(d) for d in devices)]
    print(f"ram_attention paths: {', '.join(runnable)}")
    if not HAS_TRITON:
        print("triton not installed: the triton path is unavailable (pip install 'ramnet[triton]')")
    elif "triton" in runnable:
        where = "CUDA" if torch.cuda.is_available() else "CPU, interpreted (TRITON_INTERPRET=1)"
        print(f"triton {env['triton']}: kernels run on {where}")
    else:
        print(f"triton {env['triton']}: no CUDA here, so the triton path is unavailable "
              "(TRITON_INTERPRET=1 runs its kernels on the CPU, slowly)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ramnet", description="RAM-Net: Random Access Memory Network")
    parser.add_argument("--version", action="version", version=f"ramnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the version, devices and available execution paths")
    info.set_defaults(func=cmd_info)

    add_mqar_commands(sub)
    add_lm_commands(sub)
    add_trace_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbosity", 0))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
