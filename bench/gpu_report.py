"""Turns the rows bench/bench_gpu.py appended (JSON lines) into what a GPU run leaves behind:

* markdown tables for bench/RESULTS.md — per op and shape: each implementation's time, TFLOP/s,
  fraction of the bf16 matmul ceiling measured in the same run, ratio to the faster cuDNN layout
  (NCDHW or channels_last_3d), the Triton config the autotuner picked; the graph tick vs the
  eager one; end-to-end frames/s and peak memory per network, clip length, backend and graphs,
  each against clip BP's at the same network and length;
* a dispatch table (sideways_kernels/dispatch.json plus this GPU's measured entry: per op, the
  fastest of the torch backend (cuDNN), the CUDA and the Triton kernels by geometric mean over
  the shapes) to review and commit.

Works on partial rows (a run cut short): what was measured is reported, the rest is absent.

    python bench/gpu_report.py rows.jsonl --device "NVIDIA H100" [--dispatch out/dispatch.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OP_NAMES = {"forward": "ring_conv_forward", "input_grad": "window_input_grad",
            "weight_accumulate": "weight_grad_accumulate", "weight_sgd": "sgd_tick_update",
            "bias_grad": "bias_grad"}  # a part of the weight ops: ATen's sum (torch) or Triton's
CUDNN = ("cudnn_ncdhw", "cudnn_cl")  # cuDNN called directly on the window, in either layout
BACKENDS = ("torch", "cuda", "triton")  # what the default dispatch chooses among per op
GOALS = {"forward": 1.0, "input_grad": 1.0, "weight_accumulate": 1.3, "weight_sgd": 1.3}  # issue 12's targets


def geometry(shape) -> dict:
    """A row's ``shape``, [C_in, C_out, B, H(=W)] of a 3x3x3 stride-1 layer, or those and [kt, kh,
    kw, spatial stride] of another (``bench_gpu.OTHER_SHAPES``): the kernel and stride a dispatch
    row names for it (``backend.Layer``'s fields; none for the former, its defaults)."""
    if len(shape) == 4:
        return {}
    *kernel, stride = shape[4:]
    return dict(kernel=list(kernel), stride=[stride, stride])


def label(shape) -> str:
    g = geometry(shape)
    kernel = f", k{'x'.join(map(str, g['kernel']))} s{g['stride'][0]}" if g else ""
    return f"{shape[0]}→{shape[1]}, B{shape[2]}, {shape[3]}{kernel}"


def load(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a timeout
                    pass
    return rows


def tables(rows: list[dict], device: str) -> list[str]:
    date = datetime.date.today().isoformat()
    ceiling = next((r["tflops"] for r in rows if r["kind"] == "ceiling"), None)
    out = [f"### {device}, {date} (`bench/run_gpu.sh`)", ""]
    out.append(f"bf16 matmul ceiling measured in this run: "
               f"{f'{ceiling:.0f} TFLOP/s' if ceiling else 'not measured'}.")
    out += ["", "ms: one call as a user makes it (host work included); graph ms: its GPU time alone (calls "
            "replayed from a CUDA graph). torch: the torch backend's op (cuDNN on the ring, as the pipeline calls it); "
            "for bias_grad, ATen's sum, which its ratios are against.",
            "", "| op | shape (C_in→C_out, B, H=W; kernel and stride if not 3x3x3, 1) | impl | ms | TFLOP/s | % of ceiling | vs best cuDNN "
            "| graph ms | graph vs best cuDNN | goal | config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ops = [r for r in rows if r["kind"] == "op"]
    for op in OP_NAMES:
        for shape in sorted({tuple(r["shape"]) for r in ops if r["op"] == op}):
            case = {r["impl"]: r for r in ops if r["op"] == op and tuple(r["shape"]) == shape}
            against = CUDNN if op != "bias_grad" else ("torch",)  # (no cuDNN call sums a bias gradient)
            base = min((case[i]["median_s"] for i in against if i in case), default=None)
            graph_base = min((case[i]["graph_s"] for i in against if case.get(i, {}).get("graph_s")), default=None)
            for impl in (*CUDNN, *BACKENDS):
                r = case.get(impl)
                if r is None:
                    continue
                ratio = f"{base / r['median_s']:.2f}×" if base else "–"
                graph = r.get("graph_s")
                graph_ratio = f"{graph_base / graph:.2f}×" if graph and graph_base else r.get("graph_error") or "–"
                goal = f"≥ {GOALS[op]:.1f}×" if impl in ("cuda", "triton") and op in GOALS else ""
                frac = f"{100 * r['tflops'] / ceiling:.0f}%" if ceiling and r.get("tflops") else "–"
                flops = f"{r['tflops']:.1f}" if r.get("tflops") else f"{r['gb_per_s']:.0f} GB/s" if r.get("gb_per_s") \
                    else "–"
                out.append(f"| {op} | {label(shape)} | {impl} | "
                           f"{r['median_s'] * 1e3:.3f} | {flops} | {frac} | {ratio} | "
                           f"{f'{graph * 1e3:.3f}' if graph else '–'} | {graph_ratio} | {goal} | "
                           f"{r.get('config') or ''} |")
    for kind, what in (("tick_updates", "weight updates ({} C3D layers with biases, B8, 112²: (C_in, C_out, B, H) "
                                         "{}), as the engine runs them at the tick's end"),
                       ("tick_first_convs", "stage-first convs ({} C3D layers, B8, 112²: (C_in, C_out, B, H) {}), as "
                                            "the engine runs them: forwards ahead of the stages, input gradients "
                                            "after their backwards")):
        updates = [r for r in rows if r["kind"] == kind]
        if not updates:
            continue
        layers = updates[0]["layers"]
        out += ["", f"A tick's {what.format(len(layers), ', '.join(str(tuple(l)) for l in layers))}; triton: grouped "
                "launches; ratios against the torch backend per layer:",
                "", "| op | impl | ms | graph ms | graph vs torch |", "|---|---|---|---|---|"]
        for op in sorted({r["op"] for r in updates}):
            case = {r["impl"]: r for r in updates if r["op"] == op}
            base = case.get("torch", {}).get("graph_s")
            for impl, r in case.items():
                graph = r.get("graph_s")
                out.append(f"| {op} | {impl} | {r['median_s'] * 1e3:.3f} | {f'{graph * 1e3:.3f}' if graph else '–'} | "
                           f"{f'{base / graph:.2f}×' if graph and base else r.get('graph_error') or '–'} |")
    ticks = {r["graphs"]: r["ms_per_tick"] for r in rows if r["kind"] == "tick"}
    if ticks:
        out += ["", "| pipeline tick (c3d 64–256, B8, 56², bf16) | ms per tick | vs eager |", "|---|---|---|"]
        for graphs in (False, True):
            if graphs in ticks:
                ratio = f"{ticks[False] / ticks[graphs]:.2f}× (goal ≥ 2×)" if False in ticks and graphs else ""
                out.append(f"| {'CUDA graph' if graphs else 'eager'} | {ticks[graphs]:.3f} | {ratio} |")
    e2e = [r for r in rows if r["kind"] == "end_to_end"]
    if e2e:
        out += ["", "| end to end (B8, 112², bf16 autocast) | T | training | backend | graphs | frames/s | vs clip BP "
                "| peak MiB | vs clip BP | ticks | replays |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        bp = {(r["network"], r["T"]): r for r in e2e if r["impl"] == "clip_bp"}
        for r in sorted(e2e, key=lambda r: (r["network"], r["T"], r["impl"] != "clip_bp", str(r.get("backend")))):
            base = bp.get((r["network"], r["T"]))
            speed = f"{r['frames_per_s'] / base['frames_per_s']:.2f}×" if base and r is not base else ""
            memory = f"{r['peak_mib'] / base['peak_mib']:.2f}×" if base and r is not base and r.get("peak_mib") else ""
            training = "clip BP" if r["impl"] == "clip_bp" else f"Sideways ({r.get('temporal_padding') or 'chain'})"
            out.append(f"| {r['network']} | {r['T']} | {training} | {r.get('backend') or ''} | "
                       f"{'' if r.get('graphs') is None else 'yes' if r['graphs'] else 'no'} | "
                       f"{r['frames_per_s']:.0f} | {speed} | {r['peak_mib'] or 0:.0f} | {memory} | "
                       f"{r.get('ticks') or ''} | {'' if r.get('replays') is None else r['replays']} |")
        parts = [r for r in e2e if r.get("after_clip_mib") is not None]
        if parts:  # bench_gpu._memory_parts: what stays between clips, and the peak's transient rest
            out += ["", "| where the memory goes (MiB) | T | training | backend | graphs | peak | after a clip | "
                    "parameters | gradients | clip | pipeline across ticks | graphs' buffers | 16-bit weight copies "
                    "| graphs captured | peak − after |", "|" + "---|" * 15]
            num = lambda v: "" if v is None else f"{v:.0f}"
            for r in sorted(parts, key=lambda r: (r["network"], r["T"], r["impl"] != "clip_bp", str(r.get("backend")))):
                out.append(f"| {r['network']} | {r['T']} | {'clip BP' if r['impl'] == 'clip_bp' else 'Sideways'} | "
                           f"{r.get('backend') or ''} | {'' if r.get('graphs') is None else 'yes' if r['graphs'] else 'no'} | "
                           f"{num(r['peak_mib'])} | {num(r['after_clip_mib'])} | {num(r['params_mib'])} | "
                           f"{num(r['grads_mib'])} | {num(r['video_mib'])} | {num(r.get('held_mib'))} | "
                           f"{num(r.get('graph_held_mib'))} | {num(r.get('derived_mib'))} | "
                           f"{'' if r.get('graphs_captured') is None else r['graphs_captured']} | "
                           f"{num(r['peak_mib'] - r['after_clip_mib'])} |")
    for r in rows:
        if r["kind"] == "equal_memory":
            out.append(f"\nSideways at clip BP's memory (B8, T16: {r['budget_mib']:.0f} MiB): batch {r['batch']}, "
                       f"{r['frames_per_s']:.0f} frames/s.")
    return out


def dispatch(rows: list[dict], device: str, arch: str, base: dict) -> dict:
    """``base`` with ``measured[arch]``: per op, the fastest backend (torch, cuda, triton) by the
    geometric mean of its times over the 3x3x3 stride-1 shapes all measured ones ran (``ops``: for
    a layer no shape measured), and per shape the fastest there (``shapes``: a layer of those
    channels, spatial kernel and stride takes the nearest frame size's; ``backend.choose``; the
    strided and unaligned layers of ``bench_gpu.OTHER_SHAPES`` measure the kernels such layers
    take, which the rule of ``backend.on_measured_kernels`` otherwise keeps from a measured
    Triton choice) — by the GPU time of a call (CUDA-graph replay, as the pipeline runs by
    default on CUDA) where every one has it, else the eager call's. For the weight ops, a tick's
    updates (``tick_updates`` rows: every layer's, the torch backend's per layer against Triton's
    grouped launches) decide between torch and triton where both ran, for every layer they group
    (the other layers' rows stay): that is how the pipeline runs them, and one layer alone leaves
    out the grouping (the CUDA kernels, which do not group, are not compared there: on every GPU
    run so far they were the slowest weight ops by far). An op this run did not measure keeps
    ``base``'s entries for the architecture, named in ``from_earlier_runs`` (a run of the weight
    ops alone must not send the forward to an unmeasured default), and a layer it did not
    measure keeps its row (:func:`_merged_rows`)."""
    ops, shapes = {}, {}
    for op, name in OP_NAMES.items():
        measured = [r for r in rows if r["kind"] == "op" and r["op"] == op and r["impl"] in BACKENDS]
        key = "graph_s" if measured and all(r.get("graph_s") for r in measured) else "median_s"
        times = {impl: {tuple(r["shape"]): r[key] for r in measured if r["impl"] == impl} for impl in BACKENDS}
        times = {impl: t for impl, t in times.items() if t}
        shared = set.intersection(*(set(t) for t in times.values())) if len(times) > 1 else set()
        if not shared:
            continue
        plain = [s for s in shared if not geometry(s)]  # the op's choice: for layers no row measured
        if plain:
            geo = {impl: math.exp(sum(math.log(times[impl][s]) for s in plain) / len(plain)) for impl in times}
            ops[name] = {"bfloat16": min(geo, key=geo.get)}
        shapes[name] = [dict(channels=[c_in, c_out], positions=b * h * h, **geometry(shape),
                             backend=min(times, key=lambda impl: times[impl][shape]))
                        for shape in sorted(shared) for c_in, c_out, b, h in [shape[:4]]]
    for op, name in OP_NAMES.items():  # a tick's weight updates, grouped as the pipeline runs them, decide
        tick = {r["impl"]: r for r in rows
                if r["kind"] == "tick_updates" and r["op"] == op and r["impl"] in ("torch", "triton")}
        if len(tick) == 2:
            key = "graph_s" if all(r.get("graph_s") for r in tick.values()) else "median_s"
            ops[name] = {"bfloat16": min(tick, key=lambda impl: tick[impl][key])}
            shapes[name] = [r for r in shapes.get(name, []) if "kernel" in r]  # the layers it leaves alone stay
    epilogue = stage_epilogue(rows)
    if epilogue is not None:
        ops["stage_epilogue"] = {"bfloat16": epilogue}
    table = json.loads(json.dumps(base))
    if ops or any(shapes.values()):
        earlier = table.get("measured", {}).get(arch, {})
        carried = sorted(set(earlier.get("ops", {})) - set(ops))
        table.setdefault("measured", {})[arch] = dict(
            device=device, date=datetime.date.today().isoformat(),
            ops={**{k: earlier["ops"][k] for k in carried}, **ops},
            shapes=_merged_rows(earlier.get("shapes", {}), shapes, decided=set(ops)),
            **({"from_earlier_runs": carried} if carried else {}))
    return table


def _merged_rows(earlier: dict, new: dict, decided: set) -> dict:
    """dispatch.json's ``shapes`` after a run: per op, this run's rows, and an earlier run's of the
    layers this run did not measure — but no earlier 3x3x3 stride-1 layer's where this run decided
    the op (``decided``), whose choice they were measured beside."""
    layer = lambda r: (tuple(r["channels"]), tuple(r.get("kernel", ())), tuple(r.get("stride", ())), r["positions"])
    merged = {}
    for name in sorted(set(earlier) | set(new)):
        rows = new.get(name, [])
        measured = {layer(r) for r in rows}
        kept = [r for r in earlier.get(name, {}).get("bfloat16", [])
                if layer(r) not in measured and ("kernel" in r or name not in decided)]
        if kept + rows:
            merged[name] = {"bfloat16": kept + rows}
    return merged


def stage_epilogue(rows: list[dict]) -> "str | None":
    """dispatch.json's ``stage_epilogue``: "triton" where the end-to-end rows of the default dispatch
    with it ("default-epilogues": chain stages run by the engine, their epilogues in one Triton
    launch a tick) beat the default beside them (ATen's per stage) — the geometric mean of their
    frames/s ratios over the (network, T) both ran — else "torch"; None without such a pair."""
    e2e = {(r["network"], r["T"], r.get("backend")): r["frames_per_s"] for r in rows
           if r["kind"] == "end_to_end" and r["impl"] == "sideways"}
    ratios = [fps / e2e[net, T, "default"] for (net, T, b), fps in e2e.items()
              if b == "default-epilogues" and (net, T, "default") in e2e]
    if not ratios:
        return None
    return "triton" if math.exp(sum(map(math.log, ratios)) / len(ratios)) > 1 else "torch"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows")
    p.add_argument("--device", default="GPU")
    p.add_argument("--arch", default=None, help="e.g. sm_90 (default: this machine's GPU)")
    p.add_argument("--dispatch", default=None, help="write the dispatch table here")
    args = p.parse_args(argv)
    if not os.path.exists(args.rows):
        print(f"gpu_report: no rows at {args.rows} (nothing was measured)", file=sys.stderr)
        return 1
    rows = load(args.rows)
    print("\n".join(tables(rows, args.device)))
    if args.dispatch:
        arch = args.arch
        if arch is None:
            import torch
            major, minor = torch.cuda.get_device_capability()
            arch = f"sm_{major}{minor}"
        with open(os.path.join(HERE, "..", "sideways_kernels", "dispatch.json")) as f:
            base = json.load(f)
        with open(args.dispatch, "w") as f:
            json.dump(dispatch(rows, args.device, arch, base), f, indent=1)
            f.write("\n")
        print(f"\ndispatch table for {arch}: {args.dispatch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
