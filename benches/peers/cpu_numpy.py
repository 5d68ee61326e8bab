#!/usr/bin/env python3
"""The CPU backend side by side with numpy's naive versions (and PyTorch CPU where it is
importable), in one run on one machine, next to a memcpy of the same bytes.

For each shape: numpy's straightforward formula (whole-array temporaries, as one writes it
first; the ensemble as batched matmuls), torch's CPU op where torch is installed, and the losskern CLI's own timing of the
same shape on the CPU (`losskern bench --device cpu --json`, the Tensor call). Bytes as the
CLI counts them (xent: logits read once, grad written once; bnstats: x read once, or read
twice and y written with the normalisation; energy: the inputs read once, the grad written
once); the memcpy (np.copyto between two touched arrays of that many bytes, counted read +
write) is measured in the same run, so "%copy" is the op's GB/s over the copy's.

Run from the repository root: python3 benches/peers/cpu_numpy.py [--quick]
(the CLI is found at target/release/losskern, or set LOSSKERN_BIN).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

try:
    import torch
except ImportError:
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))


def median_ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_gbps(nbytes):
    """np.copyto of nbytes between two touched buffers: (read + write) bytes over time."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    ms = median_ms(lambda: np.copyto(dst, src), reps=9)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


def losskern_binary():
    candidates = [os.path.join(HERE, "..", "..", "target", "release", "losskern"), "target/release/losskern"]
    return os.environ.get("LOSSKERN_BIN") or next((p for p in candidates if os.path.exists(p)), None)


def losskern_ms(binary, args):
    out = subprocess.run([binary, "bench", "--device", "cpu", "--json", *args], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"losskern bench {' '.join(args)} failed: {out.stderr.strip()}", file=sys.stderr)
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def xent_numpy(z, y):
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(s[:, 0])
    rows = np.arange(z.shape[0])
    loss = (lse - z[rows, y]).mean()
    grad = e / s
    grad[rows, y] -= 1.0
    grad /= z.shape[0]
    return loss, grad


def xent_torch(z, y):
    z = z.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z, y)
    loss.backward()
    return loss, z.grad


def bnstats_numpy(x, axes, normalize):
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    if normalize:
        return (x - mean) / np.sqrt(var + 1e-5)
    return mean, var


def score_numpy(y, preds):
    n, m, _ = preds.shape
    t1 = np.sqrt(((preds - y[:, None, :]) ** 2).sum(-1)).mean()
    pair = preds[:, :, None, :] - preds[:, None, :, :]
    t2 = np.sqrt((pair**2).sum(-1)).sum() / (n * m * (m - 1))
    return t1 - 0.5 * t2


def distance_numpy(x, y):
    def mean_dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).mean()

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def ensemble_numpy(x, labels, layers):
    """E MLPs on one batch (ReLU between layers), each model's mean cross-entropy, with
    numpy's batched matmul (BLAS per model)."""
    h = np.broadcast_to(x, (layers[0][0].shape[0], *x.shape))
    for k, (w, b) in enumerate(layers):
        h = h @ w.transpose(0, 2, 1) + b[:, None, :]
        if k + 1 < len(layers):
            h = np.maximum(h, 0.0)
    m = h.max(axis=2, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(h - m).sum(axis=2))
    return (lse - np.take_along_axis(h, labels[None, :, None], axis=2)[..., 0]).mean(axis=1)


def ensemble_torch(x, labels, layers):
    """The same with torch's batched matrix products (what torch.vmap of a model gives)."""
    with torch.no_grad():
        h = x.expand(layers[0][0].shape[0], *x.shape)
        for k, (w, b) in enumerate(layers):
            h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
            if k + 1 < len(layers):
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h.transpose(1, 2), labels.expand(h.shape[0], -1), reduction="none")
        return loss.mean(dim=1)


def row(name, shape, variant, ms, nbytes, copy, losskern):
    gbps = nbytes / (ms * 1e-3) / 1e9
    speedup = ms / losskern if losskern == losskern else float("nan")
    share = f"{100 * gbps / copy:6.1f}%" if copy else "      -"
    print(f"{name:>8} {shape:>18} {variant:<24} {ms:10.1f} {gbps:7.2f} {share} {speedup:8.2f}x")


