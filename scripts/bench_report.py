#!/usr/bin/env python3
"""Turns the RESULT lines of scripts/bench.sh into a Markdown table and two
SVG plots (no dependencies beyond the standard library).

    python3 scripts/bench_report.py docs/bench/results.txt docs/bench
"""

import statistics
import sys
from collections import defaultdict
from pathlib import Path


def parse(path):
    """The first `# ` line is the header; later ones are notes."""
    header, rows = [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("# "):
            header.append(line[2:])
        if not line.startswith("RESULT "):
            continue
        row = {}
        for field in line.split()[1:]:
            key, _, value = field.partition("=")
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = value
        rows.append(row)
    return header, rows


def spread(values):
    """min / median / max of the numbers among `values`."""
    values = sorted(v for v in values if isinstance(v, float))
    if not values:
        return "–"
    fmt = (lambda v: f"{v:,.0f}") if values[-1] >= 100 else (lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}")
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(values[0])} / **{fmt(statistics.median(values))}** / {fmt(values[-1])}"


def median(values):
    values = [v for v in values if isinstance(v, float)]
    return statistics.median(values) if values else None


def table(rows):
    by = defaultdict(list)
    for r in rows:
        by[r.get("label", "?")].append(r)
    out = []

    def col(label, key):
        return spread([r.get(key) for r in by.get(label, [])])

    # The burst runs that took place, and the delivery each measured.
    bursts = [(label, name) for label, name in (("burst", "exactly once"), ("burst-alo", "at least once")) if by.get(label)]

    out.append("### Throughput (burst: as many sagas as go)\n")
    out.append("min / **median** / max over the runs; the baseline ran in the same runs.\n")
    out.append("| delivery | engine sagas/s | baseline sagas/s | ratio | engine p99 ms | client CPU µs/saga | RSS MB |")
    out.append("|---|---|---|---|---|---|---|")
    for label, name in bursts:
        out.append(
            f"| {name} | {col(label, 'sagas_per_s')} | {col(label, 'baseline_sagas_per_s')} | "
            f"{col(label, 'baseline_ratio')} | {col(label, 'p99_ms')} | {col(label, 'cpu_us_per_saga')} | {col(label, 'rss_mb')} |"
        )
    if any(isinstance(r.get("broker_cpu_us_per_saga"), float) for label, _ in bursts for r in by[label]):
        out.append("\n### Where a saga's CPU goes (burst)\n")
        out.append("The client is this process; the broker shares the machine's cores with it. Bytes are the keys and values written per saga, every record.\n")
        out.append("| delivery | side | client CPU µs/saga | broker CPU µs/saga | bytes/saga |")
        out.append("|---|---|---|---|---|")
        for label, name in bursts:
            out.append(
                f"| {name} | engine | {col(label, 'cpu_us_per_saga')} | {col(label, 'broker_cpu_us_per_saga')} | {col(label, 'bytes_per_saga')} |"
            )
            out.append(
                f"| {name} | baseline | {col(label, 'baseline_cpu_us_per_saga')} | {col(label, 'baseline_broker_cpu_us_per_saga')} | {col(label, 'baseline_bytes_per_saga')} |"
            )
    if by.get("fixed-1000"):
        rs = by["fixed-1000"]
        out.append("\n### Latency at a fixed 1,000 sagas/s (exactly once)\n")
        out.append("From the moment a saga is due to the moment its completion event is read.\n")
        out.append("| | p50 ms | p95 ms | p99 ms | max ms | p99 / baseline p99 | client CPU µs/saga |")
        out.append("|---|---|---|---|---|---|---|")
        out.append(
            f"| engine | {col('fixed-1000', 'p50_ms')} | {col('fixed-1000', 'p95_ms')} | {col('fixed-1000', 'p99_ms')} | "
            f"{col('fixed-1000', 'max_ms')} | {spread([r['p99_ms'] / r['baseline_p99_ms'] for r in rs if isinstance(r.get('baseline_p99_ms'), float) and r['baseline_p99_ms'] > 0])} | "
            f"{col('fixed-1000', 'cpu_us_per_saga')} |"
        )
        out.append(f"| baseline | | | {col('fixed-1000', 'baseline_p99_ms')} | | | |")
    sweep = sorted((r for r in rows if str(r.get("label", "")).startswith("sweep-")), key=lambda r: r["sagas"])
    if sweep:
        out.append("\n### Rate sweep (exactly once, one run each)\n")
        out.append("| asked sagas/s | engine sagas/s | engine p50 ms | engine p99 ms | baseline sagas/s | baseline p99 ms |")
        out.append("|---|---|---|---|---|---|")
        for r in sweep:
            asked = r["label"].split("-", 1)[1]
            num = lambda v, f: format(v, f) if isinstance(v, float) else "–"
            out.append(
                f"| {asked} | {r['sagas_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{num(r.get('baseline_sagas_per_s'), ',.0f')} | {num(r.get('baseline_p99_ms'), '.1f')} |"
            )
    if by.get("scale-1") and by.get("scale-2"):
        one, two = median([r["sagas_per_s"] for r in by["scale-1"]]), median([r["sagas_per_s"] for r in by["scale-2"]])
        out.append("\n### Instances (burst, 6 partitions, exactly once)\n")
        out.append("| instances | sagas/s | client CPU µs/saga |")
        out.append("|---|---|---|")
        out.append(f"| 1 | {col('scale-1', 'sagas_per_s')} | {col('scale-1', 'cpu_us_per_saga')} |")
        out.append(f"| 2 | {col('scale-2', 'sagas_per_s')} | {col('scale-2', 'cpu_us_per_saga')} |")
        if one:
            out.append(f"\nTwo instances / one: **{two / one:.2f}** (medians).")
    if by.get("inflight"):
        rs = by["inflight"]
        out.append("\n### Memory and restore\n")
        out.append("Sagas left in flight (their participant is not running), then restored by a fresh process: the time runs from registering the saga to serving every partition (group join included).\n")
        out.append("| sagas in flight | bytes per in-flight saga | restore s | restore peak MB | steady MB | peak / steady |")
        out.append("|---|---|---|---|---|---|")
        out.append(
            f"| {rs[0]['sagas']:,.0f} | {col('inflight', 'bytes_per_inflight_saga')} | {col('inflight', 'restore_s')} | "
            f"{col('inflight', 'restore_peak_mb')} | {col('inflight', 'steady_mb')} | {col('inflight', 'peak_ratio')} |"
        )
    return "\n".join(out) + "\n"


