"""The plot: records/s per scenario with every runner side by side, and records/s against the
Sluice daemon's worker count. Only valid results are drawn as values; the others are marked
with their status at the axis, never as a bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot"]

_COLORS = {
    "sluice-shm": "#1f77b4",
    "sluice-socket": "#17becf",
    "confluent": "#d62728",
    "aiokafka": "#ff7f0e",
    "java": "#2ca02c",
}


def _best_sluice(results: list[dict[str, Any]], label: str, runner: str) -> dict[str, Any] | None:
    """The valid result with the most records/s over the worker sweep (or any result if none is valid)."""
    rows = [r for r in results if r["label"] == label and r["runner"] == runner]
    valid = [r for r in rows if r["status"] == "valid"]
    if valid:
        return max(valid, key=lambda r: r["records_per_s"])
    return rows[0] if rows else None


def plot(doc: dict[str, Any], path: Path) -> None:
    """Write the PNG for a results document."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    labels = list(dict.fromkeys(r["label"] for r in results))
    runners = list(dict.fromkeys(r["runner"] for r in results))
    sweep = sorted({r["workers"] for r in results if r["workers"] is not None})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw={"width_ratios": [3, 2]})

    width = 0.8 / max(1, len(runners))
    for j, runner in enumerate(runners):
        for i, label in enumerate(labels):
            r = _best_sluice(results, label, runner)
            if r is None:
                continue
            x = i + (j - (len(runners) - 1) / 2) * width
            if r["status"] == "valid":
                ax1.bar(x, r["records_per_s"] / 1e3, width, color=_COLORS.get(runner, "grey"),
                        label=runner if i == 0 or runner not in ax1.get_legend_handles_labels()[1] else None)
            else:
                ax1.text(x, 0, f" {runner}: {r['status']}", rotation=90, ha="center", va="bottom", fontsize=7,
                         color="grey", clip_on=True)
    ax1.set_xlim(-0.5, len(labels) - 0.5)
    ax1.set_ylim(bottom=0)
    ax1.set_xticks(range(len(labels)))
    ax1.set_xticklabels(labels, rotation=20)
    ax1.set_ylabel("thousand records/s (first send to last ack)")
    title = "throughput per scenario"
    if len(sweep) > 1:
        title += " (Sluice: best worker count)"
    ax1.set_title(title)
    handles, names = ax1.get_legend_handles_labels()
    seen = dict(zip(names, handles))
    if seen:
        ax1.legend(seen.values(), seen.keys(), fontsize=8)

    if sweep:
        for runner in runners:
            if runner not in ("sluice-shm", "sluice-socket"):
                continue
            for label in labels:
                pts = [(r["workers"], r["records_per_s"] / 1e3) for r in results
                       if r["runner"] == runner and r["label"] == label and r["status"] == "valid"]
                if pts:
                    pts.sort()
                    ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                             linestyle="-" if runner == "sluice-shm" else "--", label=f"{label} {runner}")
        for r in results:
            if r["runner"] == "confluent" and r["status"] == "valid" and r["label"] in ("single", "fleet"):
                ax2.axhline(r["records_per_s"] / 1e3, color=_COLORS["confluent"], linestyle=":", linewidth=1)
                ax2.text(sweep[0], r["records_per_s"] / 1e3, f" confluent {r['label']}", fontsize=7,
                         color=_COLORS["confluent"], va="bottom")
        ax2.set_xticks(sweep)
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend(fontsize=7)
        else:
            ax2.text(0.5, 0.5, "no valid Sluice result", transform=ax2.transAxes, ha="center", color="grey")
    else:
        ax2.text(0.5, 0.5, "no Sluice cases", transform=ax2.transAxes, ha="center", color="grey")
    ax2.set_xlabel("Sluice daemon workers")
    ax2.set_ylabel("thousand records/s")
    ax2.set_title("records/s against worker count")
    host = doc.get("host", {})
    fig.suptitle(f"{host.get('cpu_model', '?')}, {host.get('cores_usable', '?')} usable cores — "
                 f"{doc.get('started', '')}; invalid/failed/unavailable results are labelled, not plotted", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
