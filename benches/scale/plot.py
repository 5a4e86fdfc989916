"""Draws scale/run.sh's JSON: CPU per request against each dimension, Weft and nginx.

    python3 benches/scale/plot.py RESULTS.json OUT.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {
    "routes": "routes (request matches the last)",
    "endpoints": "endpoints in the cluster",
    "connections": "concurrent connections",
    "body_bytes": "response body (bytes)",
}
STYLE = {"weft": ("tab:blue", "o", "Weft"), "nginx": ("tab:gray", "s", "nginx")}


def main(src: str, dst: str) -> None:
    with open(src) as f:
        data = json.load(f)
    points = data["points"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, (dim, title) in zip(axes, TITLES.items()):
        for target, (color, marker, label) in STYLE.items():
            pts = sorted(
                (p["value"], p["cpu_us_per_req"])
                for p in points
                if p["dimension"] == dim and p["target"] == target and p["cpu_us_per_req"]
            )
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, color=color, label=label)
            for x, y in pts:
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8, color=color)
        ax.set_xscale("log")
        if dim in ("body_bytes", "endpoints"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(dim)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("proxy CPU µs per request (max load)")
    axes[0].legend()
    fig.suptitle(f"How cost grows — {data['setup']['host']}, {data['setup']['duration_secs']} s runs "
                 "at max, one core", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
