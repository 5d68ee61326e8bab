#!/usr/bin/env python3
"""energy side by side on one GPU, in one run: PyTorch (and engression) against losskern.

Engression / energy score (fwd+grad, beta = 1) at issue 8's shapes: the engression
package's `energy_loss` when it imports, and the same loss written on torch.cdist with
both of its compute modes (matrix product, exact differences). Two-sample energy
distance (V statistic, forward): torch.cdist both modes. Every result's relative error is
taken against an f64 computation on the GPU (chunked exact differences, or f64 cdist in
chunks of rows where the f64 pair matrix would not fit).

losskern's times are criterion's (device-synchronised) medians from the energy bench of
the same run (target/criterion, written by `run.sh bench`, which runs the benches before
this script); its results come from the CLI (`losskern energy-score` / `energy-distance`
on .npy files) on the same data. Run from the repository root on the GPU host:
python3 benches/peers/energy_torch.py (the packed CLI is found at .device/bin/losskern,
or set LOSSKERN_BIN).
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import functools

import numpy as np
import torch

from peer_timing import losskern_binary, median_ms as timed

# The big pairwise problems take seconds per call: fewer repetitions than the default.
median_ms = functools.partial(timed, warmup=3, reps=15)

SCORES = [(1024, 16, 100), (16384, 64, 16), (65536, 64, 16)]
DISTANCES = [(16384, 16384, 64), (100_000, 100_000, 3)]


def score_cdist(y, p, mode):
    """The energy score of preds p [n, m, d] for y [n, d] on torch.cdist (engression's estimator)."""
    m = p.shape[1]
    term1 = torch.cdist(p, y[:, None, :], compute_mode=mode).mean()
    pair = torch.cdist(p, p, compute_mode=mode)
    term2 = -0.5 * m / (m - 1) * pair.mean() if m > 1 else torch.zeros((), device=p.device)
    return term1 + term2


def score_f64(y, p):
    """Exact-differences energy score in f64, chunked over samples."""
    y, p = y.double(), p.double()
    m = p.shape[1]
    s1 = (p - y[:, None, :]).norm(dim=-1).sum()
    s2 = torch.zeros((), dtype=torch.float64, device=p.device)
    for i in range(0, p.shape[0], 1024):
        c = p[i:i + 1024]
        s2 += (c[:, :, None, :] - c[:, None, :, :]).norm(dim=-1).sum()
    n = p.shape[0]
    return (s1 / (n * m) - 0.5 * m / (m - 1) * s2 / (n * m * m)).item()


def fwd_bwd(loss_fn, p):
    pp = p.detach().requires_grad_()
    loss_fn(pp).backward()


def distance_chunked(x, y, mode, dtype, rows=4096):
    """V-statistic energy distance through cdist in chunks of rows (never the whole matrix)."""
    x, y = x.to(dtype), y.to(dtype)

    def mean_dist(a, b):
        total = torch.zeros((), dtype=torch.float64, device=a.device)
        for i in range(0, a.shape[0], rows):
            total += torch.cdist(a[i:i + rows], b, compute_mode=mode).sum().double()
        return total / (a.shape[0] * b.shape[0])

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def criterion_ms(name):
    """criterion's median for energy/cuda/NAME from this run, in ms, or NaN."""
    pattern = os.path.join("target", "criterion", "energy", "cuda_" + name.replace("/", "_"), "new", "estimates.json")
    for path in glob.glob(pattern):
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"] / 1e6
    return float("nan")


def losskern_value(binary, command, arrays, output):
    """Runs the losskern CLI on CUDA with the arrays saved as .npy; the named output's value."""
    if not binary:
        return float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        args = [binary, command, "--device", "cuda", "--out", os.path.join(tmp, "out")]
        for flag, array in arrays.items():
            path = os.path.join(tmp, flag + ".npy")
            np.save(path, array.cpu().numpy())
            args += [f"--{flag.replace('_', '-')}", path]
        run = subprocess.run(args, capture_output=True, text=True)
        if run.returncode != 0:
            print(f"  losskern {command} failed: {run.stderr.strip()}", file=sys.stderr)
            return float("nan")
        return float(np.load(os.path.join(tmp, "out", output + ".npy")).reshape(-1)[0])


def rel(value, exact):
    return abs(value - exact) / abs(exact) if exact != 0 else abs(value)


def score_job(n, m, d, variant):
    """One row of the score table: `variant` ('engression', 'mm', 'exact' or 'losskern')."""
    torch.manual_seed(0)
    y = torch.randn(n, d, device="cuda")
    p = torch.randn(n, m, d, device="cuda")
    exact = score_f64(y, p)
    shape = f"n{n}-m{m}-d{d}"
    if variant == "losskern":
        ours = losskern_value(losskern_binary(), "energy-score", {"y": y, "preds": p}, "loss")
        return ("score+grad", shape, "losskern", criterion_ms(f"score+grad/f32/{shape}"), rel(ours, exact))
    if variant == "engression":
        from engression.loss_func import energy_loss
        label = "engression energy_loss"
        loss = lambda q: energy_loss(y, [q[:, j, :] for j in range(m)], beta=1, verbose=False)
    else:
        mode = {"mm": "use_mm_for_euclid_dist", "exact": "donot_use_mm_for_euclid_dist"}[variant]
        label = f"torch.cdist {mode.split('_')[0]}"
        loss = lambda q: score_cdist(y, q, mode)
    with torch.no_grad():
        value = loss(p).item()
    return ("score+grad", shape, label, median_ms(lambda: fwd_bwd(loss, p)), rel(value, exact))


def distance_job(n, m, d, variant):
    """One row of the distance table: `variant` ('mm', 'exact' or 'losskern')."""
    torch.manual_seed(1)
    x = torch.randn(n, d, device="cuda")
    y = torch.randn(m, d, device="cuda") + 0.1
    exact = distance_chunked(x, y, "donot_use_mm_for_euclid_dist", torch.float64).item()
    shape = f"N{n}-M{m}-d{d}"
    if variant == "losskern":
        pairs = n * m + n * (n - 1) // 2 + m * (m - 1) // 2
        ours = losskern_value(losskern_binary(), "energy-distance", {"x": x, "y": y}, "distance")
        return ("distance", shape, "losskern", criterion_ms(f"distance/f32/N{n}-M{m}-d{d}-pairs{pairs}"), rel(ours, exact))
    mode = {"mm": "use_mm_for_euclid_dist", "exact": "donot_use_mm_for_euclid_dist"}[variant]
    run = lambda: distance_chunked(x, y, mode, torch.float32)
    value = run().item()
    return ("distance", shape, f"torch.cdist {mode.split('_')[0]} (chunked)", timed(run, 1, 3), rel(value, exact))


def run_isolated(job):
    """Runs one job in a child process, so a peer that corrupts its CUDA context (torch.cdist
    at n=65536 m=64 takes an illegal memory access) costs only its own row."""
    child = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(job)],
                           capture_output=True, text=True)
    lines = child.stdout.strip().splitlines()
    if child.returncode == 0 and lines:
        return tuple(json.loads(lines[-1]))
    reason = (child.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"  {job}: failed ({reason[:160]})", file=sys.stderr)
    kind, (n, m, d), variant = job
    shape = f"n{n}-m{m}-d{d}" if kind == "score" else f"N{n}-M{m}-d{d}"
    return (kind if kind == "distance" else "score+grad", shape, f"{variant} (failed)", float("nan"), float("nan"))


def main():
    if len(sys.argv) == 2:
        kind, shape, variant = json.loads(sys.argv[1])
        row = (score_job if kind == "score" else distance_job)(*shape, variant)
        print(json.dumps(row))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    try:
        import engression  # noqa: F401
        score_variants = ["engression", "mm", "exact", "losskern"]
    except ImportError as e:
        score_variants = ["mm", "exact", "losskern"]
        print(f"engression not importable ({e}): its row is left out")
    print(f"{torch.cuda.get_device_name()} (torch {torch.__version__})")
    jobs = [("score", shape, v) for shape in SCORES for v in score_variants]
    jobs += [("distance", shape, v) for shape in DISTANCES for v in ["mm", "exact", "losskern"]]
    print(f"{'op':<11} {'shape':<20} {'variant':<32} {'ms':>10} {'rel. error vs f64':>18}", flush=True)
    for job in jobs:
        op, shape, label, ms, err = run_isolated(job)
        print(f"{op:<11} {shape:<20} {label:<32} {ms:10.3f} {err:18.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
