#!/usr/bin/env python3
"""Shared by the peers scripts (imported, not a benchmark itself): CUDA-event timing, the
device-to-device copy bandwidth of the same run, and where the packed losskern CLI is."""
import json
import os
import subprocess
import sys

import torch


def median_ms(fn, warmup=5, reps=30):
    """Median of CUDA-event timings of fn(), after warm-up; NaN (with a note) if fn fails."""
    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        print(f"  failed: {str(e).splitlines()[0]}", file=sys.stderr)
        torch.cuda.empty_cache()
        return float("nan")
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    """Device-to-device copy of 2 GiB: bytes read plus bytes written over time, GB/s."""
    n = 1 << 29
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def losskern_binary():
    """$LOSSKERN_BIN, else the packed CLI next to peers/, .device/bin or a release build."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "..", "bin", "losskern"), ".device/bin/losskern", "target/release/losskern"]
    return os.environ.get("LOSSKERN_BIN") or next((p for p in candidates if os.path.exists(p)), None)


def losskern_bench_ms(args):
    """The median_ms of one `losskern bench ... --json` run (its last line), or NaN with a note."""
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"losskern bench failed: {out.stderr.strip()}", file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]