def main():
    quick = "--quick" in sys.argv
    binary = losskern_binary()
    if binary is None:
        sys.exit("no losskern CLI: cargo build --release first, or set LOSSKERN_BIN")
    rng = np.random.default_rng(0)
    # The cores this process may run on (taskset narrows them), as rayon and torch see them.
    threads = len(os.sched_getaffinity(0))
    print(f"CPU: {threads} of {os.cpu_count()} cores, numpy {np.__version__}" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", no torch"))
    print(f"{'op':>8} {'shape':>18} {'variant':<24} {'ms':>10} {'GB/s':>7} {'%copy':>7} {'losskern speed-up':>9}")

    b, v = (1024, 32000) if quick else (4096, 32000)
    z = rng.standard_normal((b, v), dtype=np.float32)
    y = rng.integers(0, v, b)
    nbytes = 2 * z.nbytes
    copy = copy_gbps(z.nbytes)
    lk = losskern_ms(binary, ["--shape", f"{b}x{v}", "--dtype", "f32", "--grad"])
    print(f"memcpy of {z.nbytes / 1e6:.0f} MB: {copy:.2f} GB/s (read + write)")
    row("xent", f"{b}x{v}", "numpy naive fwd+grad", median_ms(lambda: xent_numpy(z, y)), nbytes, copy, lk)
    if torch:
        zt, yt = torch.from_numpy(z), torch.from_numpy(y)
        row("xent", f"{b}x{v}", "torch cross_entropy+bwd", median_ms(lambda: xent_torch(zt, yt)), nbytes, copy, lk)
    row("xent", f"{b}x{v}", "losskern fwd+grad", lk, nbytes, copy, lk)
    del z

    n, c, h, w = (16, 64, 56, 56) if quick else (64, 64, 56, 56)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32) + 0.5
    copy = copy_gbps(x.nbytes)
    print(f"memcpy of {x.nbytes / 1e6:.0f} MB: {copy:.2f} GB/s (read + write)")
    for normalize in (False, True):
        args = ["--op", "bnstats", "--shape", f"{n}x{c}x{h}x{w}", "--dtype", "f32", "--layout", "nchw"]
        lk = losskern_ms(binary, args + (["--normalize"] if normalize else []))
        nbytes = (3 if normalize else 1) * x.nbytes
        what = "stats+normalise" if normalize else "stats"
        shape = f"{n}x{c}x{h}x{w}"
        row("bnstats", shape, f"numpy mean/var {what}", median_ms(lambda: bnstats_numpy(x, (0, 2, 3), normalize)), nbytes, copy, lk)
        if torch:
            xt = torch.from_numpy(x)
            fn = (lambda: torch.nn.functional.batch_norm(xt, None, None, training=True)) if normalize else (lambda: torch.var_mean(xt, dim=(0, 2, 3)))
            row("bnstats", shape, f"torch {what}", median_ms(fn), nbytes, copy, lk)
        row("bnstats", shape, f"losskern {what}", lk, nbytes, copy, lk)
    del x

    n, m, d = (256, 16, 100) if quick else (1024, 16, 100)
    yy = rng.standard_normal((n, d), dtype=np.float32)
    preds = rng.standard_normal((n, m, d), dtype=np.float32)
    nbytes = yy.nbytes + preds.nbytes
    copy = copy_gbps(max(nbytes, 1 << 24))
    lk = losskern_ms(binary, ["--op", "energy-score", "--shape", f"{n}x{m}x{d}"])
    row("energy", f"n{n} m{m} d{d}", "numpy naive score", median_ms(lambda: score_numpy(yy, preds)), nbytes, copy, lk)
    row("energy", f"n{n} m{m} d{d}", "losskern score", lk, nbytes, copy, lk)

    nx, d = (512, 64) if quick else (1024, 64)
    xs = rng.standard_normal((nx, d), dtype=np.float32)
    ys = rng.standard_normal((nx, d), dtype=np.float32) + 0.5
    nbytes = xs.nbytes + ys.nbytes
    lk = losskern_ms(binary, ["--op", "energy-distance", "--shape", f"{nx}x{nx}x{d}"])
    row("energy", f"N=M={nx} d{d}", "numpy naive distance", median_ms(lambda: distance_numpy(xs, ys), reps=3), nbytes, copy, lk)
    if torch:
        xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
        fn = lambda: 2 * torch.cdist(xt, yt).mean() - torch.cdist(xt, xt).mean() - torch.cdist(yt, yt).mean()
        row("energy", f"N=M={nx} d{d}", "torch cdist distance", median_ms(fn), nbytes, copy, lk)
    row("energy", f"N=M={nx} d{d}", "losskern distance", lk, nbytes, copy, lk)

    # ensemble: GFLOP/s in the GB/s column (2 E B sum d_l d_l+1 FLOPs, as the CLI counts),
    # no copy share (it is compute-bound).
    e, b, widths = (27, 600, (784, 128, 128, 10)) if quick else (81, 600, (784, 128, 128, 10))
    xe = rng.standard_normal((b, widths[0]), dtype=np.float32)
    labels = rng.integers(0, widths[-1], b)
    # f32 throughout: under numpy 2's promotion rules a float32 array divided by the
    # float64 scalar np.sqrt(i) becomes float64, which made numpy's products f64.
    layers = [
        ((rng.standard_normal((e, o, i)) / np.sqrt(i)).astype(np.float32), (0.1 * rng.standard_normal((e, o))).astype(np.float32))
        for i, o in zip(widths[:-1], widths[1:])
    ]
    flops = 2 * e * b * sum(i * o for i, o in zip(widths[:-1], widths[1:]))
    shape = "x".join(str(v) for v in (e, b, *widths))
    lk = losskern_ms(binary, ["--op", "ensemble", "--shape", shape])
    row("ensemble", f"E{e} B{b}", "numpy matmul forward", median_ms(lambda: ensemble_numpy(xe, labels, layers), reps=3), flops, None, lk)
    if torch:
        xt, yt = torch.from_numpy(xe), torch.from_numpy(labels)
        lt = [(torch.from_numpy(w), torch.from_numpy(bb)) for w, bb in layers]
        row("ensemble", f"E{e} B{b}", "torch baddbmm forward", median_ms(lambda: ensemble_torch(xt, yt, lt)), flops, None, lk)
    row("ensemble", f"E{e} B{b}", "losskern Exact forward", lk, flops, None, lk)


if __name__ == "__main__":
    main()
