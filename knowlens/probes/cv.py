"""Cross-validation grouped by entity: out-of-fold probe scores, hyper-parameters chosen inside each fold.

`grouped_folds` puts every group (entity) in exactly one fold, so no entity is in both a probe's training
and test rows. `cross_validate` scores every row with a probe that never saw its entity; the L2 strength
of each outer fold's probe is chosen by an inner grouped cross-validation on that fold's training rows only
(`select_l2`). `cross_validate_select` does the same over several candidate feature matrices (hooks,
positions) and also picks the candidate inside each training fold, so its out-of-fold AUROC is not biased
by the choice; the per-candidate results come with it (their best is the optimistic figure).

The out-of-fold scores of different folds come from different probes and are pooled into one AUROC.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Shaped

from knowlens.errors import KnowlensError
from knowlens.probes.logistic import ClassWeight, fit_logistic, fit_logistic_path
from knowlens.probes.metrics import GroupsArg, auroc, group_codes
from knowlens.types import Float, Int, Tensor

L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # 1/C; features are standardised


@dataclass(frozen=True, eq=False)  # tensors: compare fields explicitly
class CVResult:
    """Out-of-fold decision values of every row, the fold each row was tested in, the L2 chosen per fold."""

    scores: Float[Tensor, " n"]
    fold: Int[Tensor, " n"]
    l2: tuple[float, ...]
    auroc: float


@dataclass(frozen=True, eq=False)
class SelectionResult:
    """`cross_validate_select`: the nested result (candidate and L2 chosen inside each training fold) and
    every candidate's own cross-validation (same folds)."""

    nested: CVResult
    chosen: tuple[str, ...]  # the candidate each outer fold's training rows chose
    candidates: dict[str, CVResult]

    @property
    def best(self) -> str:
        """The candidate with the highest out-of-fold AUROC (an optimistic pick: chosen on the test rows)."""
        return max(self.candidates, key=lambda c: self.candidates[c].auroc)


def grouped_folds(
    groups: GroupsArg, k: int, *, seed: int = 0, labels: Shaped[Tensor, " n"] | None = None
) -> Int[Tensor, " n"]:
    """The fold (0..k-1) of every row; all rows of a group share a fold.

    Groups are dealt largest first (ties in a seeded random order) to the fold that keeps the folds'
    row counts, per class when ``labels`` are given, most even. Raises KnowlensError when there are fewer
    groups than folds or (with ``labels``) a fold has no row of some class.
    """
    codes = group_codes(groups)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    if k < 2 or n_groups < k:
        raise KnowlensError(f"grouped {k}-fold cross-validation needs k >= 2 and at least k groups; got {n_groups}")
    cls = labels.cpu().long() if labels is not None else torch.zeros(len(codes), dtype=torch.long)
    n_cls = int(cls.max()) + 1
    counts = torch.zeros(n_groups, n_cls, dtype=torch.float64)
    counts.index_put_((codes, cls), torch.ones(len(codes), dtype=torch.float64), accumulate=True)
    totals = counts.sum(0).clamp(min=1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_groups, generator=gen)
    order = order[torch.argsort(counts.sum(1)[order], descending=True, stable=True)]
    load = torch.zeros(k, n_cls, dtype=torch.float64)
    fold_of_group = torch.empty(n_groups, dtype=torch.long)
    tiebreak = torch.rand(n_groups, k, generator=gen, dtype=torch.float64) * 1e-9
    for g in order.tolist():
        cost = (((load + counts[g]) / totals) ** 2).sum(1) + tiebreak[g]
        f = int(torch.argmin(cost))
        fold_of_group[g] = f
        load[f] += counts[g]
    if labels is not None:
        present = counts.sum(0) > 0
        _repair(fold_of_group, load, counts, present)
        empty = [(f, c) for f in range(k) for c in range(n_cls) if present[c] and load[f, c] == 0]
        if empty:
            f, c = empty[0]
            n_c = int((counts[:, c] > 0).sum())
            raise KnowlensError(f"fold {f} of {k} has no row of class {c}: only {n_c} groups hold that class")
    return fold_of_group[codes]


def _repair(fold_of_group: Tensor, load: Tensor, counts: Tensor, present: Tensor) -> None:
    """Give every fold a row of every present class where the balanced deal left none: move the smallest group
    holding the missing class from the fold with the most such groups (when it has two or more), as long as the
    move empties no other class of that fold. In place; a no-op when no fold lacks a class."""
    k, n_cls = load.shape
    for _ in range(k * n_cls):
        empty = [(f, c) for f in range(k) for c in range(n_cls) if present[c] and load[f, c] == 0]
        if not empty:
            return
        f, c = empty[0]
        holders = [(int(((fold_of_group == d) & (counts[:, c] > 0)).sum()), d) for d in range(k)]
        n_max, donor = max(holders)
        if n_max < 2:
            return
        candidates = [g for g in torch.nonzero((fold_of_group == donor) & (counts[:, c] > 0)).flatten().tolist()
                      if bool(((load[donor] - counts[g] > 0) | ~present).all())]  # fmt: skip
        if not candidates:
            return
        g = min(candidates, key=lambda i: (float(counts[i].sum()), i))
        fold_of_group[g] = f
        load[donor] -= counts[g]
        load[f] += counts[g]


