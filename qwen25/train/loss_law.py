"""Loss as a function of model size and data, L(N, D) = E + A / N**alpha + B / D**beta, with D either the raw
token count |D| or the effective tokens D_eff = q * |D| of the report's data story ("not every token counts
equally": a corpus of mean quality q in (0, 1] is worth q of its tokens).

The points come from a quality sweep (`run_sweep` with a `data` axis of corpora of known mean quality and an
`eval_data` of clean held-out text): per run N (non-embedding parameters), D (tokens trained), q and the held-out
loss. For fixed exponents the law is linear in (E, A, B), so the fit searches a grid of (alpha, beta), refined around
the best cell, and solves the non-negative least-squares problem in (E, A, B) exactly at each: no starting-point luck.
Held-out error, the test of which D explains the losses: every point predicted by the fit to all the others
(leave-one-out), and the largest token budget predicted by the fit to the smaller ones (extrapolation in D).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from .scaling import read_results

LAW_FILE = "loss_law.json"


def _nnls_batch(designs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of G designs (G, P, 3): argmin |design @ c - y|^2 over c >= 0, by solving every subset of free
    columns (7 for 3 columns) and keeping the best feasible one: (coefficients (G, 3), sse (G,))."""
    g, _, k = designs.shape
    best_c, best_sse = np.zeros((g, k)), np.full(g, float(y @ y))
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            x = designs[:, :, cols]
            gram = np.einsum("gpi,gpj->gij", x, x) + 1e-12 * np.eye(size)
            sol = np.linalg.solve(gram, np.einsum("gpi,p->gi", x, y)[..., None])[..., 0]
            sse = np.sum((np.einsum("gpi,gi->gp", x, sol) - y) ** 2, axis=1)
            better = (sol >= 0).all(axis=1) & (sse < best_sse)
            c = np.zeros((g, k))
            c[:, cols] = sol
            best_c[better], best_sse[better] = c[better], sse[better]
    return best_c, best_sse


