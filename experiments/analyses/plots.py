"""The figures of the analyses, each on a bare ``matplotlib`` ``Figure`` (no pyplot, so
the caller's backend is left alone)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def plot_singular_values(rows: Sequence[dict]):
    """Fig. 6: per layer, baselines (left) and i-ResNets (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    names = list(dict.fromkeys(r["model"] for r in rows))
    base = [n for n in names if not any(r["coeff"] for r in rows if r["model"] == n)]
    ires = [n for n in names if n not in base]
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for ax, group, title in ((axes[0], base, "vanilla and BatchNorm ResNets"),
                             (axes[1], ires, "i-ResNets (spectral normalization)")):
        for name in group:
            rs = [r for r in rows if r["model"] == name]
            layer = [r["layer"] for r in rs]
            col = colors[names.index(name) % len(colors)]
            ax.plot(layer, [r["fft"] for r in rs], "o-", color=col, ms=4,
                    label=f"{name}: FFT (circular)")
            ax.plot(layer, [r["power"] for r in rs], "x--", color=col, ms=5, lw=0.8,
                    label=f"{name}: power iteration")
            coeff = rs[0]["coeff"]
            if coeff:
                ax.axhline(coeff, color=col, lw=0.6, ls=":")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("conv layer")
        ax.set_title(title)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("largest singular value of the conv operator")
    fig.tight_layout()
    return fig


def plot_convergence(rows: Sequence[dict]):
    """Fig. 8: error against iterations (log scale), and time per batch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax, ax_t = fig.subplots(1, 2)
    for j, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        rs = [r for r in rows if r["model"] == name]
        k = [r["iterations"] for r in rs]
        ax.semilogy(k, [max(r["mean_error"], 1e-12) for r in rs], "o-", ms=3, color=f"C{j}",
                    label=f"{name} (mean)")
        ax.semilogy(k, [max(r["max_error"], 1e-12) for r in rs], "--", lw=0.8,
                    color=f"C{j}", label=f"{name} (max)")
        ax_t.plot(k, [1e3 * r["seconds_per_batch"] for r in rs], "o-", ms=3, color=f"C{j}",
                  label=name)
    ax.set_xscale("log")
    ax.set_xlabel("fixed-point iterations per block")
    ax.set_ylabel("reconstruction error |x - F^-1(F(x))|")
    ax.legend(fontsize=7)
    ax_t.set_xlabel("fixed-point iterations per block")
    ax_t.set_ylabel(f"ms per batch of {rows[0]['batch']}")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    return fig


def image_grid(rows_of_images: Sequence[np.ndarray], pad: int = 1) -> np.ndarray:
    """Tiles ``[r][i]`` images (H, W, 1) into one 2-D array with ``pad`` pixels of NaN."""
    rows = []
    for images in rows_of_images:
        images = np.asarray(images)[..., 0]
        h, w = images.shape[1:3]
        row = np.full((h, len(images) * (w + pad) - pad), np.nan)
        for i, im in enumerate(images):
            row[:, i * (w + pad): i * (w + pad) + w] = im
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    out = np.full((len(rows) * (rows[0].shape[0] + pad) - pad, width), np.nan)
    h = rows[0].shape[0]
    for j, row in enumerate(rows):
        out[j * (h + pad): j * (h + pad) + h, : row.shape[1]] = row
    return out


def plot_image_rows(rows: Sequence[np.ndarray], labels: Sequence[str], *,
                    vmin: float, vmax: float, title: str = ""):
    """Rows of greyscale images with a label per row (values clipped to the range)."""
    from matplotlib.figure import Figure

    n = max(len(r) for r in rows)
    fig = Figure(figsize=(max(4.0, 0.55 * n + 1.5), 0.75 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, images, label in zip(axes, rows, labels):
        grid = np.clip(np.nan_to_num(image_grid([images]), nan=vmin, posinf=vmax,
                                     neginf=vmin), vmin, vmax)
        ax.imshow(grid, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_logdet_bias(result: dict):
    """Fig. 9: |bias| and standard deviation against the number of terms, with the bound."""
    from matplotlib.figure import Figure

    n = np.asarray(result["terms"])
    fig = Figure(figsize=(10, 4))
    ax, ax_rel = fig.subplots(1, 2)
    floor = 1e-12
    ax.semilogy(n, np.maximum(np.abs(result["series_bias"]), floor), "o-", ms=3,
                label="|bias| of the n-term series (exact, dense J)")
    ax.semilogy(n, np.maximum(np.abs(result["estimate_bias"]), floor), "s-", ms=3,
                label="|mean error| of the Hutchinson estimate")
    ax.semilogy(n, np.maximum(result["estimate_std"], floor), "^-", ms=3,
                label="std of the Hutchinson estimate (1 probe)")
    ax.semilogy(n, np.maximum(result["theorem3_bound"], floor), "k--",
                label="Theorem 3 bound (sum over blocks)")
    ax.set_xlabel("terms in the power series")
    ax.set_ylabel("nats per example")
    ax.set_xticks(n[::max(1, len(n) // 10)])
    ax.legend(fontsize=7)
    exact = result["exact_mean"]
    mean = exact + np.asarray(result["estimate_bias"])
    std = np.asarray(result["estimate_std"])
    ax_rel.plot(n, mean, "s-", ms=3, label="estimator mean")
    ax_rel.fill_between(n, mean - std, mean + std, alpha=0.25, label="+- 1 std")
    ax_rel.axhline(exact, color="k", lw=0.8, label="exact (mean over examples)")
    ax_rel.set_xlabel("terms in the power series")
    ax_rel.set_ylabel("residual-block log-det (nats)")
    ax_rel.legend(fontsize=7)
    fig.suptitle(f"{result['examples']} examples x {result['probes_per_example']} probes, "
                 f"{result['blocks']} blocks", fontsize=9)
    fig.tight_layout()
    return fig


def plot_runtime(result: dict):
    """Table 5 as bars: seconds per forward+backward pass and the ratio to Glow."""
    from matplotlib.figure import Figure

    names = list(result["models"])
    secs = [result["models"][n]["seconds"] for n in names]
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), [1e3 * s for s in secs], color=["C0", "C1", "C2", "C3"])
    for b, n in zip(bars, names):
        ax.annotate(f"{result['models'][n]['ratio_to_glow']:.2f}x",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=8)
    labels = {"glow": "Glow", "iresnet": "i-ResNet", "iresnet_sn": "i-ResNet\n+ SN",
              "iresnet_sn_logdet": "i-ResNet\n+ SN + log-det"}
    ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("ms per forward+backward")
    ax.set_title(f"batch {result['batch']}, {result['blocks']} blocks, "
                 f"{result['hidden']} channels, input {tuple(result['shape'])} "
                 f"({result['device']})", fontsize=8)
    fig.tight_layout()
    return fig