def max_folds(labels: Shaped[Tensor, " n"], groups: GroupsArg) -> int:
    """The number of groups holding the rarer class: no grouped stratified split can have more folds."""
    codes = group_codes(groups)
    y = labels.cpu().bool()
    return min(len(set(codes[y].tolist())), len(set(codes[~y].tolist())))


def select_l2(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    l2_grid: Sequence[float],
    k: int = 3,
    seed: int = 0,
    class_weight: ClassWeight = None,
) -> tuple[float, Float[Tensor, " n_l2"]]:
    """The L2 strength with the best inner out-of-fold AUROC on these rows, and every strength's AUROC.

    ``k`` is lowered to the number of groups holding the rarer class when that is smaller. Ties go to the
    stronger penalty. ``class_weight`` is passed to every fit (`fit_logistic`).
    """
    grid = sorted((float(v) for v in l2_grid), reverse=True)  # strongest first: argmax keeps the first tie
    k = min(k, max_folds(y, groups))
    folds = grouped_folds(groups, k, seed=seed, labels=y).to(X.device)
    scores = torch.zeros(len(grid), len(y), dtype=torch.float64, device=X.device)
    for f in range(k):
        tr, te = folds != f, folds == f
        for j, probe in enumerate(fit_logistic_path(X[tr], y[tr], l2_grid=grid, class_weight=class_weight)):
            scores[j, te] = probe.decision(X[te])
    aucs = torch.tensor([auroc(s, y) for s in scores], dtype=torch.float64)
    return grid[int(torch.argmax(aucs))], aucs


def cross_validate(
    X: Float[Tensor, "n d"],
    y: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    k: int = 5,
    inner_k: int = 3,
    seed: int = 0,
    class_weight: ClassWeight = None,
) -> CVResult:
    """Out-of-fold scores from ``k`` folds grouped by ``groups`` (stratified by ``y``), L2 chosen inside each."""
    return cross_validate_select({"x": X}, y, groups, l2_grid=l2_grid, k=k, inner_k=inner_k, seed=seed,
                                 class_weight=class_weight).nested  # fmt: skip


def cross_validate_select(
    candidates: Mapping[str, Float[Tensor, "n d"]],
    y: Shaped[Tensor, " n"],
    groups: GroupsArg,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    k: int = 5,
    inner_k: int = 3,
    seed: int = 0,
    class_weight: ClassWeight = None,
) -> SelectionResult:
    """`cross_validate` over several feature matrices of the same rows (their widths may differ).

    Inside each outer training fold, every candidate's L2 is chosen by inner CV (`select_l2`), and the
    candidate with the best inner AUROC scores that fold's test rows in ``nested``.
    """
    if not candidates:
        raise KnowlensError("no candidate features to cross-validate")
    codes = group_codes(groups)
    ylab = y.cpu().bool()
    folds = grouped_folds(codes, k, seed=seed, labels=ylab)
    names = list(candidates)
    oof = {c: torch.zeros(len(ylab), dtype=torch.float64) for c in names}
    l2s: dict[str, list[float]] = {c: [] for c in names}
    nested = torch.zeros(len(ylab), dtype=torch.float64)
    chosen: list[str] = []
    for f in range(k):
        tr, te = folds != f, folds == f
        inner_best: dict[str, float] = {}
        for c in names:
            X = candidates[c]
            dev_tr, dev_te = tr.to(X.device), te.to(X.device)
            l2, aucs = select_l2(X[dev_tr], ylab[tr].to(X.device), codes[tr], l2_grid=l2_grid, k=inner_k,
                                 seed=seed + 1 + f, class_weight=class_weight)  # fmt: skip
            inner_best[c] = float(aucs.max())
            probe = fit_logistic(X[dev_tr], ylab[tr].to(X.device), l2=l2, class_weight=class_weight)
            oof[c][te] = probe.decision(X[dev_te]).cpu()
            l2s[c].append(l2)
        pick = max(names, key=lambda c: inner_best[c])  # first of equals: candidates' order breaks ties
        nested[te] = oof[pick][te]
        chosen.append(pick)
    per = {c: CVResult(oof[c], folds, tuple(l2s[c]), auroc(oof[c], ylab)) for c in names}
    l2_nested = tuple(l2s[c][f] for f, c in enumerate(chosen))
    return SelectionResult(CVResult(nested, folds, l2_nested, auroc(nested, ylab)), tuple(chosen), per)


def most_chosen(chosen: Sequence[str]) -> str:
    """The candidate chosen in most folds (the earliest fold's among equals)."""
    counts = Counter(chosen)
    top = max(counts.values())
    return next(c for c in chosen if counts[c] == top)
