"""Fitting router heads: small MLP ensembles trained with torch, exported as numpy weights.

torch is imported inside the functions (the `train` extra); the result is an `artifact.Member` that the scorer
applies with numpy alone. Training is seeded (torch, numpy) and single-threaded-deterministic on the CPU, so
the same data, config and seed give the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiergate.routing.artifact import Feature, Layer, Member
from tiergate.routing.errors import NoOperatingPoint
from tiergate.routing.features import raw_features
from tiergate.routing.operating_points import CalibrationTable, cost_weight_for_quality, threshold_for_pgr
from tiergate.training.calibration import candidate_cost_table, cost_weight_table, threshold_table

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def fit_features(names: Sequence[str], texts: Sequence[str]) -> list[Feature]:
    """Prompt features with the mean and standard deviation of `texts` (the training prompts)."""
    raw = raw_features(names, texts)
    return [
        Feature(name=n, mean=float(raw[:, j].mean()), std=float(max(float(raw[:, j].std()), 1e-6)))
        for j, n in enumerate(names)
    ]


@dataclass(frozen=True)
class HeadConfig:
    """Head hyper-parameters; defaults are the ones measured best in docs/routing.md."""

    # 64 hidden units: 256 measured no better on MMLU test; 384x64 float16 keeps an ensemble of 3 near
    # 200 KiB of JSON.
    hidden: int = 64
    # Epochs over the training rows; the targets are neighbourhood-smoothed, so the head converges fast and
    # more epochs only memorise. 20 epochs of 256-row batches is the setting measured in docs/routing.md.
    epochs: int = 20
    lr: float = 1e-3
    # AdamW decoupled decay 1e-2 (torch's default): the targets are smooth, so strong decay costs nothing.
    weight_decay: float = 1e-2
    batch: int = 256
    dropout: float = 0.1
    # Members differ only by seed; averaging them removes most of the seed-to-seed variance of one MLP.
    ensemble: int = 3
    seed: int = 0


def fit_member(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float64],
    cfg: HeadConfig,
    seed: int,
    progress: Any | None = None,
) -> Member:
    """One MLP `dim -> hidden (relu) -> out`.

    Binary targets (deterministic and transformed labels) are fitted with cross-entropy and a sigmoid output.
    Soft targets (neighbourhood estimates) are fitted by least squares on standardised targets, the scale folded
    back into the last layer afterwards (identity output): their spread is small (a neighbourhood gain of a few
    points), and cross-entropy on targets that close to 0.5 trained measurably worse (docs/routing.md)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    binary = bool(np.all((y2 == 0) | (y2 == 1)))
    mean = np.zeros(y2.shape[1]) if binary else y2.mean(axis=0)
    std = np.ones(y2.shape[1]) if binary else np.maximum(y2.std(axis=0), 1e-6)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(((y2 - mean) / std).astype(np.float32))
    out_dim = yt.shape[1]
    layers: list[torch.nn.Module] = []
    if cfg.hidden > 0:
        layers += [
            torch.nn.Linear(xt.shape[1], cfg.hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(cfg.dropout),
            torch.nn.Linear(cfg.hidden, out_dim),
        ]
    else:
        layers += [torch.nn.Linear(xt.shape[1], out_dim)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn: torch.nn.Module = torch.nn.BCEWithLogitsLoss() if binary else torch.nn.MSELoss()
    n = len(xt)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch):
            idx = perm[start : start + cfg.batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    out_layers = []
    for i, lin in enumerate(linears):
        w = lin.weight.detach().numpy().T.astype(np.float64)
        b = lin.bias.detach().numpy().astype(np.float64)
        last = i == len(linears) - 1
        if last and not binary:
            w, b = w * std[None, :], b * std + mean
        out_layers.append(
            Layer(
                weight=w.astype(np.float32),
                bias=b.astype(np.float32),
                activation="identity" if last else "relu",
            )
        )
    return Member(layers=out_layers, output="sigmoid" if binary else "identity", weight=1.0)


def fit_task_member(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float64],
    tasks: list[str],
    cfg: HeadConfig,
    seed: int,
    progress: Any | None = None,
) -> Member:
    """A task head: an MLP classifying the prompt's task (cross-entropy), softmax output, times a table of
    per-task mean targets. Its output is the probability-weighted mean of the task figures: the router never
    needs the task at inference, yet gets the low-noise task-level estimate where the prompt is recognisable."""
    import numpy as np
    import torch

    names = sorted(set(tasks))
    idx = np.array([names.index(t) for t in tasks], dtype=np.int64)
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    table = np.stack([y2[idx == k].mean(axis=0) for k in range(len(names))]).astype(np.float32)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(idx)
    hidden = cfg.hidden or 64
    model = torch.nn.Sequential(
        torch.nn.Linear(xt.shape[1], hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(cfg.dropout),
        torch.nn.Linear(hidden, len(names)),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(xt)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch):
            b = perm[start : start + cfg.batch]
            opt.zero_grad()
            loss: Any = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    layers = [
        Layer(lin[0].weight.detach().numpy().T.copy(), lin[0].bias.detach().numpy().copy(), "relu"),
        Layer(lin[1].weight.detach().numpy().T.copy(), lin[1].bias.detach().numpy().copy(), "identity"),
    ]
    return Member(layers=layers, output="softmax", weight=1.0, table=table)


def fit_ridge_member(x: npt.NDArray[np.float32], y: npt.NDArray[np.float64], lam: float) -> Member:
    """Closed-form ridge regression (intercept not penalised) as a one-layer identity member."""
    import numpy as np

    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    a = np.concatenate([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))], axis=1)
    reg = lam * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    coef = np.linalg.solve(a.T @ a + reg, a.T @ y2)
    return Member(
        layers=[Layer(coef[:-1].astype(np.float32), coef[-1].astype(np.float32), "identity")], output="identity"
    )


