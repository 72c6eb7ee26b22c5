"""`knowlens organism` (being written)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("organism", help="(being written)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError

    raise KnowlensError("'organism' is not implemented yet")
