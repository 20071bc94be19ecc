#!/usr/bin/env python3
"""Turns `herald-bench --json` outputs into SVG line charts (standard library only).

    herald-bench --workload steady --rates 200,1000,3000 --json > steady-sqlite.json
    python3 scripts/charts.py --out docs/charts steady-sqlite.json steady-postgres.json ...

Charts (each written when the inputs hold at least one point of it), one line per input file
(labelled by its backend and agents), y = control-plane CPU seconds per 1,000 deliveries
(plus the PostgreSQL backends' CPU where measured):
  cost-vs-rate.svg     steady runs (`steady` or `steady@N` of a --rates sweep), x = rate/s
  cost-vs-backlog.svg  backlog runs, x = deliveries in the backlog
  cost-vs-tenants.svg  tenants runs, x = tenants
"""

import argparse
import json
import pathlib
import sys
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def cost(median):
    """CPU s per 1,000 deliveries: control plane, plus agents' and database's where measured."""
    total = median["control_plane_cpu_s_per_1k"]
    for key in ("agents_cpu_s_per_1k", "database_cpu_s_per_1k"):
        if median.get(key) is not None:
            total += median[key]
    return total


def points(report, workload, x_of):
    """(x, y) of every workload report of `workload` in one `--json` output."""
    found = []
    for w in report["workloads"]:
        if w["workload"] == workload:
            x = x_of(w)
            if x is not None:
                found.append((x, cost(w["median"])))
    return sorted(found)


def series_name(report, path):
    agents = "built-in agent" if report.get("agents", 0) == 0 else f"{report['agents']} agents"
    return f"{report['backend']}, {agents} ({path.name})"


def ticks(high, count=5):
    """Round tick values from 0 to at least `high`."""
    if high <= 0:
        return [0, 1]
    raw = high / count
    magnitude = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 10 ** -len(str(int(1 / raw)))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    values = [0.0]
    while values[-1] < high:
        values.append(round(values[-1] + step, 6))
    return values


def line_chart(title, x_label, y_label, series):
    """SVG text of a line chart; `series` is [(name, [(x, y), ...])]."""
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x_ticks, y_ticks = ticks(max(xs)), ticks(max(ys))
    x_max, y_max = x_ticks[-1] or 1, y_ticks[-1] or 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x):
        return LEFT + plot_w * x / x_max

    def py(y):
        return TOP + plot_h * (1 - y / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    for t in y_ticks:
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in x_ticks:
        out.append(f'<text x="{px(t):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="black"/>')
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}" stroke="black"/>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 22}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    for i, (name, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"><title>{x:g}: {y:.3f}</title></circle>')
        out.append(f'<text x="{LEFT + 10}" y="{TOP + 14 + 16 * i}" fill="{colour}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def steady_rate(w):
    return w["spec"].get("rate_per_s")


CHARTS = [
    ("cost-vs-rate.svg", "steady", steady_rate, "Cost per delivery against rate", "publishes per second (open loop)"),
    ("cost-vs-backlog.svg", "backlog", lambda w: w["spec"]["events"] * w["spec"]["subscriptions"],
     "Cost per delivery against backlog size (drain)", "deliveries in the backlog"),
    ("cost-vs-tenants.svg", "tenants", lambda w: w["spec"].get("tenants"),
     "Cost per delivery against tenant count", "tenants"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=pathlib.Path, help="herald-bench --json outputs")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/charts"))
    args = parser.parse_args()
    reports = []
    for path in args.inputs:
        try:
            reports.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            sys.exit(f"charts.py: {path}: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    for file, workload, x_of, title, x_label in CHARTS:
        series = [(series_name(r, p), points(r, workload, x_of)) for p, r in reports]
        series = [(name, pts) for name, pts in series if pts]
        if not series:
            continue
        svg = line_chart(title, x_label, "CPU s per 1,000 deliveries", series)
        (args.out / file).write_text(svg)
        print(f"charts.py: wrote {args.out / file}")


if __name__ == "__main__":
    main()
