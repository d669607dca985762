"""Loss curve of a beacon training run (``history.json`` or the latest checkpoint's state) as a PNG.

python benchmarks/plot_training.py runs/smollm2/ beacon_llm/adapters/smollm2-135m-instruct/loss.png
python benchmarks/plot_training.py --fast
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import save_figure, write_json


def history(run: Path) -> list[dict]:
    if (run / "history.json").is_file():
        return json.loads((run / "history.json").read_text())
    from beacon_llm.training import latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run}: no history.json and no checkpoint")
    return json.loads((ckpt / "trainer_state.json").read_text())["state"]["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?")
    parser.add_argument("png", nargs="?")
    parser.add_argument("--fast", action="store_true", help="plot a synthetic history (CI smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON summary path")
    args = parser.parse_args()
    if not args.fast and (args.run is None or args.png is None):
        parser.error("give the run folder and the PNG to write (or --fast)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.fast:
        hist = [{"step": i + 1, "loss": 4 - i / 10, "tokens": 100 * (i + 1)} for i in range(20)]
        png = Path(args.out or "loss.json").with_suffix(".png")
    else:
        hist = history(Path(args.run))
        png = Path(args.png)
    steps = [h["step"] for h in hist]
    loss = [h["loss"] for h in hist]
    k = 5
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig = plt.figure(figsize=(6, 3.5))
    plt.plot(steps, loss, alpha=0.35, label="loss per step")
    plt.plot(steps, smooth, label=f"mean of {k} steps")
    plt.xlabel("optimiser step")
    plt.ylabel("loss (nats/token)")
    plt.title("beacon training")
    plt.legend()
    plt.tight_layout()
    save_figure(fig, png, dpi=120)
    plt.close(fig)
    summary = {
        "steps": steps[-1],
        "tokens": hist[-1]["tokens"],
        "first5": sum(loss[:5]) / len(loss[:5]),  # the mean of the first (last) 5 steps, or of all of fewer
        "last5": sum(loss[-5:]) / len(loss[-5:]),
    }
    if args.out:
        write_json(args.out, summary, indent=None)
    print(json.dumps(summary), f"-> {png}")


if __name__ == "__main__":
    main()
