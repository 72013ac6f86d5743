"""Runs a pytest selection in several processes at once, under one deadline, and writes their
output to one log whose last line sums them up.

Why: on a GPU run the tests' time goes to compiling Triton kernels — CPU work, about a second per
kernel, config and specialisation — which one pytest process does a test at a time while the GPU
idles and all but one of the machine's CPUs wait; every GPU run so far ran out of its test phase's
minutes before the last tests (bench/RESULTS.md). The tests share no state but the GPU, so N
processes each take every N-th test (in collection order: a parametrised test's cases spread
over all of them) and compile side by side; Triton's on-disk cache is shared, so a kernel one
process compiled first is not compiled again by another.

    python bench/parallel_tests.py --jobs 4 --limit 120 --log gpu_tests.log -- python_tests/test_gpu.py -k box

At the deadline each process gets SIGINT (pytest then reports what ran), 10 s later SIGKILL.
Exit status: 0 when every process passed, 124 when the deadline stopped one, else the first
failing process's status.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
OUTCOMES = ("failed", "passed", "skipped", "errors", "error", "xfailed", "xpassed")


def collect(args: list[str]) -> tuple[int, list[str], str]:
    """(pytest's status, the selected test ids, its output) of collecting ``args``."""
    done = subprocess.run([*PYTEST, "--collect-only", "-q", *args], capture_output=True, text=True)
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return done.returncode, ids, done.stdout + done.stderr


def counts(summary: str) -> dict:
    """pytest's last line ("3 passed, 1 failed in 2.0s") as {outcome: n}."""
    found = {}
    for n, outcome in re.findall(r"(\d+) (" + "|".join(OUTCOMES) + r")\b", summary):
        outcome = "errors" if outcome == "error" else outcome
        found[outcome] = found.get(outcome, 0) + int(n)
    return found


def _interruptible() -> None:
    """In a child before it starts: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt (pytest then reports what ran). A shell's background job ignores SIGINT,
    and its children inherit that: CI's runner is one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(ids: list[str], jobs: int, limit: float, log: str) -> int:
    shards = [ids[j::jobs] for j in range(jobs) if ids[j::jobs]]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [open(os.path.join(tmp, f"shard{j}.log"), "w+") for j in range(len(shards))]
        procs = [subprocess.Popen([*PYTEST, "-q", *shard], stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=_interruptible) for shard, out in zip(shards, outs)]
        stopped = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() - start > limit and not stopped:
                stopped = True
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                grace = time.monotonic() + 10
                while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            time.sleep(0.2)
        total, lines = {}, []
        with open(log, "w") as merged:
            for j, (shard, out, p) in enumerate(zip(shards, outs, procs)):
                out.seek(0)
                text = out.read()
                out.close()
                last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
                merged.write(f"==== shard {j + 1}/{len(shards)}: {len(shard)} tests, exit {p.returncode} ====\n{text}\n")
                for outcome, n in counts(last).items():
                    total[outcome] = total.get(outcome, 0) + n
                lines.append(f"shard {j + 1}: {last}")
            elapsed = time.monotonic() - start
            summary = ", ".join(f"{total[o]} {o}" for o in OUTCOMES if total.get(o)) or "nothing ran"
            merged.write("\n".join(lines) + "\n")
            merged.write(f"{summary} of {len(ids)} in {len(shards)} process{'es' if len(shards) > 1 else ''} "
                         f"in {elapsed:.1f}s"
                         f"{' (stopped at the deadline)' if stopped else ''}\n")
    statuses = [p.returncode for p in procs]
    if stopped:
        return 124
    return next((s for s in statuses if s), 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=4, help="pytest processes at once (default 4)")
    p.add_argument("--limit", type=float, default=600.0, help="seconds before every process is stopped")
    p.add_argument("--log", required=True, help="the merged output; its last line sums it up")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: what pytest selects")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    status, ids, output = collect(pytest_args)
    if status not in (0, 5) or not ids:  # (5: nothing selected)
        with open(args.log, "w") as f:
            f.write(output + ("\nnothing selected\n" if status in (0, 5) else f"\ncollection failed: exit {status}\n"))
        return status or 5
    return run(ids, args.jobs, args.limit, args.log)


if __name__ == "__main__":
    sys.exit(main())