def svg_frame(width, height, title, xlabel, ylabel):
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">{xlabel}</text>',
        f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">{ylabel}</text>',
    ]


def nice_max(v):
    if v <= 0:
        return 1
    mag = 10 ** len(str(int(v))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= v:
            return m * mag
    return v


def latency_svg(rows):
    sweep = sorted((r for r in rows if str(r.get("label", "")).startswith("sweep-")), key=lambda r: r["sagas"])
    if not sweep:
        return None
    series = {
        "saga engine": [(r["sagas_per_s"], r["p99_ms"]) for r in sweep],
        "bare rdkafka pipeline": [
            (r["baseline_sagas_per_s"], r["baseline_p99_ms"])
            for r in sweep
            if isinstance(r.get("baseline_sagas_per_s"), float) and isinstance(r.get("baseline_p99_ms"), float)
        ],
    }
    W, H, L, R, T, B = 640, 400, 70, 20, 40, 50
    xmax = nice_max(max(x for s in series.values() for x, _ in s))
    ymax = nice_max(max(y for s in series.values() for _, y in s))
    sx = lambda x: L + (W - L - R) * x / xmax
    sy = lambda y: H - B - (H - T - B) * y / ymax
    out = svg_frame(W, H, "p99 latency against throughput (exactly once, fixed rates)", "sagas per second", "p99 latency, ms")
    for i in range(6):
        x, y = xmax * i / 5, ymax * i / 5
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        out.append(f'<text x="{sx(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:,.0f}</text>')
    out.append(f'<polyline points="{L},{T} {L},{H - B} {W - R},{H - B}" fill="none" stroke="black"/>')
    for (name, pts), color in zip(series.items(), ("#1f77b4", "#ff7f0e")):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>')
        ly = T + 10 + 18 * list(series).index(name)
        out.append(f'<rect x="{L + 14}" y="{ly - 9}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{L + 32}" y="{ly + 1}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def scaling_svg(rows):
    groups = [(n, [r["sagas_per_s"] for r in rows if r.get("label") == f"scale-{n}"]) for n in (1, 2)]
    groups = [(n, v) for n, v in groups if v]
    if not groups:
        return None
    W, H, L, R, T, B = 420, 320, 70, 20, 40, 50
    ymax = nice_max(max(max(v) for _, v in groups))
    sy = lambda y: H - B - (H - T - B) * y / ymax
    out = svg_frame(W, H, "Sagas per second by instances (6 partitions)", "orchestrator instances", "sagas per second")
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
    slot = (W - L - R) / len(groups)
    for i, (n, values) in enumerate(groups):
        cx = L + slot * (i + 0.5)
        med = statistics.median(values)
        out.append(f'<rect x="{cx - 30:.1f}" y="{sy(med):.1f}" width="60" height="{sy(0) - sy(med):.1f}" fill="#1f77b4"/>')
        out.append(f'<line x1="{cx:.1f}" y1="{sy(min(values)):.1f}" x2="{cx:.1f}" y2="{sy(max(values)):.1f}" stroke="black"/>')
        out.append(f'<text x="{cx:.1f}" y="{H - B + 16}" text-anchor="middle">{n}</text>')
        out.append(f'<text x="{cx:.1f}" y="{sy(med) - 6:.1f}" text-anchor="middle">{med:,.0f}</text>')
    out.append(f'<polyline points="{L},{T} {L},{H - B} {W - R},{H - B}" fill="none" stroke="black"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: bench_report.py RESULTS_FILE OUT_DIR")
    header, rows = parse(sys.argv[1])
    if not rows:
        sys.exit(f"{sys.argv[1]}: no RESULT lines")
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    notes = "".join(f"\n> {n}\n" for n in header[1:])
    first = header[0] if header else ""
    md = f"<!-- generated by scripts/bench_report.py from results.txt -->\n## Kafka benchmark\n\n{first}\n{notes}\n" + table(rows)
    (out / "results.md").write_text(md)
    for name, svg in (("latency.svg", latency_svg(rows)), ("scaling.svg", scaling_svg(rows))):
        if svg:
            (out / name).write_text(svg)


if __name__ == "__main__":
    main()
