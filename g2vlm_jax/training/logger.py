"""Metric logging from process 0: console, TensorBoard (tensorboardX) and JSONL.

The train loop hands over the device metrics of step s while step s+1 is already dispatched, so
`jax.device_get` here never stalls the device pipeline (metrics are read one step late).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm


_CONSOLE_KEYS = ("loss", "ce", "vg", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu")
_CONSOLE_EVAL_SUFFIXES = ("vg_loss", "abs_rel", "delta_1.25", "/acc", "/comp", "auc@30", "overall")


def _shown_on_console(key: str) -> bool:
    """The console line shows the headline numbers; every scalar still goes to JSONL/TensorBoard."""
    return key in _CONSOLE_KEYS or (key.startswith("eval/") and key.endswith(_CONSOLE_EVAL_SUFFIXES))


class MetricLogger:
    """Accumulates per-step scalars and writes averaged records every `log_every` steps."""

    def __init__(self, workdir: pathlib.Path, log_every: int, *, enabled: bool = True,
                 peak_flops_per_second: float = 0.0):
        self.workdir = pathlib.Path(workdir)
        self.log_every = log_every
        self.enabled = enabled and jax.process_index() == 0
        self.peak = peak_flops_per_second
        self._window: list[dict] = []
        self._last_time = time.perf_counter()
        self._jsonl = None
        self._tb = None
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def record(self, step: int, metrics: dict, extra: dict | None = None, *, force: bool = False) -> dict | None:
        """Adds one step's metrics (device arrays are fetched here); writes every `log_every` steps
        (and at `force`, e.g. the last step of a run).

        Returns the written record (or None when this step only accumulated).
        """
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        host.update(extra or {})
        self._window.append(host)
        if step % self.log_every and not force:
            return None
        now = time.perf_counter()
        elapsed = now - self._last_time
        self._last_time = now
        window, self._window = self._window, []
        keys = window[0].keys()
        record = {k: float(np.mean([w[k] for w in window])) for k in keys}
        record["step"] = step
        record["step_time_s"] = elapsed / len(window)
        record["tokens_per_s"] = sum(w.get("tokens", 0.0) for w in window) / max(elapsed, 1e-9)
        if self.peak and "flops" in record:
            record["mfu"] = record["flops"] / record["step_time_s"] / self.peak
        self.write(step, record)
        return record

    def write(self, step: int, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": prefix, **record, "step": step}) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k if k.startswith(prefix + "/") else f"{prefix}/{k}", v, step)
        self._tb.flush()
        shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if _shown_on_console(k))
        logging.info("[%s] step %d %s", prefix, step, shown)
        tqdm.write(f"[{prefix}] step {step} {shown}")  # above the progress bar when one is shown

    def images(self, step: int, paths: list[pathlib.Path], prefix: str = "eval") -> None:
        """Logs PNG pictures to TensorBoard as `<prefix>/<file stem>` (the evaluators' depth maps, trajectories)."""
        if not self.enabled:
            return
        from PIL import Image

        for path in paths:
            with Image.open(path) as im:
                self._tb.add_image(f"{prefix}/{pathlib.Path(path).stem}", np.asarray(im.convert("RGB")), step,
                                   dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def flatten_scalars(report: dict, prefix: str = "") -> dict[str, float]:
    """{'reconstruction': {'depth': {'abs_rel': x}}} -> {'reconstruction/depth/abs_rel': x} (numbers only)."""
    flat = {}
    for k, v in report.items():
        if isinstance(v, dict):
            flat.update(flatten_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            flat[f"{prefix}{k}"] = float(v)
    return flat
