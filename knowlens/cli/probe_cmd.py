"""`knowlens probe export|show`: fit a probe on labelled tokens of an activation record and write its files; print a
probe file's card."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

EXPORT_EPILOG = """\
inputs:
  --record   an activation record from `knowlens capture generate` (it must hold --hook, and have been made with
             --model: the record's weight fingerprint is checked)
  --labels   .jsonl, one labelled token per line:
               {"row": 0, "token": 7, "label": 1, "group": "Mor Tav"}
             row: the record's row (prompt) index; token: index into that row's real tokens, prompt first (BOS
             included), as ActivationRecord.sequence(row); or "generated": j instead of "token", the row's j-th
             generated token; label: true/false or 0/1 (a logistic probe) or any number (a ridge probe); group
             (optional, default the row): rows of one group are never split between training and test folds, so
             give the entity (or the prompt) the token is about.
position rule:
  token         the labelled token's own activation at --hook
  before_token  the activation at the position before it (the one that predicted the token)
input rule: the activation itself; with --sae, all the SAE's latents; with --sae and --feature-set, the
FeatureSet's latents (the SAE it was located on).
fitting: out-of-fold scores from --folds folds grouped by "group" (L2 chosen by a grouped inner CV inside each
training fold), the final probe fitted on every row, the calibrator fitted on the out-of-fold logits; the card
holds the out-of-fold AUROC with a bootstrap interval over groups, and ECE / Brier / log-loss before and after
calibration (cross-fitted). Files: OUT (.safetensors: weight, bias, mean, std, float64) and OUT with .json (the
card); load with knowlens.probes.load_probe(OUT, model=...), or with plain safetensors + numpy (README).
example: knowlens probe export --model organism --record record.safetensors --labels labels.jsonl
           --hook blocks.3.hook_resid_post --out probes/halluc.safetensors"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="fit a linear probe on labelled tokens and export it; show a probe file",
                       description="Linear probes on a model's activations: safetensors + a JSON card (model "
                       "fingerprint, hook, position and input rules, standardisation, calibration, provenance, "
                       "cross-validated metrics), checked against the model on load.")  # fmt: skip
    verbs = p.add_subparsers(dest="probe_verb", metavar="{export,show}", required=True)
    p.set_defaults(command="probe")
    e = verbs.add_parser(
        "export", help="fit a probe on labelled tokens of an activation record and write the probe file",
        description="Fit a cross-validated, calibrated linear probe (logistic for 0/1 labels, ridge for numbers) "
        "on the activations of labelled tokens of a `capture generate` record, and write it with its card.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    e.add_argument("--model", default="organism", help="'organism' (default), an organism folder, or a "
                   "TransformerLens name: the model the record was made with")  # fmt: skip
    e.add_argument("--record", required=True, type=Path, help="activation record (.safetensors)")
    e.add_argument("--labels", required=True, type=Path, help="labelled tokens (.jsonl)")
    e.add_argument("--hook", required=True, help="hook the probe reads, e.g. blocks.3.hook_resid_post")
    e.add_argument("--out", required=True, type=Path, help="probe file to write (.safetensors; the card beside it)")
    e.add_argument("--position", choices=["token", "before_token"], default="token", help="position rule (default token)")
    e.add_argument("--sae", default=None, help="read the SAE's latents: 'release:sae_id', an SAE folder or organism:<hook>")
    e.add_argument("--feature-set", type=Path, default=None, help="read only this FeatureSet's latents (needs --sae)")
    e.add_argument("--kind", choices=["auto", "logistic", "ridge"], default="auto",
                   help="auto (default): logistic for 0/1 labels, ridge otherwise")
    e.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="logistic: weight classes by n / (2 n_class) ('balanced'), or not (default)")
    e.add_argument("--calibration", choices=["platt", "temperature", "none"], default=None,
                   help="logistic: fitted on out-of-fold logits (default platt); ridge: none")
    e.add_argument("--folds", type=int, default=5, help="outer grouped folds (default 5; fewer if the groups allow fewer)")
    e.add_argument("--inner-folds", type=int, default=3, help="inner grouped folds choosing L2 (default 3)")
    e.add_argument("--seed", type=int, default=0, help="seed for the folds and the bootstrap (default 0)")
    e.add_argument("--name", default=None, help="the probe's name in its card (default: the file name)")
    e.add_argument("--target", default="", help="what class 1 (or the number) is, for the card, e.g. 'hallucinated'")
    e.add_argument("--label-source", default=None, help="where the labels came from, for the card (default: the file)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.add_argument("--overwrite", action="store_true", help="replace --out (and its card) if they exist")
    e.set_defaults(run=run_export, command="probe export")
    s = verbs.add_parser("show", help="print a probe file's card",
                         description="Print a probe's card after checking its files (format, SHA-256, tensors): "
                         "model fingerprint, hook, position and input rules, calibration, training and metrics.",
                         epilog="example: knowlens probe show probes/halluc.safetensors --json")  # fmt: skip
    s.add_argument("file", type=Path, help="probe file (.safetensors, or its .json card)")
    s.add_argument("--json", action="store_true", help="print the card as JSON")
    s.set_defaults(run=run_show, command="probe show")


# ------------------------------------------------------------------------------------------------ export


def run_export(args: argparse.Namespace) -> int:
    from knowlens.errors import KnowlensError
    from knowlens.models import check_device
    from knowlens.outputs import check_output_file

    for flag, value, low in (("--folds", args.folds, 2), ("--inner-folds", args.inner_folds, 2)):
        if value < low:
            raise KnowlensError(f"{flag} must be >= {low}, got {value}")
    check_device(args.device)
    if args.out.suffix != ".safetensors":
        raise KnowlensError(f"--out {args.out}: must end in .safetensors (the card is written beside it as .json)")
    check_output_file(args.out, overwrite=args.overwrite)
    check_output_file(args.out.with_suffix(".json"), overwrite=args.overwrite)
    if args.feature_set is not None and args.sae is None:
        raise KnowlensError("--feature-set needs --sae: the SAE the FeatureSet was located on")
    if args.kind == "ridge" and args.calibration not in (None, "none"):
        raise KnowlensError(f"--calibration {args.calibration} is for logistic probes; a ridge probe takes none")
    sae_label = None
    if args.sae is not None:
        from knowlens.saes import parse_sae_spec

        sae_label = parse_sae_spec(args.sae).label
    labels = read_labels(args.labels)
    from knowlens.capture import ActivationRecord

    record = ActivationRecord.load(args.record)
    acts, y, groups = token_rows(record, labels, hook=args.hook, position=args.position, where=str(args.labels))

    from knowlens.fingerprint import check_same_model, model_identity

    model = _load_model(args.model, args.device)
    identity = model_identity(model, args.model)
    if record.model.get("fingerprint"):
        check_same_model(record.model, identity, what=f"activation record {args.record}", error=KnowlensError)
    sae = feature_set = None
    if args.sae is not None:
        from knowlens.saes import FeatureSet, load_sae

        sae = load_sae(args.sae, model, device=args.device)
        sae_hook = sae.cfg.metadata.hook_name
        if sae_hook != args.hook:
            raise KnowlensError(f"--sae {args.sae} reads {sae_hook}, not --hook {args.hook}")
        if args.feature_set is not None:
            feature_set = FeatureSet.load(args.feature_set, model=model)

    from knowlens.probes import fit_probe, probe_features, save_probe

    X, rule = probe_features(acts.to(args.device), sae=sae, feature_set=feature_set, sae_label=sae_label)
    fit = fit_probe(X, y, groups, kind=args.kind, class_weight=None if args.class_weight == "none" else "balanced",
                    calibration=args.calibration, k=args.folds, inner_k=args.inner_folds, seed=args.seed)  # fmt: skip
    source = args.label_source or f"labels file {args.labels.name} on record {args.record.name}"
    save_probe(args.out, fit, model=_with_shape(identity, model), hook=args.hook, position=args.position,
               input_rule=rule, label_source=source, target=args.target, name=args.name)  # fmt: skip
    print(f"wrote {args.out} and {args.out.with_suffix('.json').name}: {fit.kind} probe on {args.hook} @ "
          f"{args.position}, {rule.describe()}", file=sys.stderr)  # fmt: skip
    for line in summary_lines(fit.metrics, fit.training, fit.calibration.to_dict()):
        print(line)
    return 0


def _load_model(name: str, device: str) -> Any:
    import knowlens

    model, _card = knowlens.load_model(name, device=device)
    return model


def _with_shape(identity: dict[str, Any], model: Any) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    return identity | {k: v for k in ("d_model", "n_layers", "d_vocab") if isinstance(v := getattr(cfg, k, None), int)}


def read_labels(path: Path) -> list[dict[str, Any]]:
    """Labelled tokens from a .jsonl file (see the epilog); KnowlensError naming the line for anything else."""
    from knowlens.cli.capture_cmd import _json_line, _read_lines
    from knowlens.errors import KnowlensError

    if path.suffix != ".jsonl":
        raise KnowlensError(f"--labels {path}: must be a .jsonl file")
    out = []
    for n, line in enumerate(_read_lines(path), 1):
        obj = _json_line(path, n, line)
        where = f"{path}:{n}"
        if not isinstance(obj, dict):
            raise KnowlensError(f'{where}: expected {{"row": ..., "token": ..., "label": ...}}')
        if ("token" in obj) == ("generated" in obj):
            raise KnowlensError(f'{where}: give exactly one of "token" and "generated"')
        at = "token" if "token" in obj else "generated"
        for key in ("row", at):
            if not _is_index(obj.get(key)):
                raise KnowlensError(f"{where}: {key!r} must be an integer >= 0, got {obj.get(key)!r}")
        label = obj.get("label")
        if isinstance(label, bool):
            label = int(label)
        if not isinstance(label, (int, float)) or not math.isfinite(label):
            raise KnowlensError(f"{where}: 'label' must be true/false or a finite number, got {label!r}")
        group = obj.get("group", f"row {obj['row']}")
        if not isinstance(group, (str, int)) or isinstance(group, bool):
            raise KnowlensError(f"{where}: 'group' must be a string or an integer, got {group!r}")
        out.append({"line": n, "row": obj["row"], "at": at, "index": obj[at], "label": label, "group": str(group)})
    if not out:
        raise KnowlensError(f"--labels {path}: holds no labelled tokens")
    return out


def token_rows(record: Any, labels: list[dict[str, Any]], *, hook: str, position: str, where: str) -> tuple[Any, Any, list[str]]:
    """(activations (n, d_in), labels (n,), groups) of the labelled tokens at ``hook`` under the position rule."""
    import torch

    from knowlens.capture.hooks import is_query_key_hook
    from knowlens.errors import KnowlensError

    if hook not in record.activations:
        raise KnowlensError(f"--record holds no activations for {hook}; it has {', '.join(record.activations) or 'none'}")
    if is_query_key_hook(hook):
        raise KnowlensError(f"--hook {hook}: an attention pattern (query x key) is not a per-token activation")
    acts = record.activations[hook]
    rows, cols = [], []
    for lab in labels:
        at = f"{where}:{lab['line']}"
        r = lab["row"]
        if r >= record.batch_size:
            raise KnowlensError(f"{at}: row {r} is outside the record's {record.batch_size} rows")
        start, stop = record.real_range(r)
        if lab["at"] == "token":
            col = start + lab["index"]
            if col >= stop:
                raise KnowlensError(f"{at}: token {lab['index']} is outside row {r}'s {stop - start} tokens")
        else:
            gen = record.generated_mask[r].nonzero().flatten()
            if lab["index"] >= len(gen):
                raise KnowlensError(f"{at}: generated token {lab['index']} is outside row {r}'s {len(gen)} generated tokens")
            col = int(gen[lab["index"]])
        if position == "before_token":
            if col == start:
                raise KnowlensError(f"{at}: the row's first token has no position before it (--position before_token)")
            col -= 1
        rows.append(r)
        cols.append(col)
    X = acts[torch.tensor(rows), torch.tensor(cols)].reshape(len(rows), -1)
    y = torch.tensor([lab["label"] for lab in labels], dtype=torch.float64)
    return X, y, [lab["group"] for lab in labels]


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# -------------------------------------------------------------------------------------------------- show


def run_show(args: argparse.Namespace) -> int:
    from knowlens.probes import load_probe

    path = args.file.with_suffix(".safetensors") if args.file.suffix == ".json" else args.file
    probe = load_probe(path)
    card = probe.card
    if args.json:
        json.dump(card, sys.stdout, indent=2)
        print()
        return 0
    m = card["model"]
    shape = ", ".join(f"{k} {m[k]}" for k in ("d_model", "n_layers", "d_vocab") if k in m)
    print(f"probe {probe.name!r} ({probe.kind}) {probe.path}")
    print(f"  model        {m.get('name') or '?'}: fingerprint {m.get('fingerprint')} (shape {m.get('shape_fingerprint')}"
          + (f"; {shape})" if shape else ")"))  # fmt: skip
    print(f"  hook         {probe.hook} @ position {probe.position}")
    print(f"  input        {probe.input.describe()}")
    if card.get("target") or card.get("label_source"):
        print(f"  target       {card.get('target') or '?'} (labels: {card.get('label_source') or '?'})")
    cal = card["calibration"]
    params = ", ".join(f"{k} {_num(v)}" for k, v in cal.items() if k != "kind")
    threshold = card.get("threshold")
    print(f"  calibration  {cal['kind']}" + (f" ({params})" if params else "")
          + (f"; threshold {threshold}" if threshold is not None else ""))  # fmt: skip
    for line in summary_lines(card.get("metrics", {}), card.get("training", {}), None):
        print("  " + line)
    print(f"  knowlens     {card.get('knowlens_version')} (format {card.get('format')} v{card.get('format_version')})")
    return 0


def summary_lines(metrics: dict[str, Any], training: dict[str, Any], calibration: dict[str, Any] | None) -> list[str]:
    """The training and metrics lines `export` and `show` print."""
    t = training
    counts = (f"{t['n_positive']} class 1 / {t['n_negative']} class 0" if "n_positive" in t
              else f"target mean {_num(t.get('target_mean'))}, sd {_num(t.get('target_std'))}")  # fmt: skip
    lines = [f"training     {t.get('n_examples')} examples ({counts}), {t.get('n_groups')} groups, {t.get('folds')} "
             f"folds, seed {t.get('seed')}, L2 per fold {t.get('l2_per_fold')}"
             + (f", class weight {t['class_weight']}" if t.get("class_weight") else "")]  # fmt: skip
    if "oof_auroc" in metrics:
        ci = metrics.get("oof_auroc_ci95")
        lines.append(f"metrics      out-of-fold AUROC {_num(metrics['oof_auroc'])}"
                     + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else ""))  # fmt: skip
    if "calibrated" in metrics:
        u, c = metrics["uncalibrated"], metrics["calibrated"]
        lines.append("             " + ", ".join(f"{k} {_num(u[k])} -> {_num(c[k])}" for k in ("ece", "brier", "log_loss"))
                     + " (uncalibrated -> calibrated, cross-fitted)")  # fmt: skip
    if "oof_r2" in metrics:
        lines.append(f"metrics      out-of-fold R^2 {_num(metrics['oof_r2'])}, Pearson r {_num(metrics['oof_pearson'])}, "
                     f"MSE {_num(metrics['oof_mse'])}")  # fmt: skip
    if calibration is not None:
        lines.append("calibration  " + ", ".join(f"{k} {_num(v)}" if k != "kind" else str(v) for k, v in calibration.items()))
    return lines


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
