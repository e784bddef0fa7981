"""Run metrics: one place that writes every scalar to jsonl, TensorBoard and (optionally) Ray.

    log = MetricsLogger(run_dir)
    log.write(step, {"sft/loss": 1.2, "eval/accuracy": 31.0})
    log.close()          # also writes metrics.csv (one column per key)

Keys carry a namespace (``sft/``, ``rl/``, ``eval/``, ``perf/``, ``timing/``) as verl's do.
A resumed run first drops what the stopped one recorded after its checkpoint (``drop_after``):
the steps that follow write those records again, and each step must be there once.
Ray custom metrics (``ray.util.metrics.Gauge``, shown by the Ray dashboard's Metrics page and
its Prometheus endpoint) are published for the keys given in ``ray_keys`` when Ray is running.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, ray_keys: Iterable[str] = ()):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._ray_keys = set(ray_keys)
        self._gauges: dict = {}

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            value = _plain(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
            if key in self._ray_keys:
                self._gauge(key).set(value)

    def drop_after(self, step: int) -> list[dict]:
        """Keep only the records of steps <= ``step`` (-1: none), in metrics.jsonl and in TensorBoard
        (its events of later steps are purged from view); returns the records kept."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=step + 1)
        return kept

    def _gauge(self, key: str):
        if key not in self._gauges:
            import ray
            from ray.util.metrics import Gauge
            if not ray.is_initialized():
                return _NullGauge()
            name = "reft_" + key.replace("/", "_").replace("-", "_")
            self._gauges[key] = Gauge(name, description=f"ReFT {key}")
        return self._gauges[key]

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        write_csv(self.path, self.run_dir / "metrics.csv")


class _NullGauge:
    def set(self, value):
        pass


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PARTIAL = ".tmp-"   # <name>.tmp-<pid>: a file (or checkpoint) being written, or left by a process stopped meanwhile


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: a reader (or a run resumed after a crash) sees
    the old content or the new, never a part (a temporary file beside it, then ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{PARTIAL}{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(jsonl: Path, csv: Path) -> None:
    import pandas as pd
    rows = read_metrics(jsonl) if Path(jsonl).exists() else []
    if rows:
        pd.DataFrame(rows).to_csv(csv, index=False)


def _plain(value):
    """Tensors and numpy scalars → Python numbers (a sync point for device tensors)."""
    if hasattr(value, "item"):
        return value.item()
    return value


def summary_line(step: int, metrics: Mapping[str, float], keys: Optional[Iterable[str]] = None) -> str:
    """``step 12 | sft/loss 1.234 | eval/accuracy 31.0`` for the log."""
    keys = [k for k in (keys if keys is not None else metrics) if k != "step"]   # the prefix says it
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if k in metrics and isinstance(metrics[k], (int, float))]
    return f"step {step} | " + " | ".join(parts)


def progress(total: int, desc: str, unit: str, initial: int = 0):
    """One progress bar with a true total. On a terminal it redraws in place; off one (CI logs,
    `ray job` logs) it is silent instead of printing thousands of carriage-return updates: the
    per-epoch / per-evaluation summary lines say the same."""
    import sys

    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not sys.stderr.isatty())
