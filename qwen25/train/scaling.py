"""Scaling laws for hyper-parameters, as the report does: sweep, fit mu_opt(N, D) and B_opt(N, D), predict.

A sweep trains every combination of small models x token budgets x learning rates x batch sizes and records
the final loss of each run (sweep_dir/results.jsonl, one line per run; a restarted sweep skips finished runs).
For every (N, D) cell, the optimal learning rate and batch size are read off the grid: a parabola through
the best grid point and its two neighbours in log space gives the optimum between grid points (the grid
point itself at the edge of the grid). The optima are then fitted as power laws

    mu_opt(N, D) = c * N**alpha * D**beta        B_opt(N, D) = c' * N**alpha' * D**beta'

by least squares on log(y) = log(c) + alpha log(N) + beta log(D). N counts non-embedding parameters, D
training tokens, B tokens per optimizer step. `qwen25 fit-scaling` writes fit.json and PNG plots; a training
config with `lr: auto` / `batch_size: auto` and `scaling_fit: fit.json` uses the predictions. The sweep itself
(training the grid) is in sweep.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np

from ..utils import read_jsonl

FIT_FILE = "fit.json"


def fit_power_law(n, d, y) -> dict:
    """Least-squares fit of y = coef * n**alpha * d**beta in log space; returns coef, alpha, beta, rmse_log."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (n, d, y))
    if len(y) < 3:
        raise ValueError(f"a power law in N and D needs at least 3 points, got {len(y)}")
    if (n <= 0).any() or (d <= 0).any() or (y <= 0).any():
        raise ValueError("power-law fits need positive N, D and values")
    design = np.stack([np.ones_like(n), np.log(n), np.log(d)], axis=1)
    if np.linalg.matrix_rank(design) < 3:
        raise ValueError("the points do not vary in both N and D: alpha and beta cannot be separated")
    solution, *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    residual = np.log(y) - design @ solution
    return {"coef": float(np.exp(solution[0])), "alpha": float(solution[1]), "beta": float(solution[2]),
            "rmse_log": float(np.sqrt(np.mean(residual ** 2)))}


def predict(fit: dict, n: float, d: float) -> float:
    """The fitted power law at (N, D)."""
    return fit["coef"] * n ** fit["alpha"] * d ** fit["beta"]


def grid_optimum(values, losses) -> float:
    """The loss-minimising value along one axis: vertex of a parabola in log(value) through the best
    grid point and its neighbours, or the best grid point itself when it sits at the edge of the grid."""
    order = np.argsort(values)
    v, y = np.asarray(values, dtype=np.float64)[order], np.asarray(losses, dtype=np.float64)[order]
    x, best = np.log(v), int(np.argmin(y))
    if best == 0 or best == len(x) - 1:
        return float(v[best])
    a, b, _ = np.polyfit(x[best - 1:best + 2], y[best - 1:best + 2], 2)
    if a <= 0:  # not convex: no interior minimum to trust
        return float(v[best])
    return float(np.exp(np.clip(-b / (2 * a), x[best - 1], x[best + 1])))


def optima(results: list[dict]) -> list[dict]:
    """Per (N, D): the optimal lr (at the best batch size) and batch size in tokens (at each batch's best lr)."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        if math.isfinite(r["loss"]):
            cells.setdefault((r["N"], r["D"]), []).append(r)
    out = []
    for (n, d), runs in sorted(cells.items()):
        best = min(runs, key=lambda r: r["loss"])
        at_batch = [r for r in runs if r["batch_tokens"] == best["batch_tokens"]]
        lr = grid_optimum([r["lr"] for r in at_batch], [r["loss"] for r in at_batch])
        per_batch = {}
        for r in runs:
            if r["batch_tokens"] not in per_batch or r["loss"] < per_batch[r["batch_tokens"]]:
                per_batch[r["batch_tokens"]] = r["loss"]
        batch = grid_optimum(list(per_batch), list(per_batch.values()))
        out.append({"N": n, "D": d, "lr_opt": lr, "batch_tokens_opt": batch, "best_loss": best["loss"]})
    return out


def fit_scaling(results: list[dict]) -> dict:
    """Fit mu_opt and B_opt power laws to a sweep's results; returns the fit (what fit.json holds)."""
    points = optima(results)
    n, d = [p["N"] for p in points], [p["D"] for p in points]
    return {"lr": fit_power_law(n, d, [p["lr_opt"] for p in points]),
            "batch_tokens": fit_power_law(n, d, [p["batch_tokens_opt"] for p in points]),
            "points": points, "N": "non-embedding parameters", "D": "training tokens",
            "B": "tokens per optimizer step"}


