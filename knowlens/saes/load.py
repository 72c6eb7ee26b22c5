"""`load_sae(spec, model) -> SAE`: any SAE sae-lens can read, checked against the model it will read from.

Spec syntax (`parse_sae_spec`):

* ``"release:sae_id"`` or ``("release", "sae_id")``: a sae-lens pretrained release and an SAE id in it, e.g.
  ``"gpt2-small-res-jb:blocks.8.hook_resid_pre"``. Split at the first ``:`` (no release name or SAE id in
  sae-lens's registry contains one; ids do contain dots and slashes). ``"release/sae_id"`` is accepted too when
  no such folder exists and the part before the first ``/`` is a release name. A release containing ``/`` that
  is not in the registry is passed on as a Hugging Face repo id, as sae-lens itself allows.
* a folder (``str`` or ``os.PathLike``) in sae-lens's format: ``cfg.json`` + ``sae_weights.safetensors``, what
  ``sae.save_model(folder)`` writes. An existing folder always wins over the other readings.
* ``"organism:<hook>"``: the organism's own SAE for that hook, ``knowlens/organism/data/saes/<hook>/``.

Loading goes through sae-lens's own loaders (``SAE.from_pretrained``, ``SAE.load_from_disk``), so every
architecture the installed sae-lens registers loads (standard, topk, jumprelu, gated, transcoders ...). A folder
is read as JSON + safetensors only: nothing is unpickled.

A release needs the Hugging Face Hub. With ``HF_HUB_OFFLINE`` set, or the hub unreachable within
``probe_timeout`` seconds, huggingface_hub's offline mode is switched on for the duration of the call (process
wide, restored afterwards), so an SAE in the local cache still loads and anything else fails at once instead of
retrying for ~25 s.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import knowlens.organism
from knowlens.errors import HookNameError, KnowlensError
from knowlens.models.devices import check_device
from knowlens.models.load import HUB_HOST, hub_reachable

if TYPE_CHECKING:
    from sae_lens import SAE

ORGANISM_SAES = Path(knowlens.organism.__file__).parent / "data" / "saes"
CFG_FILENAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
_RELEASE_LIKE = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


@dataclass(frozen=True)
class SaeSpec:
    """Where an SAE comes from: a sae-lens release + id, a folder, or the organism's SAE for a hook."""

    kind: Literal["release", "folder", "organism"]
    release: str | None = None
    sae_id: str | None = None
    path: Path | None = None
    hook: str | None = None

    @property
    def label(self) -> str:
        """The canonical spelling: ``release:sae_id``, the folder, or ``organism:<hook>``."""
        if self.kind == "release":
            return f"{self.release}:{self.sae_id}"
        if self.kind == "organism":
            return f"organism:{self.hook}"
        return str(self.path)


def parse_sae_spec(spec: str | os.PathLike[str] | tuple[str, str] | SaeSpec) -> SaeSpec:
    """Read a spec (see the module docstring); a KnowlensError says what is wrong with a malformed one."""
    if isinstance(spec, SaeSpec):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(isinstance(s, str) and s for s in spec):
            raise KnowlensError(
                f"SAE spec {spec!r}: a tuple must be (release, sae_id), two non-empty strings"
            )
        return SaeSpec("release", release=spec[0], sae_id=spec[1])
    if isinstance(spec, os.PathLike):
        return SaeSpec("folder", path=Path(spec))
    if not isinstance(spec, str) or not spec:
        raise KnowlensError(
            f"SAE spec {spec!r}: expected 'release:sae_id', (release, sae_id), a folder or 'organism:<hook>'"
        )
    if spec.startswith("organism:"):
        hook = spec[len("organism:") :]
        if not hook or "/" in hook or "\\" in hook or hook.startswith("."):
            raise KnowlensError(
                f"SAE spec {spec!r}: expected 'organism:<hook>', e.g. organism:blocks.2.hook_resid_post"
            )
        return SaeSpec("organism", hook=hook, path=ORGANISM_SAES / hook)
    if Path(spec).exists():
        return SaeSpec("folder", path=Path(spec))
    if ":" in spec:
        release, sae_id = spec.split(":", 1)
        if not release or not sae_id:
            raise KnowlensError(f"SAE spec {spec!r}: expected 'release:sae_id' with both parts non-empty")
        return SaeSpec("release", release=release, sae_id=sae_id)
    head, _, rest = spec.partition("/")
    if rest and _RELEASE_LIKE.match(head) and head in _known_releases():
        return SaeSpec("release", release=head, sae_id=rest)
    return SaeSpec("folder", path=Path(spec))


