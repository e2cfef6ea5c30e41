"""REPORT.md with tables and PNG plots (drawn with Pillow only) from the results of continual-learning runs.

Input: a results dict, or paths to JSON files / run folders holding `results.json`, each in this format
(accuracies in percent; every field optional except that a method needs at least one; other fields are ignored):

    {"methods": {"naive": {"nl_delta": 7.83,                 # paper 1's Delta (positive = forgotten)
                           "vl_hmean": 5.29,                 # harmonic mean of the VL benchmarks
                           "acc_matrix": [[...], ...],       # A[k][j]: task j after task k (NaN/None: not yet)
                           "task_names": ["vqa", "gqa"],     # names of the tasks, the columns of acc_matrix
                           "nl_after_task": [31.2, 28.4],    # NL omega after each task
                           "vl_after_task": [40.1, 52.3]},   # VL hmean after each task
                 "soft_targets": {...}}}

A file may also hold a single method as {"method": "naive", "nl_delta": ..., ...}. Later files win.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mllm_cl.continual_pretraining import PROTOCOL as PRETRAIN
from mllm_cl.errors import UserError
from mllm_cl.metrics import accuracy_matrix, forgetting, region_width, sequence_metrics

FIGURE_SIZE = (800, 520)  # every PNG, in pixels
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
# Heat-map colours from 0% to 100% (dark blue -> teal -> yellow, in the spirit of viridis).
HEAT_STOPS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
              (1.0, (253, 231, 37))]
FIELDS = ("nl_delta", "vl_hmean", "acc_matrix", "task_names", "nl_after_task", "vl_after_task")


class ReportInputError(UserError, ValueError):
    """Results that do not follow the documented format; the message names the file, method and field."""


# ---------------------------------------------------------------- input

def load_results(sources: dict | str | Path | Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Method name -> its validated fields, from a results dict or from files / run folders."""
    if isinstance(sources, dict):
        return _methods_of(sources, "results")
    paths = [sources] if isinstance(sources, (str, Path)) else list(sources)
    methods: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        file = path / "results.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ReportInputError(f"{file} does not exist (give results JSON files or run folders with "
                                   f"results.json)") from None
        except json.JSONDecodeError as e:
            raise ReportInputError(f"{file} is not valid JSON: {e}") from None
        methods.update(_methods_of(data, str(file)))
    if not methods:
        raise ReportInputError(f"no methods found in {[str(p) for p in paths]}")
    return methods


