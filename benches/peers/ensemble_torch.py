#!/usr/bin/env python3
"""ensemble side by side on one GPU, in one run: PyTorch (torch.func vmap + functional_call,
as the Loss-Cartography notebook evaluates its models) against losskern.

Times, on the notebook's shapes (81 MLPs 784-128-128-10 on one shared batch of 60000, the
mean cross-entropy accumulated in f64 and the accuracy per model): vmap over stacked
parameters in fp32, tf32 and bf16 autocast; a landscape of K = 7 directions x 11 doubling
distances + the centre (78 models), with the perturbed models materialised as the notebook
does (centre + t * direction, stacked) before the vmap, in fp32; and the losskern CLI's
timing of the same work (forward Exact / TensorCore, landscape Rounded / Split). Prints one
table: ms, TFLOP/s (2 E B sum d_l d_{l+1}), % of the dtype's dense peak and losskern's
speed-up against each PyTorch variant.

Run from the repository root on the GPU host: python3 benches/peers/ensemble_torch.py
(the packed CLI is found at .device/bin/losskern, or set LOSSKERN_BIN).
"""
import sys

import torch
from torch.func import functional_call, stack_module_state, vmap

from peer_timing import losskern_bench_ms, losskern_binary, median_ms

WIDTHS = [784, 128, 128, 10]
MODELS, BATCH = 81, 60000
DIRECTIONS, DISTANCES = 7, 11
# Dense peaks of the H200 (SXM) in TFLOP/s, from NVIDIA's data sheet: fp32 FMA, tf32 and
# bf16 tensor cores (without sparsity).
PEAK = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}


def mlp():
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(WIDTHS):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).cuda()


def flops(models):
    return 2.0 * models * BATCH * sum(a * b for a, b in zip(WIDTHS, WIDTHS[1:]))


def vmapped(base, params, x, y, autocast):
    def one(p):
        logits = functional_call(base, p, (x,))
        loss = torch.nn.functional.cross_entropy(logits.double(), y)
        return loss, (logits.argmax(1) == y).double().mean()

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return vmap(one)(params)

    return run


def losskern_ms(binary, op, extra):
    shape = [MODELS, BATCH] if op == "ensemble" else [DIRECTIONS, DISTANCES, BATCH]
    args = [binary, "bench", "--op", op, "--device", "cuda", "--json",
            "--shape", "x".join(map(str, shape + WIDTHS))] + extra
    return losskern_bench_ms(args)


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    torch.manual_seed(0)
    binary = losskern_binary()
    base = mlp()
    models = [mlp() for _ in range(MODELS)]
    params, _ = stack_module_state(models)
    x = torch.randn(BATCH, WIDTHS[0], device="cuda")
    y = torch.randint(0, WIDTHS[-1], (BATCH,), device="cuda")
    print(f"{torch.cuda.get_device_name()} (torch {torch.__version__})")

    rows = []
    for label, tf32, autocast, peak in [
        ("vmap fp32", False, False, "fp32"),
        ("vmap tf32", True, False, "tf32"),
        ("vmap bf16 autocast", False, True, "bf16"),
    ]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rows.append(("forward", label, median_ms(vmapped(base, params, x, y, autocast)), MODELS, peak))
    torch.backends.cuda.matmul.allow_tf32 = False

    # The landscape as the notebook builds it: every perturbed model materialised.
    center = {k: v[0] for k, v in params.items()}
    directions = [{k: torch.randn_like(v) for k, v in center.items()} for _ in range(DIRECTIONS)]
    scan = [(None, 0.0)] + [(d, 1e-3 * 2**i) for d in directions for i in range(DISTANCES)]

    def materialise_and_run():
        with torch.no_grad():
            stacked = {k: torch.stack([c if d is None else torch.add(c, d[k] * t) for d, t in scan])
                       for k, c in center.items()}
        return vmapped(base, stacked, x, y, False)()

    rows.append(("landscape", "materialised + vmap fp32", median_ms(materialise_and_run), len(scan), "fp32"))

    if binary:
        for op, label, extra, peak, n in [
            ("ensemble", "losskern Exact", ["--precision", "exact"], "fp32", MODELS),
            ("ensemble", "losskern TensorCore", ["--precision", "tensor-core"], "tf32", MODELS),
            ("ensemble", "losskern TensorCore bf16", ["--precision", "tensor-core", "--dtype", "bf16"], "bf16", MODELS),
            ("landscape", "losskern Rounded", ["--perturbation", "rounded"], "fp32", len(scan)),
            ("landscape", "losskern Split", ["--perturbation", "split"], "fp32", len(scan)),
        ]:
            rows.append(("forward" if op == "ensemble" else "landscape", label, losskern_ms(binary, op, extra), n, peak))

    best_ours = {kind: min((ms for k, label, ms, _, _ in rows if k == kind and label.startswith("losskern")),
                           default=float("nan")) for kind in ("forward", "landscape")}
    print(f"{'work':>9} {'variant':<28} {'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'best losskern speed-up':>23}")
    for kind, label, ms, n, peak in rows:
        tflops = flops(n) / (ms * 1e-3) / 1e12
        print(f"{kind:>9} {label:<28} {ms:9.3f} {tflops:8.2f} {100 * tflops / PEAK[peak]:5.1f}% "
              f"{ms / best_ours[kind]:22.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
