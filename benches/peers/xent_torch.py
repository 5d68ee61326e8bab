#!/usr/bin/env python3
"""xent side by side on one GPU, in one run: PyTorch against losskern.

Times, for each shape and dtype: F.cross_entropy forward, forward+backward, an eager and a
torch.compile "all outputs" function (loss, lse, entropy, grad, rho from max-min), Liger-Kernel's
cross-entropy forward+backward (when `liger_kernel` imports: it is pure Python on the host's
Triton), and the losskern CLI's timing of the same shape (forward, forward+grad), next to a
device-to-device copy measured in the same run. Prints one table: ms, GB/s (logits read once, grad written
once), % of the copy, and losskern's speed-up against each PyTorch variant.

Run from the repository root on the GPU host: python3 benches/peers/xent_torch.py [BxV ...]
(the packed CLI is found at .device/bin/losskern, or set LOSSKERN_BIN); shapes given as
arguments run alone. Each shape's rows print as soon as it is done (torch.compile and Liger
compile their kernels at a shape's first call, which can take minutes over all shapes).
"""
import math
import sys

import torch

from peer_timing import copy_bandwidth, losskern_bench_ms, losskern_binary, median_ms
import torch.nn.functional as F

# (B, V, dtypes): the headline shapes, then the short batches that must spread over the GPU.
SHAPES = [
    (4096, 32000, ("bf16", "f32")),
    (8192, 128256, ("bf16", "f32")),
    (32768, 50257, ("bf16", "f32")),
    (8, 262144, ("bf16",)),
    (64, 131072, ("bf16",)),
]
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def liger_cross_entropy():
    """Liger-Kernel's functional cross-entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except ImportError as e:
        print(f"liger-kernel not importable ({e}): its rows are left out")
        return None
    return fn


def all_outputs(z, y):
    """The separate-pass way: loss, lse, entropy, grad and rho from max-min."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    p = torch.exp(zf - lse[:, None])
    loss = (lse - zf.gather(1, y[:, None]).squeeze(1)).mean()
    entropy = lse - (p * zf).sum(-1)
    grad = p
    grad[torch.arange(z.shape[0], device=z.device), y] -= 1.0
    grad = (grad / z.shape[0]).to(z.dtype)
    delta = zf.max(-1).values - zf.min(-1).values
    rho = math.pi / (delta.mean() + 1e-6)
    return loss, lse, entropy, grad, rho


def losskern_ms(binary, b, v, dtype, grad):
    """The CLI's own timing (device-synchronised median) of xent at this shape."""
    args = [binary, "bench", "--shape", f"{b}x{v}", "--dtype", dtype, "--device", "cuda", "--json"]
    if grad:
        args.append("--grad")
    return losskern_bench_ms(args)


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    binary = losskern_binary()
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s (torch {torch.__version__})")
    compiled = torch.compile(all_outputs)
    liger = liger_cross_entropy()
    wanted = sys.argv[1:]
    print(f"{'shape':>13} {'dtype':>5} {'variant':<32} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'losskern speed-up':>18}",
          flush=True)
    for b, v, dtypes in SHAPES:
        if wanted and f"{b}x{v}" not in wanted:
            continue
        for name in dtypes:
            dtype = DTYPES[name]
            torch.manual_seed(0)
            z = torch.randn(b, v, device="cuda", dtype=dtype) * 3
            y = torch.randint(0, v, (b,), device="cuda")
            logits_bytes = b * v * z.element_size()

            def fwd_bwd():
                zz = z.detach().requires_grad_()
                F.cross_entropy(zz.float() if dtype == torch.float32 else zz, y).backward()

            # (variant, ms, bytes, kind): a forward-only row is compared with losskern's forward,
            # a row that also yields the gradient with losskern's forward+grad.
            timings = [
                ("torch F.cross_entropy fwd", median_ms(lambda: F.cross_entropy(z, y)), logits_bytes, "fwd"),
                ("torch F.cross_entropy fwd+bwd", median_ms(fwd_bwd), 2 * logits_bytes, "grad"),
                ("torch eager all outputs", median_ms(lambda: all_outputs(z, y)), 2 * logits_bytes, "grad"),
                ("torch.compile all outputs", median_ms(lambda: compiled(z, y)), 2 * logits_bytes, "grad"),
            ]
            if liger is not None:
                # Liger writes the gradient over its input in the forward: it gets its own copy
                # of the logits, which after the first call holds the gradient (same work).
                z_liger = z.detach().clone()

                def liger_fwd_bwd():
                    zz = z_liger.detach().requires_grad_()
                    liger(zz, y).backward()

                timings.append(("liger cross_entropy fwd+bwd", median_ms(liger_fwd_bwd), 2 * logits_bytes, "grad"))
            ours = {"fwd": float("nan"), "grad": float("nan")}
            if binary:
                ours = {"fwd": losskern_ms(binary, b, v, name, False), "grad": losskern_ms(binary, b, v, name, True)}
                timings.append(("losskern fwd (all but grad)", ours["fwd"], logits_bytes, "fwd"))
                timings.append(("losskern fwd+grad (all outputs)", ours["grad"], 2 * logits_bytes, "grad"))
            for label, ms, nbytes, kind in timings:
                gbs = nbytes / (ms * 1e-3) / 1e9
                shape = f"{b}x{v}"
                print(f"{shape:>13} {name:>5} {label:<32} {ms:8.3f} {gbs:7.0f} {100 * gbs / copy:5.1f}% "
                      f"{ms / ours[kind]:17.2f}x", flush=True)
            del z, y
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