def load_sae(
    spec: str | os.PathLike[str] | tuple[str, str] | SaeSpec,
    model: Any,
    *,
    device: str | None = None,
    probe_timeout: float = 3.0,
) -> SAE[Any]:
    """Load the SAE ``spec`` names, check it against ``model`` and return it on ``device`` (default: the model's
    device) in eval mode.

    ``model`` is a TransformerLens ``HookedTransformer``. The SAE's hook (``cfg.metadata.hook_name``) must be a
    hook point of the model that fires in a forward pass, and ``cfg.d_in`` must equal that hook's per-position
    width (``d_model`` for the residual stream, ``n_heads * d_head`` for a ``hook_z`` SAE, ``d_head`` for one
    head); a transcoder's output hook and ``d_out`` are checked the same way. Any problem raises a KnowlensError
    with one line naming both sides.
    """
    parsed = parse_sae_spec(spec)
    target = check_device(str(device) if device is not None else _model_device(model))
    if parsed.kind == "release":
        assert parsed.release is not None and parsed.sae_id is not None
        sae = _load_release(parsed.release, parsed.sae_id, device=target, probe_timeout=probe_timeout)
    elif parsed.kind == "organism":
        assert parsed.path is not None and parsed.hook is not None
        _check_organism_folder(parsed.path, parsed.hook)
        sae = _load_folder(parsed.path, device=target)
    else:
        assert parsed.path is not None
        sae = _load_folder(parsed.path, device=target)
    check_sae(sae, model, label=parsed.label)
    if parsed.path is not None:
        check_trained_on(parsed.path, model, label=parsed.label)
    return sae.eval()


