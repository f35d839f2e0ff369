"""`kvmpy lab [NAME] [--quick] [--json] [--plot DIR]`: run the labs, print their tables, draw their plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import LABS
from .common import LabError
from .report import LabResult, render, to_json

EPILOG = "labs, in tutorial order (docs/tutorial/):\n" + "\n".join(
    f"  {lab.name:<11} {lab.title}" for lab in LABS.values())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `lab` to the `kvmpy` command's subparsers."""
    p = subparsers.add_parser("lab", help="run the CPU-virtualization labs on this host (docs/tutorial/)",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", choices=list(LABS), metavar="NAME",
                   help="one lab (default: all of them): " + ", ".join(LABS))
    p.add_argument("--quick", action="store_true", help="small counts: each lab runs in seconds")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also write each lab's figures as PNGs into DIR")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..kvm import Kvm

    names = [args.name] if args.name else list(LABS)
    # Wide tables: a pipe or a file gets 160 columns instead of rich's 80.
    console = Console(stderr=args.json, width=None if sys.stdout.isatty() else 160)
    results: list[LabResult] = []
    with Kvm() as kvm:
        for name in names:
            lab = LABS[name]
            result = lab.run(kvm, quick=args.quick)
            results.append(result)
            if not args.json:
                render(result, console)
                console.print(f"[dim]chapter: docs/tutorial/{lab.chapter}[/dim]")
            if args.plot is not None:
                try:
                    paths = lab.plot(result, args.plot)
                except OSError as e:
                    raise LabError(f"--plot {args.plot}: {e.strerror or e}") from e
                for path in paths:
                    console.print(f"plot: {path}", highlight=False)
    if args.json:
        json.dump(to_json(results), sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0
