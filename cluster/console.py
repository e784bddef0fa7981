"""The console is for people: one progress bar per phase, one line per evaluation, the table.

Everything else is written to files in the run directory:

    <run_dir>/logs/driver.log   every log record of the driver process (INFO and up): each RL
                                step's summary, start-up times, DeepSpeed's and transformers'
    <run_dir>/logs/ray          (a link to) the Ray session's logs: every actor's stdout/stderr,
                                vLLM's engine logs among them, and Ray's own

``setup_console`` (the CLI calls it) lets through only warnings, errors and the records logged
with ``extra=CONSOLE``; ``cluster.verbose`` (``--verbose``) lets everything through and has Ray
forward the actors' output to the console again.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

CONSOLE = {"console": True}   # logger.info(..., extra=CONSOLE): a line the console shows
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.WARNING or getattr(record, "console", False)


def setup_console(verbose: bool = False) -> None:
    """Root logging for a command: INFO records are kept (for the run's log file), the console
    shows what ``_ConsoleFilter`` lets through. Idempotent."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_reft_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s" if not verbose else _FORMAT, "%H:%M:%S"))
    handler.addFilter(_ConsoleFilter(verbose))
    handler._reft_console = True
    root.addHandler(handler)
    if not verbose:
        # Per-load progress bars of the HF libraries ("Loading weights", "Writing model shards").
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def attach_run_log(run_dir: Path) -> Path:
    """Write every INFO+ record of this process to ``<run_dir>/logs/driver.log`` (one file
    handler per process: a second call moves it to the new run directory)."""
    path = Path(run_dir) / "logs" / "driver.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_reft_run_log", False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    handler._reft_run_log = True
    root.addHandler(handler)
    return path


def link_ray_logs(run_dir: Path) -> Optional[Path]:
    """``<run_dir>/logs/ray`` -> this Ray session's log directory (on this node), where each
    actor's output and vLLM's logs are; None when it cannot be found."""
    try:
        import ray
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path())  # no public API for it
    except Exception:   # noqa: BLE001 (a client connection, an older Ray: the link is a convenience)
        return None
    link = Path(run_dir) / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session / "logs", target_is_directory=True)
    return link


class PhaseBar:
    """One progress bar for a phase with a true total: steps, or, for a phase with a time budget,
    seconds (the bar then shows training time against the budget)."""

    def __init__(self, desc: str, total_steps: int, max_seconds: Optional[float] = None, initial: int = 0):
        from cluster.metrics import progress
        self.max_seconds, self.start = max_seconds, time.perf_counter()
        if max_seconds is None:
            self.bar = progress(total=total_steps, initial=initial, desc=desc, unit="step")
        else:
            self.bar = progress(total=round(max_seconds), desc=f"{desc} (time budget)", unit="s")

    def advance(self, trained_seconds: Optional[float] = None, **postfix) -> None:
        """One step done; ``trained_seconds``: the phase's training time so far (time budgets)."""
        if self.max_seconds is None:
            self.bar.update(1)
        else:
            seconds = time.perf_counter() - self.start if trained_seconds is None else trained_seconds
            self.bar.update(min(round(seconds), self.bar.total) - self.bar.n)
        if postfix:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