def check_trained_on(folder: str | os.PathLike[str], model: Any, *, label: str = "") -> None:
    """Refuse an SAE folder whose ``metrics.json`` (written by `train_organism_saes`) names another model's weights
    fingerprint than ``model``'s; a folder without one (any other sae-lens folder) passes."""
    from knowlens.fingerprint import weights_fingerprint

    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return
    name = f"SAE {label}" if label else f"SAE {folder}"
    try:
        trained_on = json.loads(path.read_text(encoding="utf-8")).get("model_fingerprint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise KnowlensError(f"{name}: {path} is not a JSON object (truncated or corrupt?)") from None
    if trained_on is None:
        return
    mine = weights_fingerprint(model)
    if trained_on != mine:
        raise KnowlensError(f"{name} was trained on the model with weights fingerprint {trained_on}; this model's is "
                            f"{mine} ({getattr(model.cfg, 'model_name', '?')})")  # fmt: skip


def check_sae(sae: SAE[Any], model: Any, *, label: str = "") -> None:
    """Refuse (KnowlensError, one line naming both sides) an SAE whose hook or width does not fit ``model``.

    The widths come from one forward pass of the model on a 2-token input with capturing hooks added only
    inside ``model.hooks(...)``, so the model is left without hooks whatever happens.
    """
    from knowlens.capture.hooks import validate_hook_names  # importing knowlens.capture loads torch

    name = f"SAE {label}" if label else "SAE"
    meta = sae.cfg.metadata
    model_name = getattr(model.cfg, "model_name", "?")
    checks: list[tuple[str, str, int, Any]] = []
    hook_in = meta.get("hook_name")
    if not isinstance(hook_in, str) or not hook_in:
        raise KnowlensError(
            f"{name} does not say which hook it reads (its cfg.json has no metadata.hook_name)"
        )
    checks.append(("d_in", hook_in, int(sae.cfg.d_in), meta.get("hook_head_index")))
    hook_out, d_out = meta.get("hook_name_out"), getattr(sae.cfg, "d_out", None)
    if isinstance(hook_out, str) and hook_out and isinstance(d_out, int):
        checks.append(("d_out", hook_out, d_out, meta.get("hook_head_index_out")))

    hooks = [hook for _, hook, _, _ in checks]
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, list(model.hook_dict), n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise HookNameError(f"{name} reads hook {hook!r}, which model {model_name!r} does not have{hint}")
    try:
        validate_hook_names(model, hooks)
    except HookNameError as err:
        raise HookNameError(f"{name}: {err} (model {model_name!r})") from None

    shapes = _activation_shapes(model, hooks)
    reshape = getattr(sae.cfg, "reshape_activations", "none")
    for field, hook, width_sae, head_index in checks:
        if hook not in shapes:
            raise KnowlensError(
                f"{name} reads hook {hook!r}, which does not fire in a forward pass of model {model_name!r}"
            )
        shape = shapes[hook][2:]  # drop (batch, pos)
        width, how = _hook_width(shape, reshape=reshape if field == "d_in" else "none", head_index=head_index)
        if width != width_sae:
            raise KnowlensError(
                f"{name}: {field} {width_sae} does not match {hook} width {width}{how} of model {model_name!r}"
            )


def _hook_width(shape: tuple[int, ...], *, reshape: str, head_index: Any) -> tuple[int, str]:
    """The width an SAE sees at a hook whose per-position activation has ``shape``, and how it was read."""
    if len(shape) >= 2 and reshape == "hook_z":
        width = 1
        for n in shape:
            width *= n
        return width, f" ({' x '.join(map(str, shape))} flattened)"
    if len(shape) >= 2 and head_index is not None:
        return shape[-1], f" (head {head_index} of {shape[0]})"
    return (shape[-1] if shape else 1), ""


def _activation_shapes(model: Any, hooks: list[str]) -> dict[str, tuple[int, ...]]:
    """The activation shape at each hook, from one no-grad forward on 2 tokens (stopped after the last hook)."""
    import torch

    from knowlens.capture.hooks import stop_layer_for

    shapes: dict[str, tuple[int, ...]] = {}

    def record(act: torch.Tensor, hook: Any) -> None:
        shapes.setdefault(hook.name, tuple(act.shape))

    tokens = torch.zeros((1, 2), dtype=torch.long, device=_model_device(model))
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, record) for h in hooks]):
        model(tokens, return_type=None, stop_at_layer=stop_layer_for(model, hooks))
    return shapes


def _model_device(model: Any) -> str:
    param = next(iter(model.parameters()), None)
    return str(param.device) if param is not None else str(getattr(model.cfg, "device", "cpu"))


# --------------------------------------------------------------------------------------------- folders


def _check_organism_folder(path: Path, hook: str) -> None:
    if path.is_dir():
        return
    shipped = sorted(p.name for p in ORGANISM_SAES.iterdir() if p.is_dir()) if ORGANISM_SAES.is_dir() else []
    if not shipped:
        raise KnowlensError(
            f"organism:{hook}: the organism's SAEs are not shipped yet ({ORGANISM_SAES} is missing); "
            "train them with `knowlens organism train-saes`"
        )
    raise KnowlensError(
        f"organism:{hook}: no organism SAE for that hook; shipped: {', '.join(shipped)} "
        "(train others with `knowlens organism train-saes`)"
    )


