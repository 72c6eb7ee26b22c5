"""Calibration of a probe's logits, fitted on held-out (out-of-fold) scores: temperature or Platt scaling.

Both map a probe's logit ``z`` to a probability through one affine map and a sigmoid,
``p = sigmoid(scale * z + shift)``:

* ``temperature``: ``p = sigmoid(z / T)`` (``scale = 1 / T``, ``shift = 0``), ``T > 0`` minimising the negative
  log-likelihood of the labels (Guo et al. 2017). It keeps the ranking and the 0.5 point, only sharpens or flattens.
* ``platt``: ``p = sigmoid(a * z + b)``, ``(a, b)`` minimising the negative log-likelihood of Platt's smoothed
  targets ``(n1 + 1) / (n1 + 2)`` for class 1 and ``1 / (n0 + 2)`` for class 0 (Platt 1999, as scikit-learn's
  ``CalibratedClassifierCV(method="sigmoid")``), which keeps ``a`` finite on separable scores.
* ``none``: ``p = sigmoid(z)``.

The fit is a damped Newton method on one or two parameters (convex problems), float64. A calibrator fitted on the
same scores it is evaluated on is optimistic; `cross_fitted` scores each fold with a calibrator fitted on the other
folds' scores, which is what the probe card's calibrated metrics use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.types import Float, Int, Tensor

CALIBRATIONS = ("none", "temperature", "platt")


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(scale * z + shift)`` for a probe logit ``z`` (module docstring)."""

    kind: str = "none"
    scale: float = 1.0
    shift: float = 0.0

    def logit(self, z: Float[Tensor, "*n"]) -> Float[Tensor, "*n"]:
        return z * self.scale + self.shift

    def apply(self, z: Float[Tensor, "*n"]) -> Float[Tensor, "*n"]:
        """The calibrated probability of class 1 for logits ``z``."""
        return torch.sigmoid(self.logit(z))

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def to_dict(self) -> dict[str, Any]:
        """What the probe card stores: ``{"kind": "none"}``, ``{"kind": "temperature", "temperature": T}`` or
        ``{"kind": "platt", "a": a, "b": b}``."""
        if self.kind == "temperature":
            return {"kind": "temperature", "temperature": self.temperature}
        if self.kind == "platt":
            return {"kind": "platt", "a": self.scale, "b": self.shift}
        return {"kind": "none"}

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """The inverse of `to_dict`; KnowlensError for anything else."""
        kind = d.get("kind") if isinstance(d, dict) else None
        try:
            if kind == "none":
                return cls()
            if kind == "temperature":
                t = _finite(d["temperature"])
                if t <= 0:
                    raise ValueError(f"temperature must be > 0, got {t}")
                return cls("temperature", 1.0 / t, 0.0)
            if kind == "platt":
                return cls("platt", _finite(d["a"]), _finite(d["b"]))
        except (KeyError, TypeError, ValueError) as err:
            raise KnowlensError(f"malformed calibration {d!r} ({type(err).__name__}: {err})") from None
        raise KnowlensError(f"calibration kind must be one of {', '.join(CALIBRATIONS)}; got {kind!r}")


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"not a finite number: {v!r}")
    return float(v)


def fit_calibration(kind: str, logits: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> Calibration:
    """A calibrator of ``kind`` (``none``, ``temperature``, ``platt``) fitted on held-out ``logits`` and 0/1 ``labels``."""
    if kind not in CALIBRATIONS:
        raise KnowlensError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {kind!r}")
    if kind == "none":
        return Calibration()
    z, y = _checked(logits, labels)
    if kind == "temperature":
        (a,) = _newton(z[:, None], y).tolist()
        if a <= 0:
            raise KnowlensError("temperature scaling needs scores that rank class 1 above class 0; these do not")
        return Calibration("temperature", a, 0.0)
    n1 = float(y.sum())
    n0 = len(y) - n1
    target = torch.where(y > 0, (n1 + 1) / (n1 + 2), 1 / (n0 + 2))
    a, b = _newton(torch.stack([z, torch.ones_like(z)], 1), target).tolist()
    return Calibration("platt", a, b)


def fit_temperature(logits: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> Calibration:
    return fit_calibration("temperature", logits, labels)


def fit_platt(logits: Float[Tensor, " n"], labels: Shaped[Tensor, " n"]) -> Calibration:
    return fit_calibration("platt", logits, labels)


def cross_fitted(
    kind: str, logits: Float[Tensor, " n"], labels: Shaped[Tensor, " n"], fold: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """Calibrated probabilities of every row from a calibrator fitted on the rows of the other folds."""
    z = logits.detach().to(torch.float64)
    out = torch.empty_like(z)
    fold = fold.to(z.device)
    for f in torch.unique(fold).tolist():
        te = fold == f
        out[te] = fit_calibration(kind, z[~te], labels.to(z.device)[~te]).apply(z[te])
    return out


def _checked(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    z = logits.detach().to(torch.float64).flatten()
    y = labels.detach().to(z.device, torch.float64).flatten()
    if len(z) != len(y) or len(z) < 2:
        raise KnowlensError(f"calibration needs as many labels as scores, at least 2; got {len(y)} and {len(z)}")
    if not bool(torch.isfinite(z).all()):
        raise KnowlensError("calibration scores contain NaN or infinite values")
    if not bool(((y == 0) | (y == 1)).all()):
        raise KnowlensError("calibration labels must be 0/1 or bool")
    if not 0 < float(y.sum()) < len(y):
        raise KnowlensError(f"calibration needs both classes; got {int(y.sum())} of {len(y)} rows in class 1")
    return z, y


def _nll(theta: Tensor, Z: Tensor, t: Tensor) -> Tensor:
    eta = Z @ theta
    return (torch.nn.functional.softplus(eta) - t * eta).sum()


def _newton(Z: Tensor, t: Tensor, *, max_iter: int = 100, tol: float = 1e-12) -> Tensor:
    """Minimise ``sum softplus(Z theta) - t Z theta`` from the identity map (``theta = (1, 0...)``)."""
    theta = torch.zeros(Z.shape[1], dtype=torch.float64, device=Z.device)
    theta[0] = 1.0
    f = _nll(theta, Z, t)
    eye = torch.eye(Z.shape[1], dtype=torch.float64, device=Z.device)
    for _ in range(max_iter):
        p = torch.sigmoid(Z @ theta)
        grad = Z.T @ (p - t)
        H = (Z * (p * (1 - p))[:, None]).T @ Z + 1e-12 * eye
        step = torch.linalg.lstsq(H, grad[:, None]).solution[:, 0]
        decrement = float(grad @ step)
        if decrement / 2 <= tol:
            break
        s = 1.0
        for _ in range(60):  # Armijo backtracking
            f_new = _nll(theta - s * step, Z, t)
            if f_new <= f - 1e-4 * s * decrement:
                break
            s /= 2
        else:
            break  # no decrease left at float precision
        theta, f = theta - s * step, f_new
    return theta
