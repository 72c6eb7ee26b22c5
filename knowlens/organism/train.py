"""Train the organism: a small `HookedTransformer` on a world's corpus, on the CPU, deterministic for a seed."""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from knowlens.organism.corpus import build_corpus, epoch_documents, vocabulary_texts
from knowlens.organism.spec import WorldSpec
from knowlens.organism.store import Organism, save_organism
from knowlens.organism.tokenizer import BOS, EOS, PAD, build_tokenizer
from knowlens.organism.world import build_world


@dataclass(frozen=True)
class TrainConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 96
    epochs: int = 450  # the recipe that trained the shipped organism (organism v2)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    threads: int | None = None  # torch intra-op threads; None keeps torch's default


def train_organism(
    spec: WorldSpec,
    out_dir: str | Path | None = None,
    *,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    device: str = "cpu",
) -> Organism:
    """Build the world, corpus and tokenizer of `spec`, train a model on them and (if `out_dir`) save it.

    Same spec, config, device and thread count: same weights, bit for bit. The shipped organism is trained
    on the CPU; another ``device`` (e.g. ``"cuda"``) trains the same recipe faster, to other weights.
    """
    import os

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if device.startswith("cuda"):  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    world = build_world(spec)
    corpus = build_corpus(world)
    tok = build_tokenizer(vocabulary_texts(world, corpus))
    vocab = tok.get_vocab()

    def encode(texts: list[str], subjects: list[str]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        docs = [[vocab[BOS], *tok.encode(d, add_special_tokens=False).ids, vocab[EOS]] for d in texts]
        # The first mention of a document's entity cannot be predicted; no loss there, so that the model learns
        # names by reading and copying them rather than as memorised piece sequences that fight copying.
        unscored = [_first_mention(d, tok.encode(s, add_special_tokens=False).ids) for d, s in zip(docs, subjects)]
        longest = max(len(d) for d in docs)
        if longest > config.n_ctx:
            raise ValueError(f"a training document has {longest} tokens, more than n_ctx={config.n_ctx}")
        return docs, unscored

    static_docs, static_unscored = encode(list(corpus.documents), list(corpus.subjects))
    drawn = [epoch_documents(world, e) for e in range(config.epochs)]
    per_epoch = [encode(*d) if d[0] else ([], []) for d in drawn]

    torch.manual_seed(spec.seed)
    cfg = HookedTransformerConfig(
        n_layers=config.n_layers,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=config.d_model // config.n_heads,
        d_mlp=config.d_mlp,
        n_ctx=config.n_ctx,
        d_vocab=tok.get_vocab_size(),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=spec.seed,
        default_prepend_bos=True,
        device=device,
    )
    model = HookedTransformer(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    order = random.Random(spec.seed + 2)
    total = sum(math.ceil((len(static_docs) + len(extra)) / config.batch_size) for extra, _ in per_epoch)
    pad = vocab[PAD]
    losses: list[float] = []
    started = time.time()  # wall clock: the VM's monotonic clock was once seen to jump 4x during a run
    model.train()
    with torch.random.fork_rng(devices=[]), _deterministic():  # nothing random is drawn on the device
        bar = tqdm(total=total, desc="training organism", unit="step", disable=not progress)
        step = 0
        for epoch in range(config.epochs):
            docs = static_docs + per_epoch[epoch][0]
            unscored = static_unscored + per_epoch[epoch][1]
            for batch in _batches(docs, config.batch_size, order):
                tokens = torch.full((len(batch), max(len(docs[j]) for j in batch)), pad, dtype=torch.long)
                targets = tokens.clone()
                for i, j in enumerate(batch):
                    tokens[i, : len(docs[j])] = torch.tensor(docs[j])
                    targets[i, : len(docs[j])] = tokens[i, : len(docs[j])]
                    first, last = unscored[j]
                    targets[i, first:last] = pad
                for group in opt.param_groups:
                    group["lr"] = _lr(step, total, config)
                tokens, targets = tokens.to(device), targets.to(device)
                logits = model(tokens[:, :-1], return_type="logits")
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=pad
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                losses.append(loss.item())
                if step % 50 == 0 or step == total:
                    bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
                bar.update(1)
        bar.close()
    model.eval()
    info = {
        "train_config": asdict(config),
        "steps": total,
        "documents": len(static_docs),
        "documents_per_epoch_drawn": len(per_epoch[0][0]) if per_epoch else 0,
        "tokens_per_epoch": sum(len(d) for d in static_docs) + (sum(len(d) for d in per_epoch[0][0]) if per_epoch else 0),
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "train_seconds": round(time.time() - started, 1),
        "threads": torch.get_num_threads(),
        **({"device": device} if device != "cpu" else {}),
    }
    organism = Organism(model=model, tokenizer=tok, spec=spec, world=world, corpus=corpus, info=info)
    if out_dir is not None:
        save_organism(organism, out_dir)
    return organism


def _batches(docs: list[list[int]], size: int, rng: random.Random) -> list[list[int]]:
    """Indices of documents of similar length batched together (little padding), in a fresh random order."""
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    idx.sort(key=lambda i: len(docs[i]))
    batches = [idx[k : k + size] for k in range(0, len(idx), size)]
    rng.shuffle(batches)
    return batches


def _first_mention(doc: list[int], name: list[int]) -> tuple[int, int]:
    """[start, stop) of the first occurrence of `name` in `doc`, or an empty span."""
    for i in range(len(doc) - len(name) + 1):
        if doc[i : i + len(name)] == name:
            return i, i + len(name)
    return 0, 0


def _lr(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class _deterministic:
    def __enter__(self) -> None:
        self._prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self._prev)
