"""Train SAEs with sae-lens's own training runner, offline, on an in-memory token data set.

* `train_sae(model, docs, hook, *, pad_id, ...) -> TrainingSAE`: one SAE at one hook of a TransformerLens model,
  trained by ``LanguageModelSAETrainingRunner`` (``override_model`` = the model, ``override_dataset`` = a
  ``datasets.Dataset`` of token rows built in memory; no wandb, no checkpoints, nothing written).
* `train_organism_saes(org, hooks, *, out_dir, ...) -> {hook: metrics}`: the organism's SAEs (default: resid_post
  of every layer), each saved in sae-lens's folder format (``save_inference_model``: ``cfg.json`` +
  ``sae_weights.safetensors``) to ``out_dir/<hook>/`` with a ``metrics.json`` beside it (`sae_metrics` on the
  organism's held-out questions), the folder put in place with ``os.replace`` once complete.

Rows are one document each, ``<bos> ... <eos>`` right-padded to the context size: the organism was trained on one
document per row starting at position 0, so packing several documents into a row would show the SAE activations the
model never produces. Padding and ``<eos>`` positions are excluded from training (sae-lens's
``exclude_special_tokens``); ``<bos>`` positions are kept, since every splice replaces them too.

Determinism: sae-lens seeds nothing itself; `train_sae` seeds torch's global generator with ``config.seed`` inside
``torch.random.fork_rng`` (the SAE's initialisation and the activation buffer's shuffles draw from it) and shuffles
the rows with ``random.Random(seed)``. On the CPU the same model, rows, config, thread count and torch build give
the same weights bit for bit (tested); across thread counts or on a GPU only up to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowlens.errors import KnowlensError
from knowlens.outputs import file_mode

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE

    from knowlens.organism.store import Organism

TARGET_LOSS_RECOVERED = 0.90  # issue 8: loss recovered >= 0.90 at L0 <= 32
TARGET_MAX_L0 = 32
METRICS_FILENAME = "metrics.json"


@dataclass(frozen=True)
class SaeTrainConfig:
    """How one SAE is trained. ``steps * batch_tokens`` activations are drawn (``training_tokens``).

    ``architecture`` is any sae-lens training architecture (``topk``, ``batchtopk``, ``standard``, ``jumprelu``,
    ``gated`` ...); ``k`` applies to those that have one. ``d_sae`` defaults to ``expansion * d_in``.
    ``context_size`` defaults to the longest row (at most the model's ``n_ctx``). Inputs are scaled to an expected
    norm of ``sqrt(d_in)`` during training (sae-lens's ``expected_average_only_in``), folded into the weights at the
    end, so ``lr`` does not depend on the model's activation scale. The learning rate warms up over the first 5% of
    steps and decays linearly to 0 over the last 20%.
    """

    architecture: str = "topk"
    expansion: int = 8
    d_sae: int | None = None
    k: int = 16
    steps: int = 3000
    batch_tokens: int = 1024
    lr: float = 4e-4
    seed: int = 0
    context_size: int | None = None
    store_batch_rows: int = 32  # rows per model forward pass when filling the activation buffer
    buffer_batches: int = 8  # the activation buffer holds this many training batches (shuffled, half kept)

    def __post_init__(self) -> None:
        for name in ("expansion", "k", "steps", "batch_tokens", "store_batch_rows", "buffer_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise KnowlensError(f"SAE training: {name} must be an integer >= 1, got {value!r}")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae < 1):
            raise KnowlensError(f"SAE training: d_sae must be an integer >= 1, got {self.d_sae!r}")
        if self.context_size is not None and (not isinstance(self.context_size, int) or self.context_size < 2):
            raise KnowlensError(f"SAE training: context_size must be an integer >= 2, got {self.context_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise KnowlensError(f"SAE training: lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.architecture, str) or not self.architecture:
            raise KnowlensError(f"SAE training: architecture must be a sae-lens architecture name, got {self.architecture!r}")

    @property
    def training_tokens(self) -> int:
        return self.steps * self.batch_tokens

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in


def resid_post_hooks(n_layers: int) -> tuple[str, ...]:
    """The default hooks: ``blocks.{l}.hook_resid_post`` of every layer."""
    return tuple(f"blocks.{layer}.hook_resid_post" for layer in range(n_layers))


def train_sae(
    model: Any,
    docs: Sequence[Sequence[int]],
    hook: str,
    *,
    pad_id: int,
    exclude_ids: Sequence[int] = (),
    config: SaeTrainConfig = SaeTrainConfig(),
    progress: bool = True,
    dataset_label: str = "",
) -> TrainingSAE[Any]:
    """Train one SAE on ``model``'s activations at ``hook`` over the token documents ``docs`` (each a list of token
    ids, already with the model's BOS/EOS) with sae-lens's ``LanguageModelSAETrainingRunner``; return it (trained,
    normalisation folded in; ``save_inference_model(folder)`` writes sae-lens's folder format).

    Each document becomes one row right-padded with ``pad_id`` (longer ones are cut at the context size); positions
    holding ``pad_id`` or any of ``exclude_ids`` are left out of training. Nothing is written to disk and no hook
    is left on the model.
    """
    import datasets
    import sae_lens
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from sae_lens.training._interruption import InterruptedException

    from knowlens.capture.hooks import validate_hook_names

    validate_hook_names(model, [hook])
    if config.architecture not in SAE_TRAINING_CLASS_REGISTRY:
        known = ", ".join(sorted(SAE_TRAINING_CLASS_REGISTRY))
        raise KnowlensError(
            f"SAE architecture {config.architecture!r} is unknown to sae-lens {sae_lens.__version__} (it trains {known})"
        )
    docs = [list(d) for d in docs if len(d) >= 2]
    if not docs:
        raise KnowlensError("no documents of 2 or more tokens to train an SAE on")
    n_ctx = int(model.cfg.n_ctx)
    context = config.context_size or min(max(len(d) for d in docs), n_ctx)
    if context > n_ctx:
        raise KnowlensError(f"SAE training: context_size {context} exceeds the model's n_ctx {n_ctx}")
    rows = [d[:context] + [pad_id] * (context - len(d[:context])) for d in docs]
    random.Random(config.seed).shuffle(rows)
    device = str(next(iter(model.parameters())).device)
    d_in = _hook_width(model, hook)

    _, cfg_cls = SAE_TRAINING_CLASS_REGISTRY[config.architecture]
    sae_kwargs: dict[str, Any] = dict(
        d_in=d_in,
        d_sae=config.width(d_in),
        dtype="float32",
        device=device,
        normalize_activations="expected_average_only_in",
    )
    if "k" in {f.name for f in dataclasses.fields(cfg_cls)}:
        sae_kwargs["k"] = config.k
    # the buffer (in tokens) is n_batches_in_buffer * context_size; sae-lens needs it >= one training batch
    buffer_rows = math.ceil(config.buffer_batches * config.batch_tokens / context)
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=cfg_cls(**sae_kwargs),
        model_name=str(getattr(model.cfg, "model_name", "model")),
        hook_name=hook,
        dataset_path=dataset_label,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context,
        prepend_bos=True,
        model_from_pretrained_kwargs={},  # the model is handed over, not loaded by sae-lens
        exclude_special_tokens=sorted({int(pad_id), *map(int, exclude_ids)}),
        training_tokens=config.training_tokens,
        train_batch_size_tokens=config.batch_tokens,
        store_batch_size_prompts=config.store_batch_rows,
        n_batches_in_buffer=buffer_rows,
        n_batches_for_norm_estimate=20,
        lr=config.lr,
        lr_warm_up_steps=config.steps // 20,
        lr_decay_steps=config.steps // 5,
        seed=config.seed,
        device=device,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )
    dataset = datasets.Dataset.from_dict({"tokens": rows})
    with _quiet_sae_lens(), _sae_lens_bars(f"SAE {hook}", progress), _signal_handlers_kept():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
            try:
                sae = runner.run()
            except InterruptedException:
                raise KeyboardInterrupt from None
    return sae.eval()


def train_organism_saes(
    org: Organism,
    hooks: Sequence[str] | None = None,
    *,
    out_dir: str | os.PathLike[str],
    config: SaeTrainConfig = SaeTrainConfig(),
    progress: bool = True,
    drawn_epochs: int = 8,
) -> dict[str, dict[str, Any]]:
    """Train the organism's SAEs (default: resid_post of every layer) and save each to ``out_dir/<hook>/`` in
    sae-lens's folder format with a ``metrics.json``; return ``{hook: metrics}`` (what each ``metrics.json`` holds).

    Training rows: the organism's corpus documents plus the documents drawn for its first ``drawn_epochs`` epochs
    (``epoch_documents``; none for a world without augmentation), tokenized as the organism was trained
    (``<bos> ... <eos>``). Evaluation (`sae_metrics`, zero ablation) runs on rows the SAE never saw: every held-out
    question of the world (``corpus.held_out``, never in the organism's training either) followed by its true
    answer (the attribute's first fact template, or the biography). A hook folder already in ``out_dir`` is
    replaced.
    """
    import sae_lens
    import torch

    from knowlens.capture.hooks import validate_hook_names
    from knowlens.fingerprint import weights_fingerprint
    from knowlens.organism.corpus import epoch_documents
    from knowlens.saes.evaluate import sae_metrics
    from knowlens.saes.load import load_sae
    from knowlens.version import __version__

    model = org.model
    hooks = validate_hook_names(model, hooks if hooks else resid_post_hooks(model.cfg.n_layers))
    docs = [_encode(org.tokenizer, d) for d in org.corpus.documents]
    for epoch in range(drawn_epochs):
        docs += [_encode(org.tokenizer, d) for d in epoch_documents(org.world, epoch)[0]]
    eval_tokens, eval_mask = _pad(org.tokenizer, [_encode(org.tokenizer, t) for t in held_out_texts(org)])
    pad_id, eos_id = _special(org.tokenizer, "<pad>"), _special(org.tokenizer, "<eos>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = weights_fingerprint(model)
    results: dict[str, dict[str, Any]] = {}
    for hook in hooks:
        started = time.time()  # wall clock, as organism training records it
        sae = train_sae(model, docs, hook, pad_id=pad_id, exclude_ids=(eos_id,), config=config, progress=progress,
                        dataset_label="knowlens organism corpus (in memory)")
        seconds = time.time() - started
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-sae-{hook}-", dir=out))
        try:
            sae.save_inference_model(tmp)
            saved = load_sae(tmp, model)  # what ships is what is measured
            metrics = sae_metrics(model, saved, eval_tokens, mask=eval_mask, ablation="zero")
            # the target is stated against zero ablation (as sae-lens's evals do); mean ablation for comparison
            mean_ablated = sae_metrics(model, saved, eval_tokens, mask=eval_mask, ablation="mean")
            record = {
                "hook": hook,
                "sae": {"architecture": config.architecture, "d_in": int(saved.cfg.d_in), "d_sae": int(saved.cfg.d_sae),
                        "k": config.k if "k" in saved.cfg.to_dict() else None},
                "training": {**dataclasses.asdict(config), "training_tokens": config.training_tokens,
                             "documents": len(docs), "drawn_epochs": drawn_epochs, "seconds": round(seconds, 1),
                             "threads": torch.get_num_threads()},
                "eval": {**metrics.to_dict(), "rows": int(eval_tokens.shape[0]),
                         "data": "held-out questions of the world + their true answers (never trained)",
                         "mean_ablation": {k: mean_ablated.to_dict()[k] for k in ("ce_ablated", "loss_recovered")}},
                "target": {"loss_recovered_min": TARGET_LOSS_RECOVERED, "l0_max": TARGET_MAX_L0,
                           "met": metrics.meets(min_loss_recovered=TARGET_LOSS_RECOVERED, max_l0=TARGET_MAX_L0)},
                "model_fingerprint": fingerprint,
                "knowlens_version": __version__,
                "sae_lens_version": sae_lens.__version__,
            }  # fmt: skip
            (tmp / METRICS_FILENAME).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            _put_in_place(tmp, out / hook)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results[hook] = record
    return results


def held_out_texts(org: Organism) -> list[str]:
    """Each held-out question of the organism's world as a Q/A turn with its true answer."""
    from knowlens.organism.corpus import answer_for, biography_for

    by_name = org.world.by_name
    texts = []
    for item in org.corpus.held_out:
        entity = by_name[item.entity]
        answer = (
            biography_for(org.world, entity)
            if item.attribute is None
            else answer_for(org.world, entity, item.attribute)
        )
        texts.append(f"{item.prompt} {answer}")
    return texts


# ------------------------------------------------------------------------------------------------ helpers


def _encode(tok: Any, text: str) -> list[int]:
    """As the organism is trained: ``<bos>`` + the text's ids + ``<eos>``."""
    return [_special(tok, "<bos>"), *tok.encode(text, add_special_tokens=False).ids, _special(tok, "<eos>")]


def _special(tok: Any, token: str) -> int:
    idx = tok.token_to_id(token)
    if idx is None:
        raise KnowlensError(f"the organism's tokenizer has no {token} token")
    return int(idx)


def _pad(tok: Any, docs: list[list[int]]) -> tuple[Any, Any]:
    """Right-padded rows and the mask of positions whose next token is a document's (every position but the
    last of each document)."""
    import torch

    width = max(len(d) for d in docs)
    tokens = torch.full((len(docs), width), _special(tok, "<pad>"), dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.bool)
    for i, d in enumerate(docs):
        tokens[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d) - 1] = True
    return tokens, mask


def _hook_width(model: Any, hook: str) -> int:
    """The per-position width at ``hook`` (head dimensions flattened, as sae-lens's activation store does)."""
    from knowlens.saes.load import _activation_shapes

    shape = _activation_shapes(model, [hook]).get(hook)
    if shape is None:
        raise KnowlensError(f"hook {hook!r} does not fire in a forward pass of the model")
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed
    only once the new one is in place (restored if the rename fails)."""
    mode = file_mode()
    for f in tmp.iterdir():
        f.chmod(mode)  # safetensors writes 0600
    tmp.chmod(mode | (mode & 0o444) >> 2)  # mkdtemp makes 0700; give the folder the mode mkdir would
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside / final.name, final)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _sae_lens_bars(desc: str, enabled: bool) -> Iterator[None]:
    """sae-lens's trainer always shows its own tqdm bar (no option turns it off) and so does its norm estimate:
    prefix the trainer's with the hook and count tokens, or disable both, by wrapping the ``tqdm`` their modules
    use until the block ends."""
    from sae_lens.training import activation_scaler, sae_trainer

    trainer_tqdm, scaler_tqdm = sae_trainer.tqdm, activation_scaler.tqdm

    def trainer_bar(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(desc=desc, disable=not enabled, unit="tok", unit_scale=True)
        bar = trainer_tqdm(*args, **kwargs)
        plain = bar.set_description
        bar.set_description = lambda text=None, refresh=True: plain(f"{desc} {text or ''}".rstrip(), refresh)
        return bar

    def scaler_bar(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(disable=not enabled, leave=False)
        return scaler_tqdm(*args, **kwargs)

    sae_trainer.tqdm = trainer_bar
    activation_scaler.tqdm = scaler_bar
    try:
        yield
    finally:
        sae_trainer.tqdm = trainer_tqdm
        activation_scaler.tqdm = scaler_tqdm


@contextmanager
def _quiet_sae_lens() -> Iterator[None]:
    """sae-lens warns that an override data set / model is not reproducible from its config alone and that a small
    data set is reused over epochs: both are what this module means to do; and it re-wraps tensor rows with
    ``torch.tensor``."""
    log = logging.getLogger("sae_lens")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The training dataset contains fewer samples")
            warnings.filterwarnings(
                "ignore", message=r"All samples in the training dataset have been exhausted"
            )
            warnings.filterwarnings(
                "ignore", message=r"To copy construct from a tensor"
            )  # sae-lens re-wraps rows
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """sae-lens's runner installs its own SIGINT/SIGTERM handlers and never restores them: restore ours."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
