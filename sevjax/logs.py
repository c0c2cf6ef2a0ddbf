"""Run logs: ``metrics.jsonl``, TensorBoard events, a progress bar and the loss-curve PNG.

Only process 0 writes. Each record is one JSON object ``{"step", "split", ...scalars}`` with
``split`` = ``train`` or ``validation``. On resume, records written after the checkpoint the run
restarts from are dropped (a killed run may have logged steps it then lost), so the file always
describes exactly one trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sevjax.loss import SEVERITIES


class RunLog:
    """metrics.jsonl + TensorBoard (tensorboardX) + a tqdm bar; inactive when ``active`` is False.

    Args:
        run_dir: where ``metrics.jsonl`` and ``tb/`` go.
        total: number of steps (the bar's length).
        start: the step the run starts from (records after it are dropped).
        active: whether this process writes (process 0).
        tensorboard: write TensorBoard events.
        progress: show the progress bar.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total: int,
        start: int,
        active: bool,
        tensorboard: bool,
        progress: bool,
    ):
        from tqdm.auto import tqdm

        self.active, self.path, self.tb = active, Path(run_dir) / "metrics.jsonl", None
        if active and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            keep = [r for r in lines if r.strip() and json.loads(r)["step"] <= start]
            self.path.write_text("".join(r + "\n" for r in keep), encoding="utf-8")
        if active and tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start or None)
        self.bar = tqdm(total=total, initial=start, disable=not (active and progress), desc="train")

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record ``{"step", "split", ...scalars}``."""
        if not self.active:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def note(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        if self.active:
            self.bar.write(text)

    def close(self) -> None:
        """Closes the bar and the TensorBoard writer."""
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    return [json.loads(r) for r in Path(path).read_text(encoding="utf-8").splitlines() if r.strip()]


def plot_curves(metrics_path: Path, out_png: Path, *, train_key: str = "loss") -> None:
    """Loss against step: train and validation, and beside it validation loss per severity.

    Args:
        metrics_path: a ``metrics.jsonl``.
        out_png: the PNG to write.
        train_key: the train record's key to draw (the LM draws its unweighted ``nll``, the
            same quantity as the validation loss).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(metrics_path)
    val = [r for r in rows if r["split"] == "validation"]
    per_severity = any(f"loss/{s}" in r for r in val for s in SEVERITIES)
    fig, axes = plt.subplots(1, 2 if per_severity else 1, figsize=(12 if per_severity else 7, 4))
    axes = list(axes) if per_severity else [axes]
    for split, key, style in (("train", train_key, "-"), ("validation", "loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if r["split"] == split and r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts), style, label=split)
    axes[0].set(xlabel="step", ylabel="token loss", title="loss (unweighted)")
    if per_severity:
        for s in SEVERITIES:
            pts = [(r["step"], r[f"loss/{s}"]) for r in val if r.get(f"loss/{s}") is not None]
            if pts:
                axes[1].plot(*zip(*pts), "o-", label=s)
        axes[1].set(xlabel="step", ylabel="token loss", title="validation loss per severity")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
