#!/usr/bin/env python3
"""bnstats side by side on one GPU, in one run: PyTorch against losskern.

Times, for each shape, dtype and layout: torch.var_mean over (N, H, W), torch.batch_norm_stats
(NCHW only: it takes a contiguous NCHW input), BatchNorm2d's training forward (NCHW and
channels_last), and the losskern CLI's timing of the statistics and of statistics +
normalise, next to a device-to-device copy measured in the same run. Prints one table: ms,
GB/s (x read once for statistics; x read twice and y written once with the normalisation),
% of the copy, and losskern's speed-up against each PyTorch variant.

Run from the repository root on the GPU host: python3 benches/peers/bnstats_torch.py
(the packed CLI is found at .device/bin/losskern, or set LOSSKERN_BIN).
"""
import sys

import torch

from peer_timing import copy_bandwidth, losskern_bench_ms, losskern_binary, median_ms

# (N, C, H, W, dtype, layouts): the headline shapes.
SHAPES = [
    (128, 256, 56, 56, "f32", ["nchw", "nhwc"]),
    (256, 64, 112, 112, "bf16", ["nchw", "nhwc"]),
    (32, 2048, 7, 7, "bf16", ["nchw", "nhwc"]),
    (64, 16, 128, 128, "bf16", ["nchw", "nhwc"]),
    (16, 4096, 16, 16, "bf16", ["nchw", "nhwc"]),
]
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}






def losskern_ms(binary, shape, layout, dtype, normalize):
    args = [binary, "bench", "--op", "bnstats", "--device", "cuda", "--json",
            "--shape", "x".join(map(str, shape)), "--layout", layout, "--dtype", dtype]
    if normalize:
        args.append("--normalize")
    return losskern_bench_ms(args)


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    binary = losskern_binary()
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s (torch {torch.__version__})")
    rows = []
    for n, c, h, w, name, layouts in SHAPES:
        dtype = DTYPES[name]
        for layout in layouts:
            torch.manual_seed(0)
            x = torch.randn(n, c, h, w, device="cuda", dtype=dtype) + 0.5
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            nbytes = x.numel() * x.element_size()
            bn = torch.nn.BatchNorm2d(c, device="cuda", dtype=dtype).train()
            if layout == "nhwc":
                bn = bn.to(memory_format=torch.channels_last)
            timings = [
                ("torch.var_mean", median_ms(lambda: torch.var_mean(x, dim=(0, 2, 3))), nbytes, "stats"),
                ("BatchNorm2d train fwd", median_ms(lambda: bn(x)), 3 * nbytes, "norm"),
            ]
            if layout == "nchw":
                timings.append(("torch.batch_norm_stats", median_ms(lambda: torch.batch_norm_stats(x, 1e-5)), nbytes, "stats"))
            ours = {"stats": float("nan"), "norm": float("nan")}
            if binary:
                ours = {k: losskern_ms(binary, (n, c, h, w), layout, name, k == "norm") for k in ours}
                timings.append(("losskern stats", ours["stats"], nbytes, "stats"))
                timings.append(("losskern stats + normalise", ours["norm"], 3 * nbytes, "norm"))
            for label, ms, b, kind in timings:
                gbs = b / (ms * 1e-3) / 1e9
                rows.append((f"{n}x{c}x{h}x{w}", name, layout, label, ms, gbs, 100 * gbs / copy, ms / ours[kind]))
            del x, bn
            torch.cuda.empty_cache()
    print(f"{'shape':>16} {'dtype':>5} {'layout':>6} {'variant':<28} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'losskern speed-up':>18}")
    for shape, dtype, layout, label, ms, gbs, pct, speedup in rows:
        print(f"{shape:>16} {dtype:>5} {layout:>6} {label:<28} {ms:8.3f} {gbs:7.0f} {pct:5.1f}% {speedup:17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