def fit_head(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float64],
    tasks: list[str] | None,
    head: HeadConfig,
    task_head: float,
    progress: Any | None = None,
    seed_offset: int = 0,
    ridge: tuple[npt.NDArray[np.float64], float, float] | None = None,
) -> list[Member]:
    """The head's members and their weights.

    `head.ensemble` regression MLPs on `y`; as many task heads when `task_head` > 0 and the rows name at least
    two tasks (they get `task_head` of the total weight); and, with `ridge = (y_raw, share, lambda)` and
    share > 0, one closed-form ridge member on the raw (unsmoothed) targets with `share` of the weight. With
    share 1 the head is that ridge alone."""
    from dataclasses import replace

    ridge_share = ridge[1] if ridge is not None else 0.0
    members: list[Member] = []
    if ridge_share < 1.0:
        reg = [fit_member(x, y, head, head.seed * 1000 + seed_offset + i, progress) for i in range(head.ensemble)]
        tsk: list[Member] = []
        if task_head > 0 and tasks and len(set(tasks)) >= 2:
            tsk = [
                fit_task_member(x, y, tasks, head, head.seed * 1000 + seed_offset + 100 + i, progress)
                for i in range(head.ensemble)
            ]
        mlp_share = (1.0 - ridge_share) * (1.0 - (task_head if tsk else 0.0))
        members += [replace(m, weight=mlp_share / len(reg)) for m in reg]
        members += [replace(m, weight=(1.0 - ridge_share) * task_head / len(tsk)) for m in tsk]
    if ridge is not None and ridge_share > 0:
        members.append(replace(fit_ridge_member(x, ridge[0], ridge[2]), weight=ridge_share))
    return members


def fit_ensemble(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float64], cfg: HeadConfig, progress: Any | None = None
) -> list[Member]:
    return [fit_member(x, y, cfg, cfg.seed * 1000 + i, progress) for i in range(cfg.ensemble)]


@dataclass(frozen=True)
class TrainConfig:
    """Everything `tiergate train` decides, besides the data and tiers."""

    label_mode: str = "difference"
    # Neighbourhood size for the one-sample label estimates (labels.py); 200 measured best on MMLU train.
    neighbours: int = 200
    head: HeadConfig = HeadConfig()
    # Folds for the out-of-fold scores behind the calibration table (one head member per fold).
    folds: int = 5
    # Weight of the per-task mean in the training targets (labels.task_smoothed); 0 ignores the task field.
    # 0.3 measured best for MMLU (0.70 vs 0.696 at 0 and 0.691 at 0.6).
    task_weight: float = 0.3
    # Share of the head's output given to task-classifier members (fit_task_member); 0: none. 0.3 measured
    # best on MMLU test (0.7046 vs 0.6995 without).
    task_head: float = 0.3
    # Share given to a closed-form ridge member on raw (unsmoothed) targets; 1: ridge only (fit_head).
    ridge_share: float = 0.0
    # Ridge penalty: 100 measured best on GSM8K test among 10, 30, 100 (docs/routing.md).
    ridge_lambda: float = 100.0


