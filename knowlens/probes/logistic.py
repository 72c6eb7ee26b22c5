"""L2-regularised logistic-regression probes, fitted in torch on the data's device.

Objective, on features standardised with the training rows' mean and standard deviation:

    sum_i logloss(y_i, w . z_i + b) + (l2 / 2) * ||w||^2        (the bias is not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / l2)`` objective divided by ``C``: same minimiser. The
solver is damped Newton (a batched Cholesky solve of the ``(d + 1) x (d + 1)`` Hessian, Armijo
backtracking), exact to float64 round-off in a few iterations for the feature sizes of residual probes (up to
a few thousand features; its cost per iteration is ``n d^2 + d^3``). Several L2 strengths are fitted at once
as one batch of independent problems (`fit_logistic_path`), which is what makes inner cross-validation cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.types import Float, Tensor

_ARMIJO = 1e-4
_MAX_HALVINGS = 40


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class LogisticProbe:
    """A fitted probe. ``weight`` acts on standardised features ``(x - mean) / std``; ``l2`` is 1/C."""

    weight: Float[Tensor, " d"]
    bias: float
    mean: Float[Tensor, " d"]
    std: Float[Tensor, " d"]
    l2: float

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
    dtype: torch.dtype = torch.float64,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> LogisticProbe:
    """Fit one probe of strength ``l2`` (> 0) on rows ``X`` with 0/1 (or bool) labels ``y``."""
    return fit_logistic_path(X, y, l2_grid=(l2,), dtype=dtype, max_iter=max_iter, tol=tol)[0]


def fit_logistic_path(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    *,
    l2_grid: Sequence[float],
    dtype: torch.dtype = torch.float64,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> list[LogisticProbe]:
    """One probe per L2 strength in ``l2_grid``, fitted together (same standardisation, independent problems).

    ``tol`` bounds the Newton decrement (half the predicted objective decrease) of every problem at exit.
    Raises KnowlensError for a non-positive strength, a single class or non-finite features.
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
    W = _newton(Z, yd, lam, max_iter=max_iter, tol=tol)
    return [
        LogisticProbe(weight=W[j, :-1].clone(), bias=float(W[j, -1]), mean=mean, std=std, l2=lams[j])
        for j in range(len(lams))
    ]


def _objective(W: Tensor, Z: Tensor, y: Tensor, pen: Tensor) -> Tensor:
    eta = W @ Z.T  # (m, n)
    return (torch.nn.functional.softplus(eta) - y * eta).sum(1) + 0.5 * (pen * W * W).sum(1)


def _newton(Z: Tensor, y: Tensor, lam: Tensor, *, max_iter: int, tol: float) -> Tensor:
    """Minimise `_objective` for every strength in ``lam`` at once; returns ``(m, d + 1)`` weights."""
    m, d1 = len(lam), Z.shape[1]
    pen = lam[:, None] * torch.ones(d1, dtype=Z.dtype, device=Z.device)
    pen[:, -1] = 0.0  # bias
    W = torch.zeros(m, d1, dtype=Z.dtype, device=Z.device)
    eye = torch.eye(d1, dtype=Z.dtype, device=Z.device)
    f = _objective(W, Z, y, pen)
    done = torch.zeros(m, dtype=torch.bool, device=Z.device)
    for _ in range(max_iter):
        p = torch.sigmoid(W @ Z.T)
        grad = (p - y) @ Z + pen * W
        H = torch.einsum("mn,ni,nj->mij", p * (1 - p), Z, Z) + torch.diag_embed(pen) + 1e-12 * eye
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
        f_new = _objective(W - t[:, None] * step, Z, y, pen)
        ok = f_new <= f - _ARMIJO * t * decrement
        for _ in range(_MAX_HALVINGS):
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
            f_new = _objective(W - t[:, None] * step, Z, y, pen)
            ok = f_new <= f - _ARMIJO * t * decrement
        done |= ~ok  # no decrease left at float precision: at the minimum, to round-off
        t = torch.where(ok, t, 0.0)
        W = W - t[:, None] * step
        f = torch.where(ok, f_new, f)
    return W
