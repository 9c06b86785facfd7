"""The tables of docs/REPRODUCTION.md from the JSON that docs/reproduce.dql prints:

    diagql --demo --format json docs/reproduce.dql > reproduce.json
    python benchmarks/reproduction_tables.py reproduce.json

Prints Markdown: Figure 4's S1/S2/S3 against size (the sample's own answers, then the
model-assisted ones), Figure 5's S1 against k, Figure 6's S1/S2/S3 against j, and Figure 7 /
Table IV's items and time to draw.
"""
from __future__ import annotations

import argparse
import json
import math

METRICS = (("S1", "S1, top-10 precision ↑"), ("S2", "S2, cosine distance ↓"),
           ("S3", "S3, Jensen-Shannon distance ↓"))


def statements(text: str) -> list[dict]:
    """The JSON objects of a script's results, printed one after another."""
    decoder, at, found = json.JSONDecoder(), 0, []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return found
        result, at = decoder.raw_decode(text, at)
        found.append(result)


def records(result: dict) -> list[dict]:
    return [dict(zip(result["columns"], row)) for row in result["rows"]]


def _cell(mean: float | None, sd: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    # A sampler that draws the same sample for every seed has no spread to show.
    return f"{mean:.3f}" if not sd else f"{mean:.3f} ±{sd:.3f}"


def _label(row: dict, ebtree_note: bool = False) -> str:
    name = f"`{row['sampler']}`"
    if ebtree_note and row["size"] is None:
        return f"{name} ({row['items']:.0f} items ≈ {row['items'] / 2500:.1%})"
    return name


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by_sampler(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["sampler"], []).append(row)
    return grouped


def figure4(result: dict) -> str:
    rows = records(result)
    sizes = sorted({r["size"] for r in rows if r["size"] is not None})
    out = []
    for key, title in METRICS:
        for assisted in (False, True):
            column = f"{key} assisted" if assisted else key
            body = []
            for mine in _by_sampler(rows).values():
                at = {r["size"]: r for r in mine}
                first = mine[0]
                cells = [_cell(at[s][column], None if assisted else at[s][f"{key} sd"])
                         if s in at else "" for s in sizes]
                if first["size"] is None:  # ebtree: one sample of its own size
                    cells = [_cell(first[column], None if assisted else first[f"{key} sd"])] + \
                        [""] * (len(sizes) - 1)
                body.append([_label(first, ebtree_note=True)] + cells)
            name = title + (" (model-assisted answers)" if assisted else "")
            out.append(_table([name] + [f"{s:.0%}" for s in sizes], body))
    return "\n\n".join(out)


def figure5(result: dict) -> str:
    rows = records(result)
    ks = sorted({r["k"] for r in rows})
    body = []
    for mine in _by_sampler(rows).values():
        at = {r["k"]: r for r in mine}
        body.append([_label(mine[0])] + [_cell(at[k]["S1"], at[k]["S1 sd"]) for k in ks])
    return _table(["sampler (5%)"] + [f"k = {k}" for k in ks], body)


def figure6(result: dict) -> str:
    rows = records(result)
    js = sorted({r["j"] for r in rows if r["j"] is not None})
    out = []
    for key, _ in METRICS:
        body = []
        for mine in _by_sampler(rows).values():
            if mine[0]["j"] is None:  # no j: the same value across the sweep
                body.append([_label(mine[0]) + " (no j)"]
                            + [_cell(mine[0][key], mine[0][f"{key} sd"])] * len(js))
                continue
            at = {r["j"]: r for r in mine}
            body.append([_label(mine[0])] + [_cell(at[j][key], at[j][f"{key} sd"]) for j in js])
        out.append(_table([f"{key} (5%)"] + [f"j = {j:g}" for j in js], body))
    return "\n\n".join(out)


def figure7(result: dict) -> str:
    body = []
    for row in records(result):
        items = f"{row['items']:g}"
        body.append([_label(row), items, f"{row['correct']:g}", f"{row['incorrect']:g}",
                     f"{row['seconds'] * 1000:.3g} ms"])
    return _table(["sampler (5%)", "items", "correct", "incorrect",
                   "time to draw (median of 10)"], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the output of `diagql --demo --format json docs/reproduce.dql`")
    args = parser.parse_args()
    with open(args.json, encoding="utf-8") as handle:
        found = [r for r in statements(handle.read()) if r.get("kind") == "evaluation"]
    if len(found) != 4:
        raise SystemExit(f"expected docs/reproduce.dql's 4 EVALUATE results, found {len(found)}")
    for title, make, result in zip(("Figure 4", "Figure 5", "Figure 6", "Figure 7 and Table IV"),
                                   (figure4, figure5, figure6, figure7), found):
        print(f"## {title}\n\n{make(result)}\n")


if __name__ == "__main__":
    main()
