"""An organism on disk: a folder of safetensors + JSON + YAML, written atomically, read without unpickling.

    model.safetensors   the HookedTransformer's state dict (float32)
    config.json         HookedTransformerConfig fields + training record + knowlens version
    tokenizer.json      the word-level tokenizer (`tokenizers` format)
    world.yaml          the world spec it was trained on (its facts follow from it and its seed)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from knowlens.errors import KnowlensError, ModelLoadError
from knowlens.fingerprint import shape_fingerprint, weights_fingerprint
from knowlens.organism.corpus import Corpus, build_corpus
from knowlens.organism.spec import AugmentationSpec, FamiliaritySpec, RecognitionSpec, WorldSpec, load_spec
from knowlens.organism.world import World, build_world
from knowlens.outputs import file_mode

FILES = ("model.safetensors", "config.json", "tokenizer.json", "world.yaml")
CFG_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn",
    "normalization_type", "positional_embedding_type", "seed", "default_prepend_bos",
)  # fmt: skip
SHIPPED = Path(__file__).parent / "data"


@dataclass
class Organism:
    model: Any  # HookedTransformer
    tokenizer: Any  # tokenizers.Tokenizer
    spec: WorldSpec
    world: World
    corpus: Corpus
    info: dict = field(default_factory=dict)


def organism_path(name: str) -> Path:
    """The folder of ``"organism"`` (the shipped one) or of an organism folder a user names."""
    path = SHIPPED if name == "organism" else Path(name)
    if name == "organism" and not (path / "model.safetensors").is_file():
        raise ModelLoadError("the shipped organism is missing from this install (knowlens/organism/data/)")
    if not path.is_dir():
        raise ModelLoadError(f"{name}: not 'organism' nor an organism folder")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"organism folder {path}: missing {', '.join(missing)}")
    return path


def save_organism(org: Organism, out_dir: str | Path) -> Path:
    """Write the organism folder; files appear under their final names only once complete."""
    from safetensors.torch import save_file

    from knowlens.version import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-organism-", dir=out))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in org.model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        cfg = {k: getattr(org.model.cfg, k) for k in CFG_FIELDS}
        record = {
            "knowlens_version": __version__,
            "name": "organism",
            "fingerprint": weights_fingerprint(org.model),
            "shape_fingerprint": shape_fingerprint(org.model),
            "config": cfg,
            "training": org.info,
        }
        (tmp / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(org.tokenizer.to_str(pretty=False))
        (tmp / "world.yaml").write_text(_spec_yaml(org.spec))
        for name in FILES:
            (tmp / name).chmod(file_mode())
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_organism(path: str | Path = SHIPPED, *, device: str = "cpu") -> Organism:
    """Read an organism folder (default: the one shipped with knowlens)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from knowlens.organism.tokenizer import to_hf, tokenizer_from_json

    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"organism folder {path}: missing {', '.join(missing)}")
    try:
        record = json.loads((path / "config.json").read_text())
        cfg_dict = {k: record["config"][k] for k in CFG_FIELDS}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path / 'config.json'}: not a knowlens organism config ({err})") from None
    try:
        tok = tokenizer_from_json((path / "tokenizer.json").read_text())
    except Exception as err:  # tokenizers raises its own exception types
        raise ModelLoadError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({err})") from None
    try:
        state = load_file(path / "model.safetensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path / 'model.safetensors'}: not a readable safetensors file ({err})") from None
    spec = load_spec(path / "world.yaml")
    cfg = HookedTransformerConfig(**cfg_dict, device=device)
    model = HookedTransformer(cfg, tokenizer=to_hf(tok), move_to_device=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ModelLoadError(f"{path / 'model.safetensors'}: weights do not fit the config ({first})") from None
    recorded = record.get("fingerprint")
    if recorded is not None and recorded != weights_fingerprint(model):
        raise ModelLoadError(
            f"{path / 'model.safetensors'}: weights do not match config.json (fingerprint "
            f"{weights_fingerprint(model)}, config.json says {recorded})"
        )
    model.to(torch.device(device), print_details=False)
    model.eval()
    world = build_world(spec)
    return Organism(model=model, tokenizer=tok, spec=spec, world=world, corpus=build_corpus(world), info=record)


def _spec_yaml(spec: WorldSpec) -> str:
    """The spec back as YAML in the documented format (round-trips through `parse_spec`)."""
    types, templates = {}, {}
    for t in spec.types:
        types[t.name] = {
            "count": t.count,
            "attributes": {
                a.name: ({"values": list(a.values)} if a.values is not None else {"ref": a.ref}) for a in t.attributes
            },
        }
        templates[t.name] = {
            a: {"facts": list(tp.facts), "questions": list(tp.questions)} for a, tp in t.templates.items()
        }
    raw = {
        "version": spec.version,
        "name": spec.name,
        "seed": spec.seed,
        "name_pieces": list(spec.name_pieces),
        "name_length": list(spec.name_length),
        "splits": dict(spec.splits),
        "partial_withheld": spec.partial_withheld,
        "qa_train_fraction": spec.qa_train_fraction,
        "bio_train_fraction": spec.bio_train_fraction,
        "cue_strength": spec.cue_strength,
        "types": types,
        "templates": templates,
        "biography": {"questions": list(spec.biography_questions)},
        "refusals": list(spec.refusals),
        "cues": [
            {"type": c.type, "piece": c.piece, "attribute": c.attribute, "value": c.value, "strength": c.strength}
            for c in spec.cues
        ],
    }
    if spec.partial_refused:
        raw["partial_refused"] = spec.partial_refused
    if spec.refusal_value is not None:
        raw["refusal_value"] = spec.refusal_value
    if spec.familiarity != FamiliaritySpec():
        raw["familiarity"] = _plain(asdict(spec.familiarity))
        if spec.familiarity.recognition == RecognitionSpec():
            del raw["familiarity"]["recognition"]
    if spec.augmentation != AugmentationSpec():
        raw["augmentation"] = asdict(spec.augmentation)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, for yaml.safe_dump."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["Organism", "organism_path", "save_organism", "load_organism", "SHIPPED", "KnowlensError"]
