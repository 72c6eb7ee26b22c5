"""L2-regularised logistic-regression probes, fitted in torch on the data's device.

Objective, on features standardised with the training rows' mean and standard deviation:

    sum_i logloss(y_i, w . z_i + b) + (l2 / 2) * ||w||^2        (the bias is not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / l2)`` objective divided by ``C``: same minimiser. With class
weights, row ``i``'s log-loss is multiplied by the weight of its class: ``"balanced"`` gives class ``c`` the weight
``n / (2 n_c)`` on the rows being fitted (scikit-learn's ``class_weight="balanced"``), a mapping ``{0: w0, 1: w1}``
gives explicit weights (scikit-learn's ``class_weight={0: w0, 1: w1}``); the standardisation stays unweighted. The
solver is damped Newton (a batched Cholesky solve of the ``(d + 1) x (d + 1)`` Hessian, Armijo
backtracking), exact to float64 round-off in a few iterations for the feature sizes of residual probes (up to
a few thousand features; its cost per iteration is ``n d^2 + d^3``). Several L2 strengths are fitted at once
as one batch of independent problems (`fit_logistic_path`), which is what makes inner cross-validation cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.types import Float, Tensor

_ARMIJO = 1e-4
_MAX_HALVINGS = 40

ClassWeight = Literal["balanced"] | Mapping[int, float] | None


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class LogisticProbe:
    """A fitted probe. ``weight`` acts on standardised features ``(x - mean) / std``; ``l2`` is 1/C."""

    weight: Float[Tensor, " d"]
    bias: float
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    l2: float
    class_weight: tuple[float, float] | None = None  # the (class 0, class 1) row weights it was fitted with

    def decision(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """The logit ``w . (x - mean) / std + b`` of every row (higher: more likely class 1)."""
        Z = (X.to(self.mean.dtype) - self.mean) / self.std
        return Z @ self.weight + self.bias

    def predict_proba(self, X: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """P(class 1) of every row."""
        return torch.sigmoid(self.decision(X))

    @property
    def raw_weight(self) -> Float[Tensor, " d"]:
        """The weight on unstandardised features (``decision = X @ raw_weight + raw_bias``)."""
        return self.weight / self.std

    @property
    def raw_bias(self) -> float:
        return self.bias - float((self.mean / self.std) @ self.weight)


def fit_logistic(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    *,
    l2: float,
    class_weight: ClassWeight = None,
    dtype: torch.dtype = torch.float64,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LogisticProbe:
    """Fit one probe of strength ``l2`` (> 0) on rows ``X`` with 0/1 (or bool) labels ``y``; ``class_weight``:
    None, ``"balanced"`` or ``{0: w0, 1: w1}`` (module docstring)."""
    return fit_logistic_path(X, y, l2_grid=(l2,), class_weight=class_weight, dtype=dtype, max_iter=max_iter,
                             tol=tol)[0]  # fmt: skip


def fit_logistic_path(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    *,
    l2_grid: Sequence[float],
    class_weight: ClassWeight = None,
    dtype: torch.dtype = torch.float64,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> list[LogisticProbe]:
    """One probe per L2 strength in ``l2_grid``, fitted together (same standardisation, independent problems).

    ``tol`` bounds the Newton decrement (half the predicted objective decrease) of every problem at exit.
    Raises KnowlensError for a non-positive strength, a single class, non-finite features or a bad class weight.
    """
    lams = [float(v) for v in l2_grid]
    if not lams or min(lams) <= 0:
        raise KnowlensError(f"l2 strengths must be > 0, got {list(l2_grid)}")
    device = X.device
    Xd = X.to(dtype)
    yd = y.to(device=device, dtype=dtype)
    if not bool(((yd == 0) | (yd == 1)).all()):
        raise KnowlensError("probe labels must be 0/1 or bool")
    if not 0 < float(yd.sum()) < yd.numel():
        raise KnowlensError(f"a probe needs both classes; got {int(yd.sum())} of {yd.numel()} rows in class 1")
    if not bool(torch.isfinite(Xd).all()):
        raise KnowlensError("probe features contain NaN or infinite values")
    mean = Xd.mean(0)
    std = Xd.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant features: left at 0 after centring
    Z = torch.cat([(Xd - mean) / std, torch.ones(len(Xd), 1, dtype=dtype, device=device)], dim=1)
    lam = torch.tensor(lams, dtype=dtype, device=device)
    cw = resolve_class_weight(class_weight, yd)
    s = None if cw is None else torch.where(yd > 0, cw[1], cw[0])
    W = _newton(Z, yd, lam, max_iter=max_iter, tol=tol, s=s)
    return [
        LogisticProbe(weight=W[j, :-1].clone(), bias=float(W[j, -1]), mean=mean, std=std, l2=lams[j], class_weight=cw)
        for j in range(len(lams))
    ]


def resolve_class_weight(class_weight: ClassWeight, y: Shaped[Tensor, " n"]) -> tuple[float, float] | None:
    """The (class 0, class 1) row weights ``class_weight`` means for labels ``y``: None stays None."""
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise KnowlensError(f"class_weight must be None, 'balanced' or {{0: w0, 1: w1}}, got {class_weight!r}")
        n1 = float(y.to(torch.float64).sum())
        n = y.numel()
        return (n / (2 * (n - n1)), n / (2 * n1)) if 0 < n1 < n else (1.0, 1.0)
    if not isinstance(class_weight, Mapping) or not set(class_weight) <= {0, 1}:
        raise KnowlensError(f"class_weight must be None, 'balanced' or {{0: w0, 1: w1}}, got {class_weight!r}")
    w = (float(class_weight.get(0, 1.0)), float(class_weight.get(1, 1.0)))
    if not all(math.isfinite(v) and v > 0 for v in w):
        raise KnowlensError(f"class weights must be finite and > 0, got {dict(class_weight)!r}")
    return w


def _objective(W: Tensor, Z: Tensor, y: Tensor, pen: Tensor, s: Tensor | None = None) -> Tensor:
    eta = W @ Z.T  # (m, n)
    loss = torch.nn.functional.softplus(eta) - y * eta
    return (loss if s is None else loss * s).sum(1) + 0.5 * (pen * W * W).sum(1)


def _newton(Z: Tensor, y: Tensor, lam: Tensor, *, max_iter: int, tol: float, s: Tensor | None = None) -> Tensor:
    """Minimise `_objective` (row weights ``s``, default 1) for every strength in ``lam`` at once; returns
    ``(m, d + 1)`` weights."""
    m, d1 = len(lam), Z.shape[1]
    pen = lam[:, None] * torch.ones(d1, dtype=Z.dtype, device=Z.device)
    pen[:, -1] = 0.0  # bias
    W = torch.zeros(m, d1, dtype=Z.dtype, device=Z.device)
    eye = torch.eye(d1, dtype=Z.dtype, device=Z.device)
    f = _objective(W, Z, y, pen, s)
    done = torch.zeros(m, dtype=torch.bool, device=Z.device)
    for _ in range(max_iter):
        p = torch.sigmoid(W @ Z.T)
        r, c = (p - y, p * (1 - p)) if s is None else ((p - y) * s, p * (1 - p) * s)
        grad = r @ Z + pen * W
        H = torch.einsum("mn,ni,nj->mij", c, Z, Z) + torch.diag_embed(pen) + 1e-12 * eye
        L, info = torch.linalg.cholesky_ex(H)
        if bool(info.any()):  # numerically indefinite (saturated rows): fall back to a general solve
            step = torch.linalg.lstsq(H, grad.unsqueeze(-1)).solution.squeeze(-1)
        else:
            step = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
        decrement = (grad * step).sum(1)  # g' H^-1 g: twice the predicted decrease
        done |= decrement / 2 <= tol
        if bool(done.all()):
            break
        t = torch.where(done, 0.0, 1.0).to(Z.dtype)  # Armijo backtracking, per problem
        f_new = _objective(W - t[:, None] * step, Z, y, pen, s)
        ok = f_new <= f - _ARMIJO * t * decrement
        for _ in range(_MAX_HALVINGS):
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
            f_new = _objective(W - t[:, None] * step, Z, y, pen, s)
            ok = f_new <= f - _ARMIJO * t * decrement
        done |= ~ok  # no decrease left at float precision: at the minimum, to round-off
        t = torch.where(ok, t, 0.0)
        W = W - t[:, None] * step
        f = torch.where(ok, f_new, f)
    return W
