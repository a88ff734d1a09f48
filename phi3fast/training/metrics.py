"""What a training run reports: metrics.jsonl (one object per optimizer step), loss.png, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsLog:
    """metrics.jsonl (one object per optimizer step, plus eval fields) and loss.png, on rank 0."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            # Keep the history up to the checkpoint; steps logged after it are about to be redone.
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a hard kill
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, out: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path, tmp = out / "loss.png", out / "loss.png.tmp"
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        return path
