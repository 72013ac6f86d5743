"""Appends one markdown row per benchmark of a pytest-benchmark JSON file to
bench/RESULTS.md: date, device, benchmark, shape, median, ratio to its group's
baseline (the test whose name says unfused / baseline / clip_bp, measured in the same run).

    python bench/results_table.py .benchmarks/<machine>/0001_cpu.json [--device "…"] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform


def _device(info: dict) -> str:
    cpu = info.get("cpu", {})
    return f"{cpu.get('brand_raw', platform.processor() or 'CPU')} ({cpu.get('count', '?')} logical cores)"


def rows(path: str, device: str | None) -> list[str]:
    data = json.load(open(path))
    device = device or _device(data.get("machine_info", {}))
    date = data.get("datetime", datetime.datetime.now().isoformat())[:10]
    groups: dict[str, list] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    out = []
    for group, benches in groups.items():
        base = next((b for b in benches if any(w in b["name"] for w in ("unfused_per_tap", "unfused", "baseline",
                                                                         "clip_bp", "eager"))), None)
        for b in benches:
            median = b["stats"]["median"]
            ratio = f"{base['stats']['median'] / median:.2f}x" if base is not None else "–"
            extra = b.get("extra_info", {})
            shape = extra.get("shape", "")
            more = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()
                             if k in ("frames_per_s", "threads", "ms_per_tick", "peak_mib", "tflops"))
            out.append(f"| {date} | {device} | {group} | {b['name']} | {shape} | {median * 1e3:.2f} ms | {ratio} | {more} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/RESULTS.md")
    args = p.parse_args()
    lines = rows(args.json, args.device)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
