"""PNG plots of the benchmark results in ``benchmarks/results/*.json`` (written next to them).

python benchmarks/plots.py            # efficiency.png, quality.png, perplexity.png from the committed results
python benchmarks/plots.py --fast     # the same into a temporary folder (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _results import save_figure, write_json

RESULTS = Path(__file__).parent / "results"


def plot_efficiency(eff: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    series = sorted({(r["method"], r.get("ratio")) for r in eff["rows"] if "ingest_tok_s" in r}, key=str)
    for method, ratio in series:
        rows = sorted(
            (r for r in eff["rows"] if r.get("method") == method and r.get("ratio") == ratio and "ingest_tok_s" in r),
            key=lambda r: r["length"],
        )
        label = method + (f" ratio {ratio}" if ratio else "")
        xs = [r["length"] for r in rows]
        axes[0].plot(xs, [r["ingest_tok_s"] for r in rows], marker="o", label=label)
        axes[1].plot(xs, [r["peak_rss_mb"] for r in rows], marker="o", label=label)
        if method != "plain-window":
            axes[2].plot(xs, [r["decode_tok_s"] for r in rows], marker="o", label=label)
    axes[0].set(ylabel="ingestion tokens/s", title="throughput")
    axes[1].set(ylabel="peak RSS (MB)", title="memory")
    axes[2].set(ylabel="decode tokens/s after the context", title="decoding")
    for ax in axes:
        ax.set(xscale="log", xlabel="context tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    plt.close(fig)


def plot_quality(quality: dict, png: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = quality["args"]["methods"]
    lengths = sorted({r["length"] for r in quality["rows"]})
    tasks = list(dict.fromkeys(r["task"] for r in quality["rows"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        acc = []
        for n in lengths:
            sel = [r for r in quality["rows"] if r["length"] == n and r.get(m)]
            acc.append(np.mean([r[m]["correct"] for r in sel]) if sel else np.nan)
        a.bar(np.arange(len(lengths)) + i * width, acc, width, label=m)
        per_task = []
        for t in tasks:
            sel = [r for r in quality["rows"] if r["task"] == t and r.get(m)]
            per_task.append(np.mean([r[m]["correct"] for r in sel]) if sel else np.nan)
        b.bar(np.arange(len(tasks)) + i * width, per_task, width, label=m)
    a.set_xticks(np.arange(len(lengths)) + 0.4 - width / 2, [f"{n // 1024}K" for n in lengths])
    a.set(ylim=(0, 1), ylabel="exact match (all probes)", xlabel="context", title="accuracy by context length")
    b.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=30, ha="right")
    b.set(ylim=(0, 1), ylabel="exact match (all lengths)", title="accuracy by probe")
    a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    plt.close(fig)


def plot_perplexity(ppl: dict, png: Path) -> None:
    """One panel per held-out book: each method's continuation perplexity against the context length."""
    import matplotlib.pyplot as plt

    rows = ppl["rows"]
    books = sorted({r["book"] for r in rows})
    fig, axes = plt.subplots(1, len(books), figsize=(6 * len(books), 4.2), squeeze=False)
    for ax, book in zip(axes[0], books):
        for setting in sorted({r["setting"] for r in rows}):
            sel = sorted((r for r in rows if r["book"] == book and r["setting"] == setting), key=lambda r: r["context"])
            for m in ("beacons", "truncation", "streamingllm", "full"):
                pts = [(r["context"], r[m]) for r in sel if r.get(m) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{m} ({setting})")
        ax.set(xscale="log", xlabel="context tokens", ylabel="perplexity of the next tokens", title=book)
        ax.legend(fontsize=7)
    fig.suptitle("continuation perplexity at the beacon cache's KV budget")
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="write into a temporary folder")
    parser.add_argument("--threads", type=int, default=1, help="unused; accepted like the other scripts")
    parser.add_argument("--out", default=None, help="JSON list of the PNGs written")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    target = Path(tempfile.mkdtemp()) if args.fast else RESULTS
    written = []
    for name, plot in (("efficiency", plot_efficiency), ("quality", plot_quality), ("perplexity", plot_perplexity)):
        src = RESULTS / f"{name}.json"
        if src.is_file():
            png = target / f"{name}.png"
            plot(json.loads(src.read_text()), png)
            written.append(str(png))
            print(f"wrote {png}")
    if args.out:
        write_json(args.out, {"png": written}, indent=None)


if __name__ == "__main__":
    main()