def kfold_indices(n: int, folds: int, seed: int) -> list[npt.NDArray[np.int64]]:
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i::folds] for i in range(folds)]


def _oof_predictions(
    x: npt.NDArray[np.float32],
    targets_fn: Any,
    n_out: int,
    cfg: TrainConfig,
    progress: Any | None,
    tasks: list[str] | None = None,
    raw_targets: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """Out-of-fold head outputs: for each fold, targets built from the other folds only, one member fitted."""
    import numpy as np

    from tiergate.routing.scorer import members_forward

    n = len(x)
    out = np.zeros((n, n_out), dtype=np.float64)
    one = replace_head(cfg.head, ensemble=1)
    for f, held in enumerate(kfold_indices(n, cfg.folds, cfg.head.seed)):
        mask = np.ones(n, dtype=bool)
        mask[held] = False
        y = targets_fn(mask)
        ridge = None if raw_targets is None else (raw_targets[mask], cfg.ridge_share, cfg.ridge_lambda)
        members = fit_head(
            x[mask], y, _pick(tasks, mask), one, cfg.task_head, progress, seed_offset=500 + f, ridge=ridge
        )
        out[held] = members_forward(members, x[held])
    return out


def _pick(tasks: list[str] | None, mask: Any) -> list[str] | None:
    return None if tasks is None else [t for t, keep in zip(tasks, mask, strict=True) if keep]


def replace_head(head: HeadConfig, **changes: Any) -> HeadConfig:
    from dataclasses import replace

    return replace(head, **changes)


def build_two_tier(
    x: npt.NDArray[np.float32],
    weak: npt.NDArray[np.float64],
    strong: npt.NDArray[np.float64],
    cfg: TrainConfig,
    progress: Any | None = None,
    tasks: list[str] | None = None,
    head_x: npt.NDArray[np.float32] | None = None,
) -> tuple[list[Member], float | None, CalibrationTable, dict[str, Any]]:
    """Head members, label margin, calibration rows and training-time metrics for a two-tier router.

    `x` (embeddings) defines neighbourhoods for the labels; `head_x` (embeddings + standardised prompt features,
    default `x`) is what the head sees."""
    from tiergate.training.labels import two_tier_targets
    from tiergate.training.metrics import pgr_curve

    def targets(mask: Any) -> npt.NDArray[np.float64]:
        return two_tier_targets(
            cfg.label_mode, weak[mask], strong[mask], x[mask], cfg.neighbours, _pick(tasks, mask), cfg.task_weight
        )[0]

    hx = x if head_x is None else head_x
    # Raw targets for the ridge member: the same label mode on each row's own sample (no neighbourhood).
    raw = two_tier_targets(cfg.label_mode, weak, strong, x, 1)[0] if cfg.ridge_share > 0 else None
    oof = _oof_predictions(hx, targets, 1, cfg, progress, tasks, raw)[:, 0]
    y, margin = two_tier_targets(cfg.label_mode, weak, strong, x, cfg.neighbours, tasks, cfg.task_weight)
    ridge = None if raw is None else (raw, cfg.ridge_share, cfg.ridge_lambda)
    members = fit_head(hx, y, tasks, cfg.head, cfg.task_head, progress, ridge=ridge)
    calibration = threshold_table(oof, weak, strong)
    curve = pgr_curve(oof, weak, strong)
    metrics = {
        "oof_apgr": curve.apgr,
        "oof_cpt50": curve.cpt(0.5),
        "oof_cpt80": curve.cpt(0.8),
        "q_weak": curve.q_weak,
        "q_strong": curve.q_strong,
        "folds": cfg.folds,
    }
    return members, margin, calibration, metrics


def default_threshold_bp(calibration: CalibrationTable, pgr_target: float = 0.8) -> int:
    """The highest threshold (fewest strong calls) whose calibrated PGR reaches `pgr_target`; 0 (everything to
    the strong tier) when none does, so a weak router errs on the side of quality."""
    try:
        return threshold_for_pgr(calibration.thresholds, pgr_target).threshold_bp
    except NoOperatingPoint:
        return 0


def quality_head(
    x: npt.NDArray[np.float32],
    values: npt.NDArray[np.float64],
    cfg: TrainConfig,
    progress: Any | None = None,
    tasks: list[str] | None = None,
    head_x: npt.NDArray[np.float32] | None = None,
) -> tuple[list[Member], npt.NDArray[np.float64]]:
    """A head regressing each column of `values` `[n, m]` (neighbourhood- and task-smoothed, labels.task_smoothed)
    and its out-of-fold predictions `[n, m]` on the same rows: the N-tier and candidates heads."""
    import numpy as np

    from tiergate.training.labels import task_smoothed

    m = values.shape[1]

    def targets(mask: Any) -> npt.NDArray[np.float64]:
        return task_smoothed(x[mask], values[mask], cfg.neighbours, _pick(tasks, mask), cfg.task_weight)

    hx = x if head_x is None else head_x
    raw = values if cfg.ridge_share > 0 else None
    oof = _oof_predictions(hx, targets, m, cfg, progress, tasks, raw)
    ridge = None if raw is None else (raw, cfg.ridge_share, cfg.ridge_lambda)
    members = fit_head(hx, targets(np.ones(len(x), dtype=bool)), tasks, cfg.head, cfg.task_head, progress, ridge=ridge)
    return members, oof


def build_multi_tier(
    x: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    prices: list[float],
    cfg: TrainConfig,
    progress: Any | None = None,
    tasks: list[str] | None = None,
    head_x: npt.NDArray[np.float32] | None = None,
) -> tuple[list[Member], CalibrationTable, int, dict[str, Any]]:
    """Head members, calibration rows (cost weight -> cost, quality, shares), default cost weight and metrics."""
    import numpy as np

    members, oof = quality_head(x, scores, cfg, progress, tasks, head_x)
    pr = np.asarray(prices, dtype=np.float64)
    calibration = cost_weight_table(oof, scores, pr)
    single_q = scores.mean(axis=0)
    best = int(np.argmax(single_q))
    default_bp = _default_cost_weight(calibration, float(single_q[best]))
    metrics = {
        "oof_best_single_quality": float(single_q[best]),
        "oof_best_single_cost": float(pr[best]),
        "folds": cfg.folds,
    }
    return members, calibration, default_bp, metrics


def _default_cost_weight(calibration: CalibrationTable, best_single_quality: float) -> int:
    """The default: the cheapest calibrated point as good as the best single tier (0, i.e. quality only, if none)."""
    try:
        return cost_weight_for_quality(calibration.cost_weights, best_single_quality).cost_weight_bp
    except NoOperatingPoint:
        return 0


def build_candidates(
    x: npt.NDArray[np.float32],
    scores: npt.NDArray[np.float64],
    estimated_costs: npt.NDArray[np.float64],
    true_costs: npt.NDArray[np.float64],
    reference: int,
    cfg: TrainConfig,
    progress: Any | None = None,
    tasks: list[str] | None = None,
    head_x: npt.NDArray[np.float32] | None = None,
) -> tuple[list[Member], CalibrationTable, int, dict[str, Any]]:
    """Candidates (BEST-Route): a quality head with one output per candidate (as N tiers), its calibration table
    measured out-of-fold in USD per 1k prompts (`calibration.candidate_cost_table`: decided on the router's cost
    estimates, measured on the rows' true costs), the default cost weight (cheapest point as good as the best
    single candidate) and metrics. `reference` indexes the reference candidate (reported, not used to fit)."""
    import numpy as np

    from tiergate.routing.candidates import PROMPTS_PER_UNIT

    members, oof = quality_head(x, scores, cfg, progress, tasks, head_x)
    calibration = candidate_cost_table(oof, scores, estimated_costs, true_costs)
    single_q = scores.mean(axis=0)
    single_c = true_costs.mean(axis=0) * PROMPTS_PER_UNIT
    best = int(np.argmax(single_q))
    metrics = {
        "oof_best_single_quality": float(single_q[best]),
        "oof_best_single_usd_per_1k_prompts": float(single_c[best]),
        "reference_quality": float(single_q[reference]),
        "reference_usd_per_1k_prompts": float(single_c[reference]),
        "folds": cfg.folds,
    }
    return members, calibration, _default_cost_weight(calibration, float(single_q[best])), metrics
