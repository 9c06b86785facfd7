"""Figures like the paper's from an EVALUATE SAMPLERS result (its Figures 4 to 7), a
SIMILARITY result's heat map, and the grid of a TOPK k INPUTS answer's items, to a file.

matplotlib is optional (``pip install "diagql[plot]"``) and imported here on first use. The
figure is drawn on its own Agg canvas, without pyplot, so no global backend is changed.

What is drawn follows what the statement varied: S1/S2/S3 against j (SWEEP j: Figure 6, other
samplers as dashed lines), else S1 against k (several K: Figure 5), else S1/S2/S3 against the
sample size (several sizes: Figure 4), else bars per sampler; and beside them the time to draw
a sample (Figure 7).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from diagql.errors import BindError, DiagQLError, ExecutionError
from diagql.results.formats import group_label
from diagql.results.metrics import METRICS, PRECISION

INSTALL = 'pip install "diagql[plot]"'
_METRICS = {m.paper: m for m in METRICS}  # by EVALUATE's column name: S1, S2, S3
_MARKERS = "os^Dv<>pP*Xh"
# Lines of one sampler at several sizes differ by style ("--" is kept for Figure 6's samplers
# without j).
_SIZE_STYLES = ["-", ":", "-.", (0, (6, 2, 1, 2, 1, 2))]
_ACROSS = 6  # SIMILARITY heat maps in a row of the figure
_HEAT_MAPS = 24  # groups drawn at most (CSV and to_dict() hold them all)


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DiagQLError(f"plots need matplotlib, which is not installed: {INSTALL}") from None
    return Figure, FigureCanvasAgg


def check_target(path: str, span=None) -> None:
    """Refuse a file that cannot be written before any work is done (BindError, placed at
    ``span``, the PLOT clause's file name, when a statement gave it)."""
    Figure, FigureCanvasAgg = _figure_class()
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    types = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix not in types:
        raise _refusal(f"cannot plot to {path!r}: name a file ending in .png, .pdf or .svg "
                       f"(matplotlib writes {', '.join('.' + t for t in sorted(types))})", span)
    if not target.parent.is_dir():
        what = "is a file, not a directory" if target.parent.exists() else "does not exist"
        raise _refusal(f"cannot plot to {path!r}: {str(target.parent)!r} {what}", span)
    if target.is_dir():  # it had failed only as it was written, the statement's status 0
        raise _refusal(f"cannot plot to {path!r}: it is a directory; name a file in it", span)


def _refusal(message: str, span) -> BindError:
    if span is None:
        return BindError(message)
    end = span.end_column if span.end_line == span.line else None
    return BindError(message, line=span.line, column=span.column, end_column=end)


def write_noted(result, path: str, write=None) -> None:
    """Write ``result``'s figure to ``path`` with ``write`` (``write_plot`` by default) and
    note on it that it was written, or why not: the answer is shown all the same (a file
    that fails only as it is written, /proc or a full disk, had thrown the answer away)."""
    try:
        (write or write_plot)(result, path)
    except ExecutionError as exc:
        result.notes.append(f"no plot: {exc.message}")
    else:
        result.notes.append(f"plot written to {path}")


def write_plot(result, path: str) -> None:
    """Draw the evaluation or similarity ``result`` (or a TOPK k INPUTS answer's items) and
    save it to ``path`` (the format from its suffix)."""
    figure = draw_inputs(result) if result.ranked is not None else draw(result)
    try:
        # Small files (a docs figure stays under 200 KB); the bounding box grown to hold every
        # label: a heat map's long layer names ("enc.layers.1.linear1 TOKENS MEAN") were cut.
        figure.savefig(path, dpi=85, bbox_inches="tight")
    except OSError as exc:
        raise ExecutionError(f"cannot write the plot to {path!r}: {exc.strerror or exc}") from None


def draw(result):
    """The matplotlib Figure for an evaluation or similarity result."""
    Figure, FigureCanvasAgg = _figure_class()
    if result.kind == "similarity":
        return _similarity_figure(result, Figure, FigureCanvasAgg)
    if result.kind != "evaluation":
        raise DiagQLError(f"only EVALUATE SAMPLERS and SIMILARITY results can be plotted, not "
                          f"{result.kind!r}")
    rows = result.records()
    n = max(result.n_items, 1)
    ks = sorted({r["k"] for r in rows})
    k_ref = 10 if 10 in ks else ks[0]
    colors = _colors([r["sampler"] for r in rows])
    j_swept = any(len({r["j"] for r in rows if r["sampler"] == s}) > 1 for s in colors)
    sizes = {_x_size(r, n) for r in rows if r["size"] is not None}
    panels = []
    if j_swept:
        panels += [(_against_j, m) for m in _METRICS]
    elif len(ks) > 1:
        panels.append((_against_k, PRECISION.paper))
    elif len(sizes) > 1:
        panels += [(_against_size, m) for m in _METRICS]
    else:
        panels += [(_bars, m) for m in _METRICS]
    panels.append((_draw_times, None))
    grid = (2, 2) if len(panels) == 4 else (1, len(panels))  # four panels read better square
    figure = Figure(figsize=(5.6 * grid[1], 4.2 * grid[0] + 0.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(*grid, squeeze=False).ravel()
    handles = {}
    for ax, (panel, metric) in zip(axes, panels):
        panel(ax, rows, metric, k_ref=k_ref, n=n, colors=colors, handles=handles)
        ax.grid(True, alpha=0.3)
    width = int(5.6 * grid[1] * 11)  # characters of the title that fit on a line
    title = textwrap.fill(textwrap.shorten(result.statement, 3 * width), width)
    figure.suptitle(f"{title}\n({result.n_items:,} items)", fontsize=10)
    columns = min(len(handles), max(2, int(5.6 * grid[1] / 2.8)))
    figure.legend(list(handles.values()), list(handles), loc="lower center", frameon=False,
                  ncol=columns, fontsize=9)
    rows_of_legend = -(-len(handles) // columns)
    # tight_layout keeps clear of the suptitle by itself; the legend needs the bottom strip.
    legend_height = (0.25 + 0.22 * rows_of_legend) / figure.get_figheight()
    figure.tight_layout(rect=(0, legend_height, 1, 1))
    return figure


def draw_inputs(result):
    """A TOPK k INPUTS answer as a grid of its items, best first: each image with its item,
    label, prediction and activation; a text item as its tokens."""
    Figure, FigureCanvasAgg = _figure_class()
    ranked, n = result.ranked, len(result.items)
    columns = min(max(n, 1), 8)
    rows = max(-(-n // columns), 1)
    figure = Figure(figsize=(1.6 * columns, 2.1 * rows + 0.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    names = result.class_names or []

    def named(c) -> str:  # a class by its name where the classes have names
        return names[int(c)] if 0 <= int(c) < len(names) else str(int(c))

    for j, ax in enumerate(axes):
        ax.set_axis_off()
        if j >= n:
            continue
        preview = ranked.previews[j] if j < len(ranked.previews) else None
        label = "" if ranked.labels is None else f"y={named(ranked.labels[j])} "
        title = (f"#{j + 1} item {int(result.items[j])}\n{label}pred={named(ranked.predictions[j])}"
                 f"\n{float(result.values[j]):.4g}")
        if isinstance(preview, list):
            ax.text(0, 1, textwrap.fill(" ".join(preview), 22), va="top", fontsize=7,
                    family="monospace", transform=ax.transAxes)
        elif preview is not None:
            from diagql.results.html import gray_or_rgb

            # Over its own range, as the HTML's: normalised or 0..255 float RGB was clipped
            # to 0..1 (noise, or white).
            ax.imshow(gray_or_rgb(preview), cmap="gray" if preview.ndim == 2 else None,
                      interpolation="nearest")
        ax.set_title(title, fontsize=8)
    end = "highest" if ranked.largest else "lowest"
    figure.suptitle(f"the items of {end} {ranked.neuron} ({result.n_items:,} matching)",
                    fontsize=10)
    figure.tight_layout()
    return figure


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    names = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: (cmap(i % cmap.N), _MARKERS[i % len(_MARKERS)]) for i, name in enumerate(names)}


def _x_size(row, n: int) -> float:
    """A row's sample size as a fraction of the data (ebtree's own size: its items / N)."""
    size = row["size"]
    if size is None:
        return row["items"] / n
    return float(size) if isinstance(size, float) else size / n


def _size_label(row) -> str:
    # As the table writes it: a whole percent had made AT 0.01 and 0.014 both "1%".
    from diagql.results.render import sample_size_text

    return "own size" if row["size"] is None else sample_size_text(row["size"])


def _line(ax, rows, x_key, metric, label, color, marker, handles, style="-"):
    rows = sorted(rows, key=x_key)
    xs = [x_key(r) for r in rows]
    ys = [r[metric] for r in rows]
    sds = [r[f"{metric} sd"] for r in rows]
    (line,) = ax.plot(xs, ys, color=color, marker=marker, markersize=5, linewidth=1.5,
                      linestyle=style)
    if any(sds) and len(xs) > 1:
        ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)],
                        color=color, alpha=0.15, linewidth=0)
    handles.setdefault(label, line)


def _title(metric: str, k: int | None = None) -> str:
    """A panel's title, e.g. S1: top-10 precision ↑ (without k: top-k precision)."""
    m = _METRICS[metric]
    name = m.name.replace("top-k", f"top-{k}") if k is not None else m.name
    return f"{m.paper}: {name} {m.arrow}"


def _metric_axes(ax, metric: str, k_ref: int, xlabel: str) -> None:
    ax.set_title(_title(metric, k_ref), fontsize=10)
    ax.set_xlabel(xlabel)
    if metric == PRECISION.paper:  # a share, in [0, 1]
        ax.set_ylim(-0.02, 1.02)
    else:
        ax.set_ylim(bottom=0)


def _against_size(ax, rows, metric, *, k_ref, n, colors, handles):
    """Figure 4: each metric against the sample size; ebtree (own size) is one marker."""
    for sampler, (color, marker) in colors.items():
        mine = [r for r in rows if r["sampler"] == sampler and r["k"] == k_ref]
        _line(ax, mine, lambda r: _x_size(r, n), metric, sampler, color, marker, handles)
    _metric_axes(ax, metric, k_ref, "sample size (fraction of the data)")


def _against_k(ax, rows, metric, *, k_ref, n, colors, handles):
    """Figure 5: S1 against k, one line per sampler (and size)."""
    several = len({_x_size(r, n) for r in rows if r["size"] is not None}) > 1
    for sampler, (color, marker) in colors.items():
        for i, size in enumerate(sorted({_x_size(r, n) for r in rows if r["sampler"] == sampler})):
            mine = [r for r in rows if r["sampler"] == sampler and _x_size(r, n) == size]
            label = f"{sampler} @ {_size_label(mine[0])}" if several else sampler
            _line(ax, mine, lambda r: r["k"], metric, label, color, marker, handles,
                  _SIZE_STYLES[i % len(_SIZE_STYLES)])
    ax.set_title(_title(metric), fontsize=10)
    ax.set_xlabel("k (top-k neurons)")
    ax.set_ylim(-0.02, 1.02)


def _against_j(ax, rows, metric, *, k_ref, n, colors, handles):
    """Figure 6: each metric against j; samplers without j are dashed horizontal lines."""
    rows = [r for r in rows if r["k"] == k_ref]
    js = sorted({r["j"] for r in rows if r["j"] is not None})
    several = len({_x_size(r, n) for r in rows if r["size"] is not None}) > 1
    for sampler, (color, marker) in colors.items():
        for i, size in enumerate(sorted({_x_size(r, n) for r in rows if r["sampler"] == sampler})):
            mine = [r for r in rows if r["sampler"] == sampler and _x_size(r, n) == size]
            label = f"{sampler} @ {_size_label(mine[0])}" if several else sampler
            if len({r["j"] for r in mine}) > 1:
                _line(ax, mine, lambda r: r["j"], metric, label, color, marker, handles,
                      _SIZE_STYLES[i % len(_SIZE_STYLES)])
            else:
                flat = [{**mine[0], "j": j} for j in (js[0], js[-1])]
                _line(ax, flat, lambda r: r["j"], metric, label, color, None, handles, "--")
    _metric_axes(ax, metric, k_ref, "j (share of boundary items)")


def _bars(ax, rows, metric, *, k_ref, n, colors, handles):
    """One sample size: a bar per sampler."""
    mine = [r for r in rows if r["k"] == k_ref]
    for i, r in enumerate(mine):
        color, _ = colors[r["sampler"]]
        bar = ax.bar(i, r[metric], yerr=r[f"{metric} sd"] or None, color=color, capsize=3)
        handles.setdefault(r["sampler"], bar)
    ax.set_xticks([])
    size = next((_size_label(r) for r in mine if r["size"] is not None), "")
    _metric_axes(ax, metric, k_ref, f"sample size {size}" if size else "")


def _draw_times(ax, rows, metric, *, k_ref, n, colors, handles):
    """Figure 7: the median time to draw one sample, at the smallest size, log scale."""
    smallest = min((_x_size(r, n) for r in rows if r["size"] is not None), default=None)
    shown = []
    for sampler, (color, _) in colors.items():
        mine = [r for r in rows if r["sampler"] == sampler]
        at = [r for r in mine if r["size"] is None or _x_size(r, n) == smallest] or mine
        shown.append((sampler, max(at[0]["seconds"], 1e-6), color))
    first = not handles  # else the other panels' lines already name every colour
    for i, (sampler, seconds, color) in enumerate(shown):
        bar = ax.bar(i, seconds, color=color)
        if first:
            handles.setdefault(sampler, bar)
    ax.set_yscale("log")
    # Whole decades, so that the bars' heights compare (a log axis has no zero to start from).
    low, high = min(s for _, s, _ in shown), max(s for _, s, _ in shown)
    ax.set_ylim(10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high) + 1e-9))
    ax.set_xticks([])
    where = f" at {smallest:.0%}" if smallest is not None else ""
    ax.set_title(f"time to draw a sample{where} (s, log)", fontsize=10)


def _similarity_figure(result, Figure, FigureCanvasAgg):
    """SIMILARITY: one heat map per group (and the exact one beside a sample's), each cell
    annotated with its CKA; rows and columns in the order the layers were given."""
    import numpy as np

    parts = list(result.groups.items()) if result.groups is not None else [(None, result)]
    panels = []
    for key, part in parts[:_HEAT_MAPS]:
        # The class's name beside its number where the classes have names, as the table shows.
        group = "" if key is None else f"{result.provenance.group_by} = " + group_label(
            key, result.provenance.group_by, getattr(result, "class_names", None))
        panels.append((group or ("sample" if result.approximate else ""), part.matrix))
        if part.baseline is not None:
            panels.append((f"{group}, exact" if group else "exact", part.baseline.matrix))
    size = len(result.labels)
    side = 1.2 + 0.75 * size
    # Rows of at most _ACROSS panels (a sample's and its exact one side by side): a hundred
    # groups in one row made an image 15,000 pixels wide.
    pairs = 2 if any(part.baseline is not None for _, part in parts) else 1
    columns = min(len(panels), max(pairs, _ACROSS // pairs * pairs))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(side * columns + 1.0, side * rows + 0.9))
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False).ravel()
    for spare in grid[len(panels):]:
        figure.delaxes(spare)
    axes = grid[:len(panels)]
    image = None
    for ax, (title, matrix) in zip(axes, panels):
        matrix = np.full((size, size), np.nan) if matrix is None else matrix
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(range(size), result.labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(size), result.labels, fontsize=8)
        for i in range(size):
            for j in range(size):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if matrix[i, j] > 0.6 else "black")
        ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=list(axes), shrink=0.8, label=f"linear {result.unit.upper()}")
    title = textwrap.shorten(result.statement, 90)
    drawn = f"; {_HEAT_MAPS} of its {len(parts):,} groups drawn" if len(parts) > _HEAT_MAPS \
        else ""
    figure.suptitle(f"{title}\n({result.n_items:,} items{drawn})", fontsize=9)
    return figure
