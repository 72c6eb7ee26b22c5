"""`knowlens` entry point: one verb per job; bad input ends with one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# verb -> module under knowlens.cli with `add_parser(subparsers)` and `run(args) -> int`
VERBS = {
    "demo": "demo_cmd",
    "organism": "organism_cmd",
    "capture": "capture_cmd",
    "features": "features_cmd",
    "ablate": "ablate_cmd",
    "steer": "steer_cmd",
    "patch": "patch_cmd",
    "probe": "probe_cmd",
    "label": "label_cmd",
    "eval": "eval_cmd",
}

DESCRIPTION = """\
knowlens reads a language model's internal confidence signals while it generates and turns them into
per-token reliability labels. The built-in model organism (a small TransformerLens model trained on a
synthetic world whose every fact is known) is the default model: start with `knowlens demo`."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowlens", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for module in VERBS.values():
        importlib.import_module(f"knowlens.cli.{module}").add_parser(sub)
    return parser


def _version() -> str:
    from knowlens.version import __version__

    return f"knowlens {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help(sys.stderr)
        print("knowlens: error: name a verb (see above)", file=sys.stderr)
        return 2
    import warnings

    from knowlens.errors import KnowlensError, KnowlensWarning

    prefix = f"knowlens {getattr(args, 'command', None) or args.verb}"

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        if issubclass(category, KnowlensWarning):
            print(f"{prefix}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    default_show = warnings.showwarning
    warnings.showwarning = show
    try:
        return int(args.run(args) or 0)
    except KnowlensError as err:
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = default_show


if __name__ == "__main__":
    sys.exit(main())
