"""Metric writing (tensorboardX + a JSON-lines file + absl logging) and progress/ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

from absl import logging


def _to_float(v) -> float:
    return float(v)


def _written_lines(path: str) -> set[tuple]:
    """``(step, keys)`` of every complete line of a metrics file; a line cut short by a
    kill is removed (the only change ever made to written lines)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    seen = set()
    for line in data[:end].decode().splitlines():
        if line.strip():
            row = json.loads(line)
            seen.add((row.pop("step", None), tuple(sorted(row))))
    return seen


class MetricWriter:
    """Writes scalars to TensorBoard (via tensorboardX, no TensorFlow) and to
    ``<workdir>/metrics.jsonl`` (one JSON object per call).

    The file is append-only and survives a kill: a resumed run, which replays the steps
    after its checkpoint, skips the lines (same step, same keys) already written.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        self._written = _written_lines(path)
        self._jsonl = open(path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        values = {k: _to_float(v) for k, v in scalars.items()}
        if (int(step), tuple(sorted(values))) in self._written:
            return
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def flush(self):
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


class Progress:
    """Steps per second and ETA of a run of ``total`` steps starting at ``start``.

    The rate is measured from the first ``update`` after construction (so compilation,
    which happens in the first step, does not distort it).
    """

    def __init__(self, total: int, start: int = 0):
        self.total = int(total)
        self.start = int(start)
        self._t0 = None
        self._s0 = None
        self.started = time.time()

    def update(self, step: int) -> dict:
        now = time.time()
        if self._t0 is None:
            self._t0, self._s0 = now, step
            rate = float("nan")
        else:
            rate = (step - self._s0) / max(now - self._t0, 1e-9)
        remaining = self.total - step
        eta = remaining / rate if rate and rate == rate and rate > 0 else float("nan")
        return {"step": step, "steps_per_sec": rate, "eta_sec": eta,
                "elapsed_sec": now - self.started}

    def line(self, step: int, scalars: Mapping[str, float] | None = None) -> str:
        info = self.update(step)
        parts = [f"step {step}/{self.total}"]
        for k, v in (scalars or {}).items():
            parts.append(f"{k}={_to_float(v):.4f}")
        if info["steps_per_sec"] == info["steps_per_sec"]:
            parts.append(f"{info['steps_per_sec']:.1f} steps/s")
        if info["eta_sec"] == info["eta_sec"]:
            parts.append(f"ETA {format_seconds(info['eta_sec'])}")
        parts.append(f"elapsed {format_seconds(info['elapsed_sec'])}")
        return " | ".join(parts)


def log(msg: str):
    logging.info(msg)
