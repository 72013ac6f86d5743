"""Sideways' memory does not grow with the clip length (DESIGN.md §1): each measurement in a
fresh process (Linux: peak RSS from /proc/self/status, reset through clear_refs), after a warm-up
clip of the same length, glibc told to return freed memory. Between 8 and 96 frames the clip
itself grows by ~17 MiB; Sideways' peak may not grow by a fifth of that (whole-clip temporaries
— a NaN check on the whole video, say — would add more than the clip)."""
import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys, torch
from sideways_kernels import SidewaysPipeline, models

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
torch.set_num_threads(1)
frames = int(sys.argv[1])
net = models.c3d(5, widths=(8, 16))
pipe = SidewaysPipeline(models.stages(net, 2))
video, target = torch.randn(4, 3, frames, 64, 64), torch.randint(0, 5, (4,))
pipe.backward_clip(video, target)  # warm-up: library start-up, rings, buffers, tick plans
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
pipe.backward_clip(video, target)
print(json.dumps(dict(growth=status("VmHWM") - before, clip=video.numel() * video.element_size())))
"""


def _peak_growth(frames: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(frames)], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
def test_sideways_peak_memory_does_not_grow_with_the_clip_length():
    short, long = (min((_peak_growth(t) for _ in range(2)), key=lambda r: r["growth"]) for t in (8, 96))
    grown = long["growth"] - short["growth"]
    assert grown < (long["clip"] - short["clip"]) / 3, (short, long)
