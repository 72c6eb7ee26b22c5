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
Run the same command again to resume an interrupted harvest: the shards already written are verified
(size and checksum) and damaged ones redone; a resume with another model's weights is refused.
Make a tokens file from text with `knowlens capture tokenize`."""

TOKENIZE_EPILOG = """\
texts file: .txt with one text per line (blank lines skipped), or .jsonl with one {"text": "..."} per line.
Each text becomes <bos> text <eos> (the model's BOS/EOS tokens); the texts are concatenated and cut into
rows of --seq-len tokens; the tail that does not fill a row is dropped (and reported). Words outside the
model's vocabulary are counted and warned about.
example: knowlens capture tokenize --texts texts.txt --seq-len 32 --out tokens.safetensors"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture",
        help="record hook activations while generating, or harvest them over a token data set",
        description="Record hook activations at every prompt and generated token, or harvest them over a data "
        "set (make one from text with `capture tokenize`).",
    )
    modes = p.add_subparsers(dest="mode", metavar="MODE")
    g = modes.add_parser(
        "generate",
        help="generate from prompts and record the hooks at every token",
        epilog=GENERATE_EPILOG
        + "\nexample: knowlens capture generate --prompts prompts.txt --hooks blocks.3.hook_resid_post "
        "--max-new-tokens 24 --out record.safetensors",
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
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    h = modes.add_parser(
        "harvest",
        help="forward-only activations over a token data set, to resumable shards",
        epilog=HARVEST_EPILOG
        + "\nexample: knowlens capture harvest --tokens tokens.safetensors --hooks blocks.1.hook_resid_post --out acts/",
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
    h.add_argument("--overwrite", action="store_true", help="delete a harvest already in --out and start again")
    k = modes.add_parser(
        "tokenize",
        help="turn a text file into the token rows `capture harvest` reads",
        description="Tokenize texts with a model's tokenizer into a tokens.safetensors file of equal-length rows.",
        epilog=TOKENIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("--texts", required=True, type=Path, help="texts file (.txt or .jsonl)")
    k.add_argument("--out", required=True, type=Path, help="output tokens file (.safetensors)")
    k.add_argument("--seq-len", type=int, default=32, help="tokens per row (default 32)")
    k.add_argument("--model", default="organism", help="'organism' (default), an organism folder, or a TransformerLens name")
    k.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run, command="capture")
    for name, mode in (("generate", g), ("harvest", h), ("tokenize", k)):
        mode.set_defaults(run=run, command=f"capture {name}")


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
        raise KnowlensError("name a mode: 'knowlens capture generate|harvest|tokenize ...'")
    # every argument is checked before the model loads
    if args.mode == "tokenize":
        return _tokenize(args)
    from knowlens.capture.hooks import check_hook_syntax
    from knowlens.models import check_device, n_layers_hint

    check_device(args.device)
    _check_positive(args, "batch_size", "max_new_tokens", "shard_tokens")
    check_hook_syntax(args.hooks, n_layers=n_layers_hint(args.model))
    if args.mode == "generate":
        from knowlens.outputs import check_output_file

        if args.temperature < 0:
            raise KnowlensError(f"--temperature must be >= 0, got {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise KnowlensError(f"--top-p must be in (0, 1], got {args.top_p}")
        check_output_file(args.out, overwrite=args.overwrite)
        prompts = read_prompts(args.prompts)
        model = _load_model(args.model, args.device)
        return _generate(model, prompts, args)
    from knowlens.outputs import check_output_dir

    check_output_dir(args.out)
    tokens = read_token_rows(args.tokens)
    model = _load_model(args.model, args.device)
    return _harvest(model, tokens, args)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    from knowlens.errors import KnowlensError

    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise KnowlensError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_suffix(path: Path, suffix: str) -> None:
    from knowlens.errors import KnowlensError

    if path.suffix != suffix:
        raise KnowlensError(f"--out {path}: must end in {suffix}")


def _tokenize(args: argparse.Namespace) -> int:
    from knowlens.capture.tokenize import pack_texts
    from knowlens.outputs import atomic_write, check_output_file

    _check_positive(args, "seq_len")
    _check_suffix(args.out, ".safetensors")
    check_output_file(args.out, overwrite=args.overwrite)
    texts = read_texts(args.texts)
    model = _load_model(args.model, "cpu")
    packed = pack_texts(model, texts, seq_len=args.seq_len)
    from safetensors.torch import save_file

    meta = {"format": "knowlens.tokens", "texts": str(len(texts)), "dropped_tokens": str(packed.dropped)}
    atomic_write(args.out, lambda tmp: save_file({"tokens": packed.tokens}, str(tmp), metadata=meta))
    rows, seq = packed.tokens.shape
    print(
        f"wrote {args.out}: {rows} rows x {seq} tokens from {len(texts)} texts"
        + (f"; dropped the last {packed.dropped} tokens (less than a row)" if packed.dropped else ""),
        file=sys.stderr,
    )
    return 0


def read_texts(path: Path) -> list[str]:
    """Texts from a .txt (one per line) or .jsonl ({"text": str} per line) file; KnowlensError if none."""
    from knowlens.errors import KnowlensError

    def parse(n: int, obj: Any) -> str:
        if not (isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"].strip()):
            raise KnowlensError(f'{path}:{n}: expected {{"text": "..."}} with a non-empty text')
        return obj["text"]

    return _read_items(path, "texts", parse)


def _load_model(name: str, device: str) -> Any:
    import knowlens

    model, _card = knowlens.load_model(name, device=device)
    return model


def read_prompts(path: Path) -> list[Any]:
    """Prompts from a .jsonl ({"prompt": str} or {"tokens": [int]} per line) or .txt (one per line) file."""
    from knowlens.errors import KnowlensError

    def parse(n: int, obj: Any) -> Any:
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            if not obj["prompt"].strip():
                raise KnowlensError(f"{path}:{n}: the prompt is empty")
            return obj["prompt"]
        if isinstance(obj, dict) and _is_id_list(obj.get("tokens")):
            return obj["tokens"]
        raise KnowlensError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"tokens": [ids]}}')

    return _read_items(path, "prompts", parse)


def _read_items(path: Path, what: str, parse: Any) -> list[Any]:
    """One item per non-blank line: the line itself (.txt) or ``parse(line_no, json)`` (.jsonl)."""
    from knowlens.errors import KnowlensError

    lines = _read_lines(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise KnowlensError(f"{path}: {what} file must end in .jsonl or .txt")
    items = [parse(n, _json_line(path, n, line)) for n, line in enumerate(lines, 1)] if path.suffix == ".jsonl" else lines
    if not items:
        raise KnowlensError(f"{path} holds no {what}")
    return items


def read_token_rows(path: Path) -> Any:
    """A 2-D token tensor from .safetensors ("tokens") or a list of id lists from .jsonl."""
    from knowlens.errors import KnowlensError

    if path.suffix == ".safetensors":
        if path.is_dir():
            raise KnowlensError(f"{path}: is a folder, not a tokens file")
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
    record.save(args.out)  # temporary name, then renamed: no partial file on failure
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
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {index.rows_done} rows in {len(index.shards)} shards, "
        f"{human_bytes(index.expected_bytes)} of activations",
        file=sys.stderr,
    )
    return 0


def _read_lines(path: Path) -> list[str]:
    from knowlens.inputs import read_text_file

    text = read_text_file(path, what="input file")
    return [line for line in text.splitlines() if line.strip()]


def _json_line(path: Path, n: int, line: str) -> Any:
    from knowlens.errors import KnowlensError

    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise KnowlensError(f"{path}:{n}: not JSON ({err.msg})") from None


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