def _load_folder(path: Path, *, device: str) -> SAE[Any]:
    """Check the folder's two files, then hand it to ``SAE.load_from_disk``; errors name the file at fault."""
    if not path.exists():
        raise KnowlensError(
            f"{path}: no such SAE folder (expected a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME}, "
            "'release:sae_id' or 'organism:<hook>')"
        )
    if not path.is_dir():
        raise KnowlensError(
            f"{path}: a file, not an SAE folder (sae-lens writes {CFG_FILENAME} + {WEIGHTS_FILENAME})"
        )
    cfg_path, weights = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for f in (cfg_path, weights):
        if not f.is_file():
            raise KnowlensError(f"{f}: missing, so {path} is not an SAE folder in sae-lens's format")
    cfg = _read_cfg(cfg_path)

    import sae_lens
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY
    from safetensors import SafetensorError, safe_open

    arch = cfg.get("architecture")
    if arch is not None and arch not in SAE_CLASS_REGISTRY:
        known = ", ".join(sorted(SAE_CLASS_REGISTRY))
        raise KnowlensError(
            f"{cfg_path}: architecture {arch!r} is unknown to sae-lens {sae_lens.__version__} (it reads {known})"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only: catches truncation and garbage
            f.keys()
    except (SafetensorError, OSError) as err:
        raise KnowlensError(f"{weights}: not a readable safetensors file ({_one_line(err)})") from None
    try:
        return SAE.load_from_disk(path, device=device)
    except SafetensorError as err:
        raise KnowlensError(f"{weights}: not a readable safetensors file ({_one_line(err)})") from None
    except RuntimeError as err:  # load_state_dict: tensors missing, unexpected or of the wrong shape
        raise KnowlensError(f"{weights}: its tensors do not fit {cfg_path} ({_one_line(err)})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise KnowlensError(
            f"{cfg_path}: not a config sae-lens {sae_lens.__version__} can read ({type(err).__name__}: {_one_line(err)})"
        ) from None


def _read_cfg(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KnowlensError(
            f"{cfg_path}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise KnowlensError(f"{cfg_path}: unreadable ({_one_line(err)})") from None
    if not isinstance(cfg, dict):
        raise KnowlensError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


# -------------------------------------------------------------------------------------------- releases


def _known_releases() -> dict[str, Any]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()  # cached by sae-lens after the first call (~1.5 s)


def _load_release(release: str, sae_id: str, *, device: str, probe_timeout: float) -> SAE[Any]:
    label = f"{release}:{sae_id}"
    directory = _known_releases()
    if release not in directory:
        if "/" not in release:
            close = difflib.get_close_matches(release, list(directory), n=3, cutoff=0.5)
            known = (
                f"closest: {', '.join(close)}"
                if close
                else f"known releases include {', '.join(list(directory)[:3])}"
            )
            raise KnowlensError(
                f"SAE {label}: unknown sae-lens release {release!r} and no folder {label!r} exists; {known}"
            )
        where = f"{release}/{sae_id}"  # a Hugging Face repo id and folder, which sae-lens reads with its own loader
    else:
        ids = list(directory[release].saes_map)
        if sae_id not in ids:
            close = difflib.get_close_matches(sae_id, ids, n=3, cutoff=0.5) or ids[:3]
            raise KnowlensError(
                f"SAE {label}: release {release!r} has no SAE {sae_id!r}; e.g. {', '.join(close)}"
            )
        where = f"{directory[release].repo_id}/{directory[release].saes_map[sae_id]}"

    from sae_lens import SAE

    with _offline_unless_reachable(probe_timeout) as offline_why:
        try:
            return SAE.from_pretrained(release, sae_id, device=device)
        except OSError as err:
            if offline_why is not None:
                raise KnowlensError(
                    f"could not load SAE {label} ({where}): {offline_why} and it is not in the local Hugging Face cache"
                ) from None
            raise KnowlensError(f"could not load SAE {label} ({where}): {_one_line(err)}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise KnowlensError(
                f"could not load SAE {label} ({where}): {type(err).__name__}: {_one_line(err)}"
            ) from None


@contextmanager
def _offline_unless_reachable(timeout: float) -> Iterator[str | None]:
    """Yield None when the hub may be used; otherwise why not, with huggingface_hub's offline mode switched on
    (read at call time as ``constants.HF_HUB_OFFLINE``) until the block ends."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if constants.HF_HUB_OFFLINE or env.strip().lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE is set"
    elif not hub_reachable(timeout):
        why = f"{HUB_HOST} is unreachable"
    else:
        yield None
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield why
    finally:
        constants.HF_HUB_OFFLINE = saved


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
