"""`knowlens capture generate|harvest`: record activations while generating, or harvest them over a data set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GENERATE_EPILOG = """\
prompts file: .jsonl with one {"prompt": "..."} (or {"tokens": [ids...]}) object per line, or .txt with
one prompt per line (blank lines are skipped). The record is one safetensors file (tensors + JSON
metadata): load it with knowlens.capture.ActivationRecord.load(path)."""

HARVEST_EPILOG = """\
tokens file: .safetensors holding a 2-D "tokens" tensor, or .jsonl with one list of token ids (or
{"tokens": [...]}) per line; all rows the same length. Output: DIR/index.json + DIR/shard_*.safetensors.
Run the same command again to resume an interrupted harvest."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture",
        help="record hook activations while generating, or harvest them over a token data set",
        description="Record hook activations at every prompt and generated token, or harvest them over a data set.",
    )
    modes = p.add_subparsers(dest="mode", metavar="MODE")
    g = modes.add_parser(
        "generate",
        help="generate from prompts and record the hooks at every token",
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(g)
    g.add_argument("--prompts", required=True, type=Path, help="prompts file (.jsonl or .txt)")
    g.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)"
    )
    g.add_argument("--out", required=True, type=Path, help="output record (.safetensors)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--no-stop-at-eos", action="store_true", help="always generate --max-new-tokens tokens")
    h = modes.add_parser(
        "harvest",
        help="forward-only activations over a token data set, to resumable shards",
        epilog=HARVEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(h)
    h.add_argument("--tokens", required=True, type=Path, help="token rows (.safetensors or .jsonl)")
    h.add_argument("--out", required=True, type=Path, help="output folder")
    h.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    h.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard (default 1048576)")
    h.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="storage dtype (default: the model's)",
    )
    for mode in (p, g, h):
        mode.set_defaults(run=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="organism",
        help="'organism' (default), an organism folder, or a TransformerLens name",
    )
    p.add_argument(
        "--hooks", nargs="+", required=True, metavar="HOOK", help="hook names, e.g. blocks.3.hook_resid_post"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError

    if getattr(args, "mode", None) is None:
        raise KnowlensError("name a mode: 'knowlens capture generate ...' or 'knowlens capture harvest ...'")
    if args.mode == "generate":
        prompts = read_prompts(args.prompts)  # bad input fails before the model loads
        model = _load_model(args.model, args.device)
        return _generate(model, prompts, args)
    tokens = read_token_rows(args.tokens)
    model = _load_model(args.model, args.device)
    return _harvest(model, tokens, args)


def _load_model(name: str, device: str) -> Any:
    import knowlens

    model, _card = knowlens.load_model(name, device=device)
    return model


def read_prompts(path: Path) -> list[Any]:
    """Prompts from a .jsonl ({"prompt": str} or {"tokens": [int]} per line) or .txt (one per line) file."""
    from knowlens.errors import KnowlensError

    lines = _read_lines(path)
    if path.suffix == ".jsonl":
        prompts: list[Any] = []
        for n, line in enumerate(lines, 1):
            obj = _json_line(path, n, line)
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            elif isinstance(obj, dict) and _is_id_list(obj.get("tokens")):
                prompts.append(obj["tokens"])
            else:
                raise KnowlensError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"tokens": [ids]}}')
    elif path.suffix == ".txt":
        prompts = list(lines)
    else:
        raise KnowlensError(f"{path}: prompts file must end in .jsonl or .txt")
    if not prompts:
        raise KnowlensError(f"{path} holds no prompts")
    return prompts


def read_token_rows(path: Path) -> Any:
    """A 2-D token tensor from .safetensors ("tokens") or a list of id lists from .jsonl."""
    from knowlens.errors import KnowlensError

    if path.suffix == ".safetensors":
        if not path.is_file():
            raise KnowlensError(f"{path} does not exist")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise KnowlensError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
        if "tokens" not in tensors:
            raise KnowlensError(f'{path} has no "tokens" tensor (has: {", ".join(tensors) or "nothing"})')
        return tensors["tokens"]
    if path.suffix != ".jsonl":
        raise KnowlensError(f"{path}: tokens file must end in .safetensors or .jsonl")
    rows = []
    for n, line in enumerate(_read_lines(path), 1):
        obj = _json_line(path, n, line)
        row = obj.get("tokens") if isinstance(obj, dict) else obj
        if not _is_id_list(row):
            raise KnowlensError(f'{path}:{n}: expected a list of token ids or {{"tokens": [ids]}}')
        rows.append(row)
    if not rows:
        raise KnowlensError(f"{path} holds no token rows")
    return rows


def _generate(model: Any, prompts: list[Any], args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from knowlens.capture import generate
    from knowlens.capture.record import concat_records
    from knowlens.errors import KnowlensError

    if args.batch_size < 1:
        raise KnowlensError(f"--batch-size must be >= 1, got {args.batch_size}")
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    records = []
    with tqdm(
        total=len(batches) * args.max_new_tokens, unit="step", disable=args.no_progress, desc="generate"
    ) as bar:
        for batch in batches:
            records.append(
                generate(
                    model,
                    batch,
                    hooks=args.hooks,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                    stop_at_eos=not args.no_stop_at_eos,
                    on_step=lambda _state: bar.update(1),
                )
            )
    record = concat_records(records)
    record.save(args.out)
    n_gen = int(record.generated_mask.sum())
    print(
        f"wrote {args.out}: {record.batch_size} prompts, {n_gen} generated tokens, "
        f"{len(record.activations)} hooks",
        file=sys.stderr,
    )
    return 0


def _harvest(model: Any, tokens: Any, args: argparse.Namespace) -> int:
    import torch

    from knowlens.capture import harvest
    from knowlens.capture.harvest_index import human_bytes

    dtype = getattr(torch, args.dtype) if args.dtype else None
    index = harvest(
        model,
        tokens,
        hooks=args.hooks,
        out_dir=args.out,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        dtype=dtype,
        progress=not args.no_progress,
    )
    print(
        f"wrote {args.out}: {index.rows_done} rows in {len(index.shards)} shards, "
        f"{human_bytes(index.expected_bytes)} of activations",
        file=sys.stderr,
    )
    return 0


def _read_lines(path: Path) -> list[str]:
    from knowlens.errors import KnowlensError

    if not path.is_file():
        raise KnowlensError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KnowlensError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return [line for line in text.splitlines() if line.strip()]


def _json_line(path: Path, n: int, line: str) -> Any:
    from knowlens.errors import KnowlensError

    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise KnowlensError(f"{path}:{n}: not JSON ({err.msg})") from None


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