def read_results(sweep_dir: str | Path) -> list[dict]:
    """The runs recorded in sweep_dir/results.jsonl."""
    path = Path(sweep_dir) / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"{sweep_dir}: no results.jsonl (run `qwen25 sweep` first)")
    return read_jsonl(path)


def plot_fit(fit: dict, path: str | Path) -> Path:
    """PNG: the grid optima (points) and the fitted laws (lines) against N, one colour per token budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    budgets = sorted({p["D"] for p in fit["points"]})
    n_all = [p["N"] for p in fit["points"]]
    grid = np.geomspace(min(n_all) * 0.8, max(n_all) * 1.25, 50)
    for ax, key, law, label in ((axes[0], "lr_opt", "lr", "optimal learning rate"),
                                (axes[1], "batch_tokens_opt", "batch_tokens", "optimal batch (tokens)")):
        for i, d in enumerate(budgets):
            colour = f"C{i}"
            pts = [p for p in fit["points"] if p["D"] == d]
            ax.scatter([p["N"] for p in pts], [p[key] for p in pts], color=colour, label=f"D = {d:.3g}")
            ax.plot(grid, [predict(fit[law], n, d) for n in grid], color=colour)
        f = fit[law]
        ax.set(xscale="log", yscale="log", xlabel="N (non-embedding parameters)", ylabel=label,
               title=f"{f['coef']:.3g} N^{f['alpha']:.3f} D^{f['beta']:.3f}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_fit(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """Fit a sweep's results, write fit.json and fit.png (beside results.jsonl unless `out` is given)."""
    fit = fit_scaling(read_results(sweep_dir))
    out = Path(out) if out else Path(sweep_dir) / FIT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fit, indent=2) + "\n")
    plot_fit(fit, out.with_suffix(".png"))
    return fit


def resolve_auto(cfg, n: int):
    """A TrainConfig with `lr: auto` / `batch_size: auto` replaced by the fitted mu_opt / B_opt at its (N, D); n is
    the model's non-embedding parameter count."""
    if not cfg.scaling_fit:
        raise ValueError("lr or batch_size is 'auto' but no scaling_fit (a fit.json from `qwen25 fit-scaling`) "
                         "is given")
    fit = json.loads(Path(cfg.scaling_fit).read_text())
    changes = {}
    if cfg.batch_size == "auto":
        if cfg.tokens is None:
            raise ValueError("batch_size: auto needs a token budget (tokens: ...), since steps depend on it")
        d = cfg.tokens
        tokens_per_step = predict(fit["batch_tokens"], n, d)
        changes["batch_size"] = max(1, round(tokens_per_step / (cfg.seq_len * cfg.grad_accum)))
    batch = changes.get("batch_size", cfg.batch_size)
    d = cfg.tokens if cfg.tokens is not None else cfg.steps * batch * cfg.seq_len * cfg.grad_accum
    points = fit.get("points", [])
    if cfg.lr == "auto":
        changes["lr"] = predict(fit["lr"], n, d)
        optima = [p["lr_opt"] for p in points]
        if optima and not min(optima) <= changes["lr"] <= max(optima):
            # A power law through a few noisy optima can extrapolate to rates no sweep run supports (here it
            # predicted 1e-4 where 3e-3 trains far better): keep the prediction inside the measured optima.
            clamped = min(max(changes["lr"], min(optima)), max(optima))
            warnings.warn(f"scaling fit: lr {changes['lr']:.3g} lies outside the measured optima "
                          f"[{min(optima):.3g}, {max(optima):.3g}]; using {clamped:.3g}")
            changes["lr"] = clamped
    print(f"scaling fit {cfg.scaling_fit}: N = {n:,}, D = {d:,} -> "
          + ", ".join(f"{k} = {v:.4g}" for k, v in changes.items()))
    far = []  # a power law fitted on a few points is least trustworthy far outside them: say so
    for name, value in (("N", n), ("D", d)):
        swept = [p[name] for p in points]
        if swept and value > 4 * max(swept):
            far.append(f"{name} = {value:,} is {value / max(swept):.1f}x the largest swept")
        elif swept and value < min(swept) / 4:
            far.append(f"{name} = {value:,} is {min(swept) / value:.1f}x below the smallest swept")
    if far:
        warnings.warn(f"scaling fit extrapolated: {'; '.join(far)} ({cfg.scaling_fit})")
    return dataclasses.replace(cfg, **changes)
