#!/usr/bin/env python3
"""The PyTorch side of `kpipe bench train|infer`: the same U-Net (two 3x3 conv + BN +
ReLU per level, 4 downs, 2x2 transposed-conv up, concat skips, 1 input channel, 3
classes), batch of random slices, Adam, cross-entropy; median slices per second.

    python3 scripts/bench_unet_torch.py --size 64 --base 16 --batch 8 --threads 1

Run it beside `kpipe bench train --size 64 --base 16 --batch 8 --threads 1` in one
session and compare the two figures (the machines here are shared and noisy).

On an NVIDIA GPU (beside `kpipe bench train --backend gpu --warmup 10 ...`):

    python3 scripts/bench_unet_torch.py --device cuda --size 256 --base 64 --batch 8 \
        --mode all --warmup 10 --steps 20

`--mode` fp32 is strict fp32 (cuDNN's and cuBLAS's TF32 off), tf32 PyTorch's default for
cuDNN convolutions (TF32 on), bf16 autocast (bf16 tensor-core convolutions, the loss in
fp32). `cudnn.benchmark` is on and the warm-up steps take its kernel search; every timed
step ends with `torch.cuda.synchronize()`. Each line also gives the achieved TFLOP/s
(3x the forward's count for a training step) and the peak GPU memory.
"""
import argparse
import statistics
import time

import torch
from torch import nn


BATCH_NORM = True


def block(cin, cout):
    norm = nn.BatchNorm2d if BATCH_NORM else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), norm(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, base):
        super().__init__()
        w = [base << i for i in range(4)]
        self.down = nn.ModuleList()
        cin = 1
        for c in w:
            self.down.append(block(cin, c))
            cin = c
        self.bottom = block(cin, cin * 2)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c * 2, c, 2, stride=2) for c in reversed(w))
        self.convs = nn.ModuleList(block(c * 2, c) for c in reversed(w))
        self.head = nn.Conv2d(base, 3, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, conv in zip(self.ups, self.convs):
            x = conv(torch.cat([skips.pop(), torch.relu(up(x))], 1))
        return self.head(x)


def forward_flops(net, size):
    """Multiply-adds x 2 of one slice's forward pass through the convolutions."""
    flops = 0

    def hook(m, inp, out):
        nonlocal flops
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            flops += 2 * inp[0].shape[1] * m.out_channels * k * inp[0].shape[2] * inp[0].shape[3]
        else:
            flops += 2 * m.in_channels * m.out_channels * k * out.shape[2] * out.shape[3]

    hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        net.eval()
        net(torch.zeros(1, 1, size, size, device=next(net.parameters()).device))
    for h in hooks:
        h.remove()
    return flops


def run(a, precision, dev):
    cuda = dev.type == "cuda"
    if cuda:
        strict = precision == "fp32"
        torch.backends.cudnn.allow_tf32 = not strict
        torch.backends.cuda.matmul.allow_tf32 = not strict
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    net = UNet(a.base).to(dev)
    flops = forward_flops(net, a.size)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    y = (torch.arange(a.batch * a.size * a.size, device=dev) % 3).reshape(a.batch, a.size, a.size)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for mode in ("train", "infer"):
        times = []
        for i in range(a.warmup + a.steps):
            x = torch.rand(a.batch, 1, a.size, a.size, device=dev)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            if mode == "train":
                net.train()
                opt.zero_grad()
                with autocast:
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                loss.backward()
                opt.step()
            else:
                net.eval()
                with torch.no_grad(), autocast:
                    net(x).argmax(1)
            if cuda:
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        rate = a.batch / statistics.median(times)
        tflops = rate * flops * (3 if mode == "train" else 1) / 1e12
        norm = "" if BATCH_NORM else ", without batch norm"
        line = f"torch {mode}: {rate:.2f} slices/s ({precision}{norm}, {tflops:.2f} TFLOP/s"
        if cuda:
            line += f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        print(line + f"; {flops / 1e9:.3f} GFLOP per forward slice)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--mode", default="fp32", choices=["fp32", "tf32", "bf16", "all"])
    p.add_argument("--no-batch-norm", action="store_true", help="the study's U-Net, without batch norm")
    a = p.parse_args()
    global BATCH_NORM
    BATCH_NORM = not a.no_batch_norm
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    modes = ["fp32", "tf32", "bf16"] if a.mode == "all" else [a.mode]
    for precision in modes:
        run(a, precision, dev)


if __name__ == "__main__":
    main()
