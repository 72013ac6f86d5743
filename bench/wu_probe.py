"""The weight update on a GPU, config by config (issue 18): where its time goes.

Per layer shape of bench_gpu.py and op (``weight_accumulate``: add dW to grad_weight;
``weight_sgd``: the fused SGD step): cuDNN's weight gradient on channels_last_3d frames (+ fused
``torch.optim.SGD``), the torch backend's op, and the Triton op at each config of its list and a
few split counts, plus ``gemm-only``: the Triton op at its default split without the second
launch (the splits' sum and the epilogue), so the two launches' shares show. Every figure is the
GPU time of one call (ten calls captured in a CUDA graph, replays timed with events), every
result first checked against reference.py in float64. Rows go to stdout and, as JSON, to
``--rows``.

    python bench/wu_probe.py [--shapes 0,3] [--splits auto,0.5] [--rows rows.jsonl]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def _without_finish(T):
    """A context in which the Triton weight update skips its second launch."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        wrap = T.wrap_triton
        T.wrap_triton = lambda k: (type("Skip", (), {"__getitem__": lambda _, g: lambda *a, **kw: None})()
                                   if k is T.K._weight_finish_kernel else wrap(k))
        try:
            yield
        finally:
            T.wrap_triton = wrap
    return ctx()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="indices into bench_gpu.SHAPES (default: all)")
    p.add_argument("--ops", default="weight_accumulate,weight_sgd")
    p.add_argument("--splits", default="auto,0.5", help="'auto' and multiples of it, for every config; 'none': "
                                                        "the default config and split only")
    p.add_argument("--rows", default=None)
    a = p.parse_args(argv)
    import bench_gpu as bg
    import sideways_kernels.triton as T
    from sideways_kernels.triton import configs

    shapes = [bg.SHAPES[int(i)] for i in a.shapes.split(",")] if a.shapes else bg.SHAPES
    out = open(a.rows, "a") if a.rows else None
    for shape in shapes:
        c_in, c_out, batch, hw = shape
        auto = T._weight_update_splits(c_out, c_in, 1, 27, 3, batch * hw * hw, torch.device("cuda"))  # the box path's
        runs = [("cudnn_cl", None, None), ("torch", None, None), ("triton", None, None), ("gemm-only", None, None)]
        runs += [("triton", cfg, max(1, round(auto * float(s))) if s != "auto" else auto)
                 for cfg in configs.configs_for("box_weight_update", 90) for s in a.splits.split(",") if s != "none"]
        for op in a.ops.split(","):
            L = bg._Layer(*shape)
            expected = bg._expected(op, shape, L)
            base = None
            for impl, cfg, split in runs:
                timed, result = bg._implementation(op, "triton" if impl == "gemm-only" else impl, L)
                with T.using(box_config=cfg, split=split):
                    got = result().double()
                    want = expected
                    if op == "weight_sgd":
                        got, want = got - L.weight.double(), expected - L.weight.double()
                    error = ((got - want).abs().max() / want.abs().max()).item()
                    if impl == "gemm-only":
                        with _without_finish(T):
                            t, why = bg._graph_time(timed)
                    else:
                        t, why = bg._graph_time(timed)
                base = base or t
                name = f"{impl} {cfg.name if cfg else ''} split {split or 'auto'}" if impl != "cudnn_cl" else impl
                row = dict(shape=shape, op=op, impl=impl, config=cfg and cfg.name, split=split, us=t and t * 1e6,
                           tflops=t and L.flops / t / 1e12, ratio=t and base / t, error=error, why=why)
                print(f"{str(shape):18} {op:17} {name:40} "
                      + (f"{t * 1e6:7.1f} us {L.flops / t / 1e12:5.0f} TFLOP/s {base / t:5.2f}x cuDNN" if t else why)
                      + f"  err {error:.1e}", flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