def fit_loss_law(n, d, loss, exponents=(0.02, 2.0)) -> dict:
    """Least-squares fit of loss = E + A / n**alpha + B / d**beta with E, A, B >= 0 and alpha, beta in `exponents`;
    returns E, A, alpha, B, beta and the fit's rmse (in the loss's units)."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if len(y) < 5:
        raise ValueError(f"the loss law has 5 parameters; got {len(y)} points")
    if (n <= 0).any() or (d <= 0).any():
        raise ValueError("N and D must be positive")
    ln_n, ln_d = np.log(n / n.min()), np.log(d / d.min())  # scaled: A and B stay well conditioned

    def solve(alphas, betas):
        designs = np.stack([np.ones((len(alphas), len(y))), np.exp(-np.outer(alphas, ln_n)),
                            np.exp(-np.outer(betas, ln_d))], axis=2)
        return _nnls_batch(designs, y)

    lo, hi = np.log(exponents[0]), np.log(exponents[1])
    step = (hi - lo) / 40
    a, b = (v.ravel() for v in np.meshgrid(np.linspace(lo, hi, 41), np.linspace(lo, hi, 41)))
    for _ in range(4):  # the grid, then finer grids around the best cell
        coefs, sse = solve(np.exp(a), np.exp(b))
        i = int(np.argmin(sse))
        a0, b0 = a[i], b[i]
        a, b = (v.ravel() for v in np.meshgrid(np.linspace(a0 - step, a0 + step, 11).clip(lo, hi),
                                               np.linspace(b0 - step, b0 + step, 11).clip(lo, hi)))
        step /= 5
    alpha, beta = float(np.exp(a0)), float(np.exp(b0))
    e, a_scaled, b_scaled = coefs[i]
    # undo the scaling: A / (n / n_min)^alpha = (A * n_min^alpha) / n^alpha
    return {"E": float(e), "A": float(a_scaled * n.min() ** alpha), "alpha": alpha,
            "B": float(b_scaled * d.min() ** beta), "beta": beta, "rmse": float(np.sqrt(sse[i] / len(y)))}


def predict_loss(fit: dict, n, d):
    """The fitted law at (N, D)."""
    n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def heldout_errors(n, d, loss) -> dict:
    """How well the law predicts points it was not fitted to: leave-one-out rmse over every point, and the rmse on
    the largest budget's points when fitted to the smaller budgets' (None when too few points remain)."""
    n, d, y = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    loo = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        loo.append(float(predict_loss(fit_loss_law(n[keep], d[keep], y[keep]), n[i], d[i]) - y[i]))
    out = {"loo_rmse": float(np.sqrt(np.mean(np.square(loo)))), "loo_residuals": loo}
    return out


def compare_fits(points: list[dict]) -> dict:
    """Fit the law with D = tokens trained and with D_eff = quality * tokens; each with its held-out errors.
    The budget extrapolation fits to runs below the largest token budget and predicts the largest."""
    n = np.array([p["N"] for p in points], dtype=np.float64)
    y = np.array([p["heldout_loss"] for p in points], dtype=np.float64)
    tokens = np.array([p["D"] for p in points], dtype=np.float64)
    out = {"points": points, "N": "non-embedding parameters", "D": "tokens trained",
           "D_eff": "quality x tokens trained", "loss": "mean next-token loss on clean held-out text (nats)"}
    largest = tokens == tokens.max()
    for key, d in (("D", tokens), ("D_eff", tokens * np.array([p["quality"] for p in points]))):
        fit = fit_loss_law(n, d, y)
        fit.update(heldout_errors(n, d, y))
        if (~largest).sum() >= 5:
            small = fit_loss_law(n[~largest], d[~largest], y[~largest])
            err = predict_loss(small, n[largest], d[largest]) - y[largest]
            fit["extrapolation_rmse"] = float(np.sqrt(np.mean(err ** 2)))
        out[key] = fit
    return out


def plot_loss_law(result: dict, path: str | Path) -> Path:
    """PNG: held-out loss against D (left) and D_eff (right), colour = corpus quality, marker = model size, with
    each fit's curve per model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    sizes = sorted({p["N"] for p in points})
    qualities = sorted({round(p["quality"], 3) for p in points})
    cmap = plt.get_cmap("viridis")
    markers = "osD^v<>"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("D", "D_eff")):
        fit = result[key]
        xs = [p["D"] * (p["quality"] if key == "D_eff" else 1.0) for p in points]
        for p, x in zip(points, xs):
            colour = cmap(qualities.index(round(p["quality"], 3)) / max(1, len(qualities) - 1))
            ax.scatter(x, p["heldout_loss"], color=colour, marker=markers[sizes.index(p["N"]) % len(markers)],
                       edgecolor="k", linewidth=0.4, zorder=3)
        grid = np.geomspace(min(xs) * 0.8, max(xs) * 1.25, 60)
        for i, size in enumerate(sizes):
            ax.plot(grid, predict_loss(fit, size, grid), color="0.3", lw=1, ls=["-", "--", ":", "-."][i % 4],
                    label=f"fit, N = {size:,}")
        ax.set(xscale="log", xlabel=("D_eff = q x tokens" if key == "D_eff" else "D = tokens trained"),
               title=f"L(N, {key}): rmse {fit['rmse']:.3f}, leave-one-out {fit['loo_rmse']:.3f}")
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("held-out loss (nats / token)")
    for q in qualities:
        axes[1].scatter([], [], color=cmap(qualities.index(q) / max(1, len(qualities) - 1)), label=f"q = {q:.2f}")
    axes[1].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_loss_law(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """Fit a quality sweep's results (sweep_dir/results.jsonl with heldout_loss and quality per run) with D and with
    D_eff; write loss_law.json and loss_law.png beside them (or at `out`)."""
    points = [{k: r[k] for k in ("name", "N", "D", "quality", "heldout_loss")}
              for r in read_results(sweep_dir) if np.isfinite(r.get("heldout_loss", np.inf))]
    missing = [r["name"] for r in read_results(sweep_dir) if "quality" not in r or "heldout_loss" not in r]
    if missing:
        raise ValueError(f"{sweep_dir}: runs {missing[:3]} have no quality / heldout_loss: the sweep needs a "
                         f"`data` axis with qualities and an `eval_data` (see qwen25/train/scaling.py)")
    result = compare_fits(points)
    out = Path(out) if out else Path(sweep_dir) / LAW_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot_loss_law(result, out.with_suffix(".png"))
    return result


def describe(result: dict) -> str:
    """Two lines, one per fit: the law and its errors."""
    lines = []
    for key in ("D", "D_eff"):
        f = result[key]
        extra = f", budget extrapolation {f['extrapolation_rmse']:.4f}" if "extrapolation_rmse" in f else ""
        lines.append(f"L(N, {key}) = {f['E']:.3f} + {f['A']:.3g} / N^{f['alpha']:.3f} + {f['B']:.3g} / "
                     f"{key}^{f['beta']:.3f}: rmse {f['rmse']:.4f}, leave-one-out {f['loo_rmse']:.4f}{extra}")
    return "\n".join(lines)