def _methods_of(data: Any, where: str) -> dict[str, dict[str, Any]]:
    if isinstance(data, dict) and "method" in data:
        data = {"methods": {data["method"]: {k: v for k, v in data.items() if k != "method"}}}
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
        raise ReportInputError(f'{where}: expected {{"methods": {{name: {{...}}}}}} or {{"method": name, ...}}')
    return {name: _check_method(entry, f"{where}: method {name!r}") for name, entry in data["methods"].items()}


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportInputError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _interval(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ReportInputError(f"{where}: expected an interval [low, high], got {value!r}")
    return [_number(v, where) for v in value]


def _rows(entry: dict[str, Any], field: str, cell: Callable[[Any, str], Any], where: str) -> list[list[Any]]:
    """entry[field] as a list of rows, each value read by `cell` (a number or an interval)."""
    rows = entry[field]
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ReportInputError(f"{where}, {field}: expected a list of rows")
    return [[cell(v, f"{where}, {field}[{k}][{j}]") for j, v in enumerate(r)] for k, r in enumerate(rows)]


def _check_method(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ReportInputError(f"{where}: expected an object with fields {list(FIELDS)}")
    if not set(entry) & set(FIELDS):  # other fields (a run's extra figures) are carried along, not drawn
        raise ReportInputError(f"{where}: none of the report's fields {list(FIELDS)} (it has {sorted(entry)})")
    out: dict[str, Any] = {}
    for field in ("nl_delta", "vl_hmean", "nlu_base", "nlg_base", "nl_delta_sd", "vl_hmean_sd", "general_vl_base"):
        if field in entry:
            out[field] = _number(entry[field], f"{where}, {field}")
    for field in (*SEQUENCE_METRICS, *(f"{f}_sd" for f in SEQUENCE_METRICS)):  # null: undefined for one task
        if entry.get(field) is not None:
            out[field] = _number(entry[field], f"{where}, {field}")
    if entry.get("nl_delta_ci") is not None:
        out["nl_delta_ci"] = _interval(entry["nl_delta_ci"], f"{where}, nl_delta_ci")
    if "acc_matrix_ci" in entry:
        out["acc_matrix_ci"] = _rows(entry, "acc_matrix_ci",  # null: a score without one (NL omega)
                                     lambda v, w: None if v is None else _interval(v, w), where)
    for name in ("nl_delta_ci_after_task", "general_vl_ci_after_task"):
        if isinstance(entry.get(name), list):
            out[name] = [None if v is None else _interval(v, f"{where}, {name}[{i}]")
                         for i, v in enumerate(entry[name])]
    for field in ("nl_after_task", "vl_after_task", "nlu_after_task", "nlg_after_task", "nl_delta_after_task",
                  "general_vl_after_task", "general_after_task", "general_after_task_sd", "zero_shot"):
        if field in entry:
            if not isinstance(entry[field], list):
                raise ReportInputError(f"{where}, {field}: expected a list of numbers")
            out[field] = [_number(v, f"{where}, {field}[{i}]") for i, v in enumerate(entry[field])]
    if "acc_matrix" in entry:
        try:
            out["acc_matrix"] = accuracy_matrix(_rows(entry, "acc_matrix", _number, where))
        except ValueError as e:
            raise ReportInputError(f"{where}, acc_matrix: {e}") from None
    if "acc_matrix_sd" in entry:
        out["acc_matrix_sd"] = _rows(entry, "acc_matrix_sd", _number, where)
    if "task_names" in entry:
        out["task_names"] = [str(name) for name in entry["task_names"]]
    if "acc_matrix" in out:
        size = out["acc_matrix"].shape[0]
        names = out.setdefault("task_names", [f"task {j + 1}" for j in range(size)])
        if len(names) != size:
            raise ReportInputError(f"{where}: {len(names)} task_names for a {size} x {size} acc_matrix")
    return out


# ---------------------------------------------------------------- drawing

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text`, cut with an ellipsis until it is at most `width` pixels wide."""
    while len(text) > 1 and _text_size(draw, text, font)[0] > width:
        text = text[:-2] + "…"
    return text


def _figure(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", FIGURE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.text((FIGURE_SIZE[0] // 2, 22), title, fill="black", font=_font(22), anchor="mm")
    return image, draw


def _vertical_label(image: Image.Image, text: str, x: int, y: int, font: ImageFont.ImageFont) -> None:
    """Paste `text` rotated by 90 degrees, centred on (x, y)."""
    draw = ImageDraw.Draw(image)
    width, height = _text_size(draw, text, font)
    label = Image.new("RGB", (width + 8, height + 8), "white")
    ImageDraw.Draw(label).text((4, 4), text, fill="black", font=font, anchor="lt")
    label = label.rotate(90, expand=True)
    image.paste(label, (x - label.width // 2, y - label.height // 2))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _heat_colour(value: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, value / 100.0))
    for (t0, c0), (t1, c1) in zip(HEAT_STOPS, HEAT_STOPS[1:]):
        if t <= t1:
            w = (t - t0) / (t1 - t0)
            return tuple(round(a + w * (b - a)) for a, b in zip(c0, c1))
    return HEAT_STOPS[-1][1]


def _value_axis(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], ticks: list[float],
                font: ImageFont.ImageFont) -> Callable[[float], float]:
    """Grid lines and labels for `ticks` on the left of the plot `box`; returns value -> y pixel."""
    left, top, right, bottom = box
    low, high = ticks[0], ticks[-1]

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for tick in ticks:
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill="#e0e0e0")
        draw.text((left - 8, y), f"{tick:g}", fill="black", font=font, anchor="rm")
    draw.line([(left, top), (left, bottom)], fill="black")
    return y_of


def heatmap_figure(matrix: np.ndarray, task_names: list[str], title: str) -> Image.Image:
    """The accuracy matrix as coloured cells with their values, rows 'after task', columns 'task'."""
    image, draw = _figure(title)
    small, label_font = _font(13), _font(16)
    size = matrix.shape[0]
    cell = min(120, (FIGURE_SIZE[1] - 150) // size, (FIGURE_SIZE[0] - 330) // size)
    left = (FIGURE_SIZE[0] - size * cell - 290) // 2 + 170  # 170 px of row labels, 120 of legend, centred
    top = 60
    for k in range(size):
        for j in range(size):
            x, y = left + j * cell, top + k * cell
            value = matrix[k, j]
            if math.isfinite(value):
                colour = _heat_colour(value)
                ink = "black" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else "white"
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
                draw.text((x + cell // 2, y + cell // 2), f"{value:.1f}", fill=ink, font=_font(min(16, cell // 3)),
                          anchor="mm")
            else:
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill="#eeeeee")
    for i, name in enumerate(task_names):
        draw.text((left - 8, top + i * cell + cell // 2), _fit(draw, name, small, 120), fill="black",
                  font=small, anchor="rm")
        draw.text((left + i * cell + cell // 2, top + size * cell + 6), _fit(draw, name, small, cell - 4),
                  fill="black", font=small, anchor="mt")
    draw.text((left + size * cell // 2, top + size * cell + 34), "task", fill="black", font=label_font, anchor="mt")
    _vertical_label(image, "after task", left - 150, top + size * cell // 2, label_font)
    # colour legend: a vertical bar from 0% (bottom) to 100% (top)
    bar_left, bar_top, bar_height = left + size * cell + 40, top, size * cell
    for dy in range(bar_height):
        draw.line([(bar_left, bar_top + dy), (bar_left + 20, bar_top + dy)],
                  fill=_heat_colour(100.0 * (1 - dy / max(1, bar_height - 1))))
    for tick in (0, 25, 50, 75, 100):
        y = bar_top + (1 - tick / 100) * (bar_height - 1)
        draw.line([(bar_left + 20, y), (bar_left + 25, y)], fill="black")
        draw.text((bar_left + 29, y), f"{tick}%", fill="black", font=small, anchor="lm")
    draw.text((bar_left + 10, bar_top - 8), "accuracy", fill="black", font=small, anchor="md")
    return image


def bar_figure(values: dict[str, float], title: str, ylabel: str) -> Image.Image:
    """One bar per method with its value printed on it; negative values hang below the zero line."""
    image, draw = _figure(title)
    font, label_font = _font(14), _font(16)
    box = (100, 60, FIGURE_SIZE[0] - 30, FIGURE_SIZE[1] - 80)
    finite = [v for v in values.values() if math.isfinite(v)]
    ticks = _ticks(min([0.0] + finite), max([0.0] + finite) * 1.1 or 1.0)
    y_of = _value_axis(draw, box, ticks, font)
    slot = (box[2] - box[0]) / max(1, len(values))
    for i, (name, value) in enumerate(values.items()):
        x0, x1 = box[0] + i * slot + slot * 0.2, box[0] + (i + 1) * slot - slot * 0.2
        centre = (x0 + x1) / 2
        if math.isfinite(value):
            draw.rectangle([x0, min(y_of(0), y_of(value)), x1, max(y_of(0), y_of(value))],
                           fill=PALETTE[i % len(PALETTE)])
            anchor, y = ("md", y_of(value) - 4) if value >= 0 else ("ma", y_of(value) + 4)
            draw.text((centre, y), f"{value:.2f}", fill="black", font=font, anchor=anchor)
        draw.text((centre, box[3] + 8), _fit(draw, name, font, int(slot) - 4), fill="black", font=font, anchor="ma")
    draw.line([(box[0], y_of(0)), (box[2], y_of(0))], fill="black")
    draw.text(((box[0] + box[2]) // 2, box[3] + 36), "method", fill="black", font=label_font, anchor="ma")
    _vertical_label(image, ylabel, 30, (box[1] + box[3]) // 2, label_font)
    return image


BAND_OPACITY = 60  # of 255: how strongly a mean +/- sd band tints the plot


def sd_band(mean: list[float], sd: list[float] | None, low: float = 0.0,
            high: float = 100.0) -> tuple[list[float], list[float]] | None:
    """(mean - sd, mean + sd) per point, clipped to [low, high] (a score's range, 0..100%); None without sds (a
    single seed's curve has no band). A non-finite mean or sd gives a band of width 0 at that point."""
    if sd is None:
        return None
    pairs = [(m, d if math.isfinite(d) else 0.0) for m, d in zip(mean, sd)]
    return ([min(high, max(low, m - d)) for m, d in pairs], [min(high, max(low, m + d)) for m, d in pairs])


def _draw_band(image: Image.Image, xy_low: list[tuple[float, float]], xy_high: list[tuple[float, float]],
               colour: str) -> None:
    """Tint the area between two lines of points (left to right) with `colour` at BAND_OPACITY."""
    if len(xy_low) < 2:
        return
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(xy_high + xy_low[::-1], fill=BAND_OPACITY)
    image.paste(colour, mask=mask)


def line_figure(series: dict[str, list[float]], x_labels: list[str], title: str, ylabel: str,
                xlabel: str = "after task",
                bands: dict[str, tuple[list[float], list[float]]] | None = None) -> Image.Image:
    """One line per method over the x labels (by default the tasks), with a legend; `bands` (name -> (low, high)
    per point, e.g. `sd_band`) tint the area around a line in its colour."""
    bands = bands or {}
    image, draw = _figure(title)
    font, label_font = _font(14), _font(16)
    box = (100, 60, FIGURE_SIZE[0] - 190, FIGURE_SIZE[1] - 80)
    finite = [v for values in (*series.values(), *(v for band in bands.values() for v in band)) for v in values
              if math.isfinite(v)] or [0.0]
    ticks = _ticks(min(finite) - 1, max(finite) + 1)
    y_of = _value_axis(draw, box, ticks, font)
    points = max(len(v) for v in series.values())
    x_labels = x_labels if len(x_labels) == points else [str(i + 1) for i in range(points)]

    def x_of(i: int) -> float:
        return box[0] + 30 + i * (box[2] - box[0] - 60) / max(1, points - 1)

    for i, label in enumerate(x_labels):
        draw.text((x_of(i), box[3] + 8), _fit(draw, label, font, int(x_of(1) - x_of(0)) - 4 if points > 1 else 200),
                  fill="black", font=font, anchor="ma")
    draw.line([(box[0], box[3]), (box[2], box[3])], fill="black")
    for n, name in enumerate(series):  # under every line
        if name in bands:
            shown = [i for i, v in enumerate(series[name]) if math.isfinite(v)]
            _draw_band(image, *([(x_of(i), y_of(edge[i])) for i in shown] for edge in bands[name]),
                       PALETTE[n % len(PALETTE)])
    for n, (name, values) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        xy = [(x_of(i), y_of(v)) for i, v in enumerate(values) if math.isfinite(v)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        legend_y = box[1] + 10 + 24 * n
        draw.line([(box[2] + 20, legend_y), (box[2] + 50, legend_y)], fill=colour, width=3)
        draw.text((box[2] + 58, legend_y), _fit(draw, name, font, FIGURE_SIZE[0] - box[2] - 64), fill="black",
                  font=font, anchor="lm")
    draw.text(((box[0] + box[2]) // 2, box[3] + 36), xlabel, fill="black", font=label_font, anchor="ma")
    _vertical_label(image, ylabel, 30, (box[1] + box[3]) // 2, label_font)
    return image


# ---------------------------------------------------------------- the report

def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: a header row, its rule, and one row per list of cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


SEQUENCE_METRICS = {"avg_acc": "final avg acc", "mean_acc": "mean acc", "bwt": "BWT", "fwt": "FWT",
                    "mean_forgetting": "mean forgetting"}  # the figures the CL libraries report (CoIN, MCITlib)


def _sequence_metric(m: dict[str, Any], field: str) -> str:
    """One of SEQUENCE_METRICS: the run's (with its sd over seeds), else computed from its accuracy matrix."""
    if m.get(field) is not None:
        return _cell(m[field]) + (f" +/- {_cell(m[field + '_sd'])}" if m.get(f"{field}_sd") is not None else "")
    matrix = m.get("acc_matrix")
    return "-" if matrix is None else _cell(sequence_metrics(matrix, m.get("zero_shot"))[field])


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None or not interval:
        return _cell(value)
    return f"{_cell(value)} [{interval[0]:.1f}, {interval[1]:.1f}]"


def _seeds_section(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Mean and sample standard deviation over seeds, for results of `seeds` > 1: NL Delta, VL hmean, the final
    general score (paper 2's protocol) and each task's accuracy right after it was learned."""
    over = {name: m for name, m in methods.items() if "nl_delta_sd" in m and "vl_hmean_sd" in m}
    if not over:
        return []
    general = all("general_after_task_sd" in m for m in over.values())
    names = next(iter(over.values())).get("task_names", [])
    learned = all("acc_matrix_sd" in m for m in over.values()) and bool(names)

    rows = []
    for name, m in over.items():
        row = [name, _mean_sd(m["nl_delta"], m["nl_delta_sd"]), _mean_sd(m["vl_hmean"], m["vl_hmean_sd"])]
        if general:
            row.append(_mean_sd(m["general_after_task"][-1], m["general_after_task_sd"][-1]))
        if learned:
            row += [_mean_sd(m["acc_matrix"][k][k], m["acc_matrix_sd"][k][k]) for k in range(len(names))]
        rows.append(row)
    headers = ["method", "NL Delta", "VL hmean"] + (["final general"] if general else []) + \
        ([f"{task} right after learning" for task in names] if learned else [])
    return ["## Over seeds (mean +/- sd)", "", markdown_table(headers, rows), ""]


def _nlu_nlg_section(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Paper 1's split: NLU (multiple-choice benchmarks) and NLG (last-word), omega before and after each task."""
    rows = [[name, _cell(m.get("nlu_base")), " / ".join(_cell(v) for v in m["nlu_after_task"]),
             _cell(m.get("nlg_base")), " / ".join(_cell(v) for v in m["nlg_after_task"])]
            for name, m in methods.items() if m.get("nlu_after_task") and m.get("nlg_after_task")]
    if not rows:
        return []
    return ["## NLU and NLG (paper 1)", "", markdown_table(["method", "NLU base", "NLU after each task", "NLG base",
                                                     "NLG after each task"], rows), ""]


def _learned_section(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Each task's VL accuracy right after learning it, with its Wilson interval."""
    rows = []
    for name, m in methods.items():
        matrix, intervals = m.get("acc_matrix"), m.get("acc_matrix_ci")
        if matrix is None or intervals is None:
            continue
        rows.append([name] + [_with_interval(matrix[k][k], intervals[k][k]) for k in range(len(matrix))])
    if not rows:
        return []
    names = next((m["task_names"] for m in methods.values() if "task_names" in m), [])
    return ["## VL accuracy right after learning each task [95% CI]", "", markdown_table(["method", *names], rows), ""]


def _paper1_table3(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Paper 1's Table 3 layout: after one VL task (the first), its VL accuracy and the language scores."""
    rows = []
    for name, m in methods.items():
        matrix, deltas = m.get("acc_matrix"), m.get("nl_delta_after_task")
        if matrix is None or not deltas or not m.get("nlu_after_task") or not m.get("nlg_after_task"):
            continue
        intervals = m.get("acc_matrix_ci")
        delta_ci = (m.get("nl_delta_ci_after_task") or [None])[0]
        rows.append([name, _with_interval(matrix[0][0], intervals[0][0] if intervals else None),
                     _cell(m["nlu_after_task"][0]), _cell(m["nlg_after_task"][0]), _cell(m["nl_after_task"][0]),
                     _with_interval(deltas[0], delta_ci)])
    if not rows:
        return []
    first = next(m["task_names"][0] for m in methods.values() if m.get("task_names"))
    return [f"## After one VL task ({first}), paper 1's Table 3 layout", "",
            markdown_table(["method", "VL acc [95% CI]", "NLU omega", "NLG omega", "NL omega", "NL Delta [95% CI]"],
                           rows), ""]


def _paper1_table4(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Paper 1's Table 4 layout: along the task sequence, the VL average accuracy so far and NL Delta."""
    rows, names = [], []
    for name, m in methods.items():
        deltas, vl = m.get("nl_delta_after_task"), m.get("vl_after_task")
        if not deltas or not vl:
            continue
        names = m.get("task_names", names)
        intervals = m.get("nl_delta_ci_after_task") or [None] * len(deltas)
        rows.append([name] + [f"{_cell(v)} / {_with_interval(d, ci)}" for v, d, ci in zip(vl, deltas, intervals)])
    if not rows:
        return []
    return ["## Along the sequence, paper 1's Table 4 layout (VL avg acc so far / NL Delta [95% CI])", "",
            markdown_table(["method"] + [f"after {t}" for t in names], rows), ""]


def _general_section(methods: dict[str, dict[str, Any]]) -> list[str]:
    """Paper 2's general VL score (the held-out instruction mix) before and after each task."""
    rows = [[name, _cell(m["general_vl_base"]),
             " / ".join(_with_interval(v, ci) for v, ci in zip(m["general_vl_after_task"],
                                                                m.get("general_vl_ci_after_task") or
                                                                [None] * len(m["general_vl_after_task"])))]
            for name, m in methods.items() if "general_vl_base" in m and m.get("general_vl_after_task")]
    if not rows:
        return []
    return ["## General VL (paper 2: the held-out instruction mix)", "",
            markdown_table(["method", "before the tasks", "after each task [95% CI]"], rows), ""]


GENERAL_MARGIN = 30.0  # points above chance a general skill must reach to be there to keep
ZERO_SHOT_MARGIN = 15.0  # points above chance a continual task may start at and still count as new
NL_COST_MARGIN = 10.0  # points of NL omega that instruction tuning may cost against the aligned model


def _base_section(base: dict[str, Any] | None) -> list[str]:
    """Paper 2's starting point (experiment.base_record, or its mean over seeds): is there general skill to keep
    (each general-VL skill at least GENERAL_MARGIN points above chance), and are the tasks new to it (zero-shot
    at most ZERO_SHOT_MARGIN above chance, paper 2's Table 8 first row)."""
    if not base:
        return []

    def acc(m: dict[str, Any]) -> str:
        seeds = ", ".join(_cell(v) for v in m.get("acc_per_seed", []))
        spread = f" +/- {_cell(m['acc_sd'])} ({seeds})" if "acc_sd" in m else ""
        return f"{_cell(m['acc'])}{spread} [{_cell(m['ci'][0])}, {_cell(m['ci'][1])}]"

    def figure(key: str) -> str:
        return _cell(base[key]) + (f" +/- {_cell(base[key + '_sd'])}" if f"{key}_sd" in base else "")

    def row(label: str, m: dict[str, Any], bar: str, limit: float, meets: bool) -> list[str]:
        return [label, acc(m), _cell(m["chance"]), str(m["n"]), f"{bar} {_cell(limit)}", "yes" if meets else "no"]

    rows = [row(f"general VL: {name}", m, ">=", m["chance"] + GENERAL_MARGIN, m["acc"] >= m["chance"] + GENERAL_MARGIN)
            for name, m in base["general_vl_by_skill"].items()]
    rows += [row(f"zero-shot: {name}", m, "<=", m["chance"] + ZERO_SHOT_MARGIN,
                 m["acc"] <= m["chance"] + ZERO_SHOT_MARGIN) for name, m in base["zero_shot"].items()]
    seeds = (" (mean +/- sd over seeds, each seed's value, and the 95% Wilson interval of all seeds' answers)"
             if "nl_omega_sd" in base else " [95% Wilson interval]")
    aligned = (f" (the aligned model's: {figure('aligned_nl_omega')}; instruction tuning should cost at most "
               f"{NL_COST_MARGIN:.0f} points)" if "aligned_nl_omega" in base else "")
    start = ("the aligned model (paper 2's continual pretraining: the general mix's parts are its tasks)"
             if base.get("start") == "aligned" else "the instruction-tuned model (paper 2)")
    return [f"## The starting point: {start}", "",
            f"NL omega {figure('nl_omega')}{aligned}, general VL {figure('general_vl')} (pooled over its skills). "
            f"Accuracy in percent{seeds}; chance is the share of a test's most common answer. A general skill is "
            f"there to keep when it is at least {GENERAL_MARGIN:.0f} points above chance; a continual task is new "
            f"when its zero-shot accuracy is at most {ZERO_SHOT_MARGIN:.0f} above.", "",
            markdown_table(["test", "accuracy", "chance", "n", "bar", "meets it"], rows), ""]


def _pretraining_section(methods: dict[str, dict[str, Any]], joint: dict[str, Any] | None) -> list[str]:
    """Paper 2's continual pretraining (Tables 2-3), along the sequence: after each part of the mix, the general
    score and each sub-skill (the accuracy matrix's rows, unlearned parts included), beside the mix at once."""
    rows, names = [], []
    for name, m in methods.items():
        if "acc_matrix" not in m or not m.get("general_after_task"):
            continue
        names = m["task_names"]
        rows += [[name if k == 0 else "", f"after {after}", *_after_task_cells(m, k)] for k, after in enumerate(names)]
    if joint is not None and names:
        rows.append([f"the mix at once ({joint['run']})", "all parts", *_joint_cells(joint, names)])
    if not rows:
        return []
    return ["## Continual pretraining (paper 2's Tables 2-3): general score and sub-skills after each part", "",
            "Each part's column is the sub-skill it teaches: NL omega for language, the general-VL test for a VL "
            "skill; a part's column before it is learned shows what the earlier parts gave it.", "",
            markdown_table(["method", "after", "general", *names], rows), ""]


def _mean_sd(mean: float | None, sd: float | None) -> str:
    """A figure, with its sd over seeds when there is one."""
    return _cell(mean) + ("" if sd is None else f" +/- {_cell(sd)}")


def _after_task_cells(m: dict[str, Any], k: int) -> list[str]:
    """A run's general score and every task's accuracy after task k, each with its sd over seeds if any."""
    sd, general_sd = m.get("acc_matrix_sd"), m.get("general_after_task_sd")
    return [_mean_sd(m["general_after_task"][k], general_sd[k] if general_sd else None)] + \
        [_mean_sd(v, sd[k][j] if sd else None) for j, v in enumerate(m["acc_matrix"][k])]


def _joint_cells(joint: dict[str, Any], names: list[str]) -> list[str]:
    """The joint reference's general score and every task's accuracy, each with its sd over seeds if any."""
    def sd(figure: Callable[[dict[str, Any]], float | None]) -> float | None:
        seeds = [figure(j) for j in joint.get("per_seed", [])]
        return float(np.std(seeds, ddof=1)) if len(seeds) > 1 and None not in seeds else None

    return [_mean_sd(joint.get("general"), sd(lambda j: j.get("general")))] + \
        [_mean_sd(joint["vl"].get(t), sd(lambda j, t=t: j["vl"].get(t))) for t in names]


def _ablation_section(methods: dict[str, dict[str, Any]], ablation: list[str],
                      joint: dict[str, Any] | None) -> list[str]:
    """Paper 2's Tables 2-4 and 8 layout: the named runs and the joint multitask run, final general score and
    every task's final accuracy (mean +/- sd over seeds, when there are several)."""
    rows, names = [], []
    for name in ablation:
        m = methods.get(name, {})
        if "acc_matrix" not in m or not m.get("general_after_task"):
            continue
        names = m["task_names"]
        rows.append([name, *_after_task_cells(m, len(names) - 1)])
    if joint is not None and names:
        rows.append([f"joint ({joint['run']}, all tasks at once)", *_joint_cells(joint, names)])
    if not rows:
        return []
    return ["## After the last task: general score and every task, beside the joint reference (paper 2's Tables "
            "2-4 and 8 layout)", "", markdown_table(["run", "general score"] + [f"{t} acc" for t in names], rows), ""]


def _alpha_label(alpha: float | None) -> str:
    return "none" if alpha is None else f"{alpha:.1f}"


def _region_change(base: dict[str, float | None], rule: dict[str, float | None]) -> str:
    """How a consolidation's regions differ from ModelMix's: alpha_G, alpha_T and the width alpha_G - alpha_T."""
    before, after = region_width(base), region_width(rule)
    verdict = ("widens the region" if after > before + 1e-9 else "narrows it" if after < before - 1e-9
               else "the same width") if before is not None and after is not None else "no width to compare"
    return (f"alpha_G {_alpha_label(base['alpha_G'])} -> {_alpha_label(rule['alpha_G'])}, alpha_T "
            f"{_alpha_label(base['alpha_T'])} -> {_alpha_label(rule['alpha_T'])}: {verdict}")


def _alpha_curves_section(curves: dict[str, Any] | None, out: Path) -> list[str]:
    """Paper 2's Figure 4: general and task score against alpha per consolidation, the two regions per curve,
    and whether SAC widens the general-stable region over ModelMix."""
    if not curves:
        return []
    runs = curves["runs"]
    labels = [f"{a:.1f}" for a in next(iter(runs.values()))["alpha"]]
    several = curves.get("seeds", 1) > 1  # a single seed's sds are 0: no band
    for field, title, ylabel in (("general", "General score vs alpha", "general (%)"),
                                 ("task", f"Task accuracy ({curves['task']}) vs alpha", "task acc (%)")):
        bands = {run: sd_band(c[field], c[f"{field}_sd"]) for run, c in runs.items() if several and f"{field}_sd" in c}
        band_note = " (mean +/- sd over seeds)" if bands else ""
        line_figure({run: c[field] for run, c in runs.items()}, labels, title + band_note, ylabel, xlabel="alpha",
                    bands=bands).save(out / f"alpha_{field}.png")
    per_seed = curves.get("regions_per_seed")  # curves averaged over seeds: each seed's regions too

    def seeds(run: str, key: str) -> list[str]:
        return [", ".join(_alpha_label(r[key]) for r in per_seed[run])] if per_seed else []

    rows = [[run, _alpha_label(r["alpha_G"]), *seeds(run, "alpha_G"), _alpha_label(r["alpha_T"]),
             *seeds(run, "alpha_T"), _cell(runs[run]["general"][-1]), _cell(runs[run]["task"][-1])]
            for run, r in curves["regions"].items()]
    headers = ["run / consolidation", "alpha_G", *(["alpha_G per seed"] if per_seed else []), "alpha_T",
               *(["alpha_T per seed"] if per_seed else []), "general at alpha 1", "task at alpha 1"]
    over = f" Curves are the mean over {curves['seeds']} seeds." if per_seed else ""
    md = [f"## Alpha curves (paper 2, Figure 4): one unseen task ({curves['task']}), base general score "
          f"{_cell(curves['base_general'])}", "",
          f"general = harmonic mean of NL omega and general-VL accuracy. alpha_G: {curves['rules']['alpha_G']}; "
          f"alpha_T: {curves['rules']['alpha_T']}. A curve whose alpha_T <= alpha_G has a stable region.{over}", "",
          markdown_table(headers, rows), ""]
    md += ["Against ModelMix, a rule widens the stable region when it raises alpha_G more than alpha_T (the width "
           "alpha_G - alpha_T grows); raising both by as much is ModelMix at a smaller alpha.", ""]
    for model in sorted({run.split("/")[0] for run in runs}):
        found = {run.split("/")[1]: r for run, r in curves["regions"].items() if run.startswith(model + "/")}
        if "modelmix" not in found:
            continue
        verdicts = [f"{rule}: {_region_change(found['modelmix'], found[rule])}"
                    for rule in ("sac-top", "sac-nuclear") if rule in found]
        md += [f"* {model}: " + "; ".join(verdicts) + "."]
    md += ["", "![general vs alpha](alpha_general.png) ![task vs alpha](alpha_task.png)", ""]
    return md + _width_vs_modelmix_table(curves.get("width_vs_modelmix")) + _update_spectrum_table(curves)


def _signed(value: float | None) -> str:
    return "none" if value is None else f"{value:+.2f}"


def _width_vs_modelmix_table(paired: dict[str, dict[str, dict[str, Any]]] | None) -> list[str]:
    """Each SAC rule's region width minus ModelMix's on the same seed (`alpha_curves.width_vs_modelmix`)."""
    if not paired:
        return []
    rows = [[run, rule, ", ".join(_signed(d) for d in p["per_seed"]), f"{_signed(p['mean'])} +/- {_cell(p['sd'])}",
             str(p["n"])] for run, rules in paired.items() for rule, p in rules.items()]
    return ["### Region width against ModelMix, paired by seed", "",
            "Per seed, width(rule) - width(ModelMix), a width being alpha_G - alpha_T: a positive difference means "
            "the rule widens the general-stable region against ModelMix on that seed (none: a width undefined).", "",
            markdown_table(["run", "rule", "difference per seed", "mean +/- sd", "n"], rows), ""]


def _update_spectrum_table(curves: dict[str, Any]) -> list[str]:
    """Per trained model and matrix type, how many singular values carry the update (`mllm_cl.update_spectrum`):
    k averaged over the type's matrices and over the seeds (`spectra_per_seed`, or the one run's `spectra`)."""
    per_seed = curves.get("spectra_per_seed") or {model: [s] for model, s in (curves.get("spectra") or {}).items()}
    if not per_seed:
        return []
    rows = []
    for model, seeds in sorted(per_seed.items()):
        for kind, first in seeds[0].items():
            stats = [seed[kind] for seed in seeds if kind in seed]
            rows.append([model, kind, " x ".join(map(str, first["shape"])), str(first["matrices"]),
                         _cell(float(np.mean([s["k_mean"] for s in stats]))),
                         f"{min(s['k_min'] for s in stats)}-{max(s['k_max'] for s in stats)}",
                         _cell(float(np.mean([s["rank_mean"] for s in stats])))])
    count = len(next(iter(per_seed.values())))
    over = f" and {count} seeds" if count > 1 else ""
    rule = curves["rules"].get("k", "the fewest singular values carrying most of the update's nuclear norm")
    return ["### The update's spectrum (what SAC reshapes)", "",
            f"k: {rule}; mean over a type's matrices (every layer){over}, with its range; numerical rank: the "
            "singular values above round-off.", "",
            markdown_table(["model", "matrix type", "shape", "matrices", "k (mean)", "k range", "rank (mean)"], rows),
            ""]


def time_rows(timing: dict[str, Any]) -> list[tuple[str, float]]:
    """(part, seconds) of an experiment's time table: each shared part, each method run's training and
    evaluation, then the total."""
    rows = list(timing["shared"].items())
    for name, spent in timing["methods"].items():
        rows += [(f"{name}: train", spent["train"]), (f"{name}: evaluate", spent["eval"])]
    return rows + [("total", timing["total"])]


def overlapped_part(timing: dict[str, Any]) -> str | None:
    """The part in which the method runs ran side by side (`workers` > 1), if any."""
    return next((name for name in timing["shared"] if name.startswith("method runs,")), None)


def _timing_section(timing: dict[str, Any] | None) -> list[str]:
    """Where the experiment's time went (seconds and share of the total)."""
    if not timing:
        return []
    total = timing["total"] or 1.0
    rows = [[name, f"{seconds:.0f}", f"{100 * seconds / total:.0f}%"] for name, seconds in time_rows(timing)]
    overlapped = overlapped_part(timing)
    note = [f"The method runs overlapped ({overlapped}): their rows add up to more than that part's wall "
            "clock.", ""] if overlapped else []
    return ["## Where the time went", "", markdown_table(["part", "seconds", "share"], rows), ""] + note


def _then_section(then: dict[str, Any] | None, out: Path) -> list[str]:
    """Links to the experiments this one ran after itself (`then`), each with its own report."""
    if not then:
        return []
    lines = ["## Experiments run after this one", ""]
    for name, follower in then.items():
        folder, here = Path(follower["out_dir"]).resolve(), out.resolve()
        link = folder.relative_to(here).as_posix() if here in folder.parents else folder.as_posix()
        lines.append(f"* [{name}]({link}/REPORT.md) ({follower['config']}): {follower['seconds']:.0f}s")
    return lines + [""]


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(run_dirs_or_results: dict | str | Path | Sequence[str | Path], out_dir: str | Path,
                 alpha_curves: dict[str, Any] | None = None) -> Path:
    """Write out_dir/REPORT.md and its PNG plots (with paper 2's alpha curves when given: the structure of
    alpha_curves.json); returns the path of REPORT.md."""
    methods = load_results(run_dirs_or_results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Continual-learning report", "",
          "Accuracies in percent. NL Delta = omega(base) - omega(now): positive = forgotten (paper 1). "
          "VL hmean = harmonic mean of the VL benchmarks. BWT and forgetting from the accuracy matrix.", ""]
    rows = [[name, _with_interval(m.get("nl_delta"), m.get("nl_delta_ci")), _cell(m.get("vl_hmean")),
             *(_sequence_metric(m, field) for field in SEQUENCE_METRICS)] for name, m in methods.items()]
    md += ["## Summary", "", markdown_table(["method", "NL Delta [95% CI]", "VL hmean", *SEQUENCE_METRICS.values()],
                                            rows), "",
           "Final avg acc: the mean over the tasks after the last one; mean acc: the mean of the accuracy matrix's "
           "lower triangle (every task after every task since it was learned); BWT: final minus just-learned "
           "accuracy; FWT: accuracy just before a task is learned minus the starting model's zero-shot accuracy; "
           "forgetting: best minus final accuracy (BWT, FWT and forgetting over the tasks before the last, or after "
           "the first). Over seeds: mean +/- sd of each seed's figure.", "",
           "NL Delta's interval is a paired bootstrap over the benchmarks' documents; accuracies below carry their "
           "95% Wilson interval.", ""]
    md += _seeds_section(methods) + _nlu_nlg_section(methods) + _learned_section(methods)
    if isinstance(run_dirs_or_results, dict):
        md += _base_section(run_dirs_or_results.get("base"))
    md += _paper1_table3(methods) + _paper1_table4(methods) + _general_section(methods)

    for field, title, ylabel in (("nl_delta", "NL forgetting (Delta) per method", "NL Delta (points)"),
                                 ("vl_hmean", "VL harmonic mean per method", "VL hmean (%)")):
        values = {name: m[field] for name, m in methods.items() if field in m}
        if values:
            bar_figure(values, title, ylabel).save(out / f"{field}.png")
            md += [f"![{title}]({field}.png)", ""]
    for field, title, ylabel in (("nl_after_task", "NL score after each task", "NL omega (%)"),
                                 ("vl_after_task", "VL score after each task", "VL hmean (%)")):
        series = {name: m[field] for name, m in methods.items() if m.get(field)}
        if series:
            names = next((m["task_names"] for m in methods.values() if "task_names" in m), [])
            line_figure(series, names, title, ylabel).save(out / f"{field}.png")
            md += [f"## {title}", "", f"![{title}]({field}.png)", ""]
            points = max(len(v) for v in series.values())
            headers = ["method"] + (names if len(names) == points else [str(i + 1) for i in range(points)])
            md += [markdown_table(headers, [[name] + [_cell(v) for v in values] + ["-"] * (points - len(values))
                                    for name, values in series.items()]), ""]

    for name, m in methods.items():
        if "acc_matrix" not in m:
            continue
        matrix, names = m["acc_matrix"], m["task_names"]
        file = f"acc_matrix_{_file_name(name)}.png"
        heatmap_figure(matrix, names, f"Accuracy matrix: {name}").save(out / file)
        table_rows = [[f"after {names[k]}"] + [_cell(matrix[k, j]) if j <= k else "-" for j in range(len(names))]
                      for k in range(len(names))]
        if len(names) > 1:
            table_rows.append(["forgetting"] + [_cell(f) for f in forgetting(matrix)] + ["-"])
        md += [f"## Accuracy matrix: {name}", "", markdown_table(["after task \\ task"] + names, table_rows), "",
               f"![accuracy matrix of {name}]({file})", ""]
    if isinstance(run_dirs_or_results, dict) and run_dirs_or_results.get("protocol") == PRETRAIN:
        md += _pretraining_section(methods, run_dirs_or_results.get("joint"))
    if isinstance(run_dirs_or_results, dict) and run_dirs_or_results.get("ablation"):
        md += _ablation_section(methods, run_dirs_or_results["ablation"], run_dirs_or_results.get("joint"))
    md += _alpha_curves_section(alpha_curves, out)
    if isinstance(run_dirs_or_results, dict):
        md += _timing_section(run_dirs_or_results.get("timing"))
        md += _then_section(run_dirs_or_results.get("then"), out)
    report = out / "REPORT.md"
    report.write_text("\n".join(md))
    return report
