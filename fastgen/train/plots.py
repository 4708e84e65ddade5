"""PNG line charts of a run's ``metrics.jsonl`` with Pillow: losses and evaluation metrics over steps.

Pillow rather than matplotlib: it is already fastgen's picture library (sample grids, scatter
plots), it adds no dependency, imports in milliseconds and draws the same bytes everywhere (no
font cache, no backend selection); a few line charts need nothing more.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from fastgen.train.checkpoint import atomic_write_bytes

__all__ = ["read_series", "plot_series", "plot_run", "LOSSES_PLOT", "EVAL_PLOT"]

LOSSES_PLOT, EVAL_PLOT = "losses.png", "eval.png"
_PANEL = (360, 200)
_MARGIN = 34
_COLUMNS = 3


def read_series(path: str | os.PathLike) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """The numeric series of a metrics.jsonl, ``name -> [(step, value), ...]``: (training records,
    evaluation records). Lines that do not parse (a run cut mid-write) and non-finite values are
    skipped; nested lists (per-class FDs) are left out, nested dicts named ``a.b`` (floors)."""
    train: dict[str, list[tuple[int, float]]] = {}
    evaluation: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if isinstance(record.get("eval"), dict):
            _collect(evaluation, step, record["eval"], "")
        else:
            _collect(train, step, {k: v for k, v in record.items() if k != "step"}, "")
    return train, evaluation


def _collect(series: dict[str, list[tuple[int, float]]], step: int, record: dict, prefix: str) -> None:
    for name, value in record.items():
        if isinstance(value, dict):
            _collect(series, step, value, f"{prefix}{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            series.setdefault(prefix + name, []).append((step, float(value)))


def _draw_panel(draw: ImageDraw.ImageDraw, left: int, top: int, name: str, points: list[tuple[int, float]]) -> None:
    width, height = _PANEL
    x0, y0, x1, y1 = left + _MARGIN, top + 18, left + width - 8, top + height - 18
    draw.rectangle((x0, y0, x1, y1), outline="gray")
    steps, values = [p[0] for p in points], [p[1] for p in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)
    draw.text((left + 4, top + 2), f"{name}  last {values[-1]:.4g}", fill="black")
    draw.text((left + 2, y0), f"{high:.3g}", fill="gray")
    draw.text((left + 2, y1 - 10), f"{low:.3g}", fill="gray")
    draw.text((x0, y1 + 3), str(first), fill="gray")
    draw.text((x1 - 6 * len(str(last)), y1 + 3), str(last), fill="gray")
    span_x, span_y = max(last - first, 1), (high - low) or 1.0
    xy = [(x0 + (s - first) / span_x * (x1 - x0), y1 - (v - low) / span_y * (y1 - y0)) for s, v in points]
    if len(xy) == 1:
        draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill="blue")
    else:
        draw.line(xy, fill="blue", width=1)


def plot_series(series: dict[str, list[tuple[int, float]]], path: str | os.PathLike) -> None:
    """One panel per series (step on x, value on y, its range and last value written), three
    panels a row, as a PNG at ``path``; ``series`` must not be empty."""
    if not series:
        raise ValueError("series: nothing to plot")
    rows = -(-len(series) // _COLUMNS)
    columns = min(len(series), _COLUMNS)
    picture = Image.new("RGB", (columns * _PANEL[0], rows * _PANEL[1]), "white")
    draw = ImageDraw.Draw(picture)
    for i, (name, points) in enumerate(sorted(series.items())):
        _draw_panel(draw, (i % _COLUMNS) * _PANEL[0], (i // _COLUMNS) * _PANEL[1], name, sorted(points))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def plot_run(run_dir: str | os.PathLike, metrics_file: str = "metrics.jsonl") -> list[Path]:
    """Write ``losses.png`` (training records) and ``eval.png`` (``--eval-every`` records) of a run
    directory's metrics file into it; returns the pictures written (none without records)."""
    run_dir = Path(run_dir)
    if not (run_dir / metrics_file).exists():
        return []
    written = []
    for series, name in zip(read_series(run_dir / metrics_file), (LOSSES_PLOT, EVAL_PLOT)):
        if series:
            plot_series(series, run_dir / name)
            written.append(run_dir / name)
    return written
