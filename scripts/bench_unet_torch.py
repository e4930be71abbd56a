#!/usr/bin/env python3
"""The PyTorch side of `kpipe bench train|infer`: the same U-Net (two 3x3 conv + BN +
ReLU per level, 4 downs, 2x2 transposed-conv up, concat skips, 1 input channel, 3
classes), batch of random slices, Adam, cross-entropy; median slices per second.

    python3 scripts/bench_unet_torch.py --size 64 --base 16 --batch 8 --threads 1

Run it beside `kpipe bench train --size 64 --base 16 --batch 8 --threads 1` in one
session and compare the two figures (the machines here are shared and noisy).
"""
import argparse
import statistics
import time

import torch
from torch import nn


def block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    net = UNet(a.base)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    y = (torch.arange(a.batch * a.size * a.size) % 3).reshape(a.batch, a.size, a.size)
    for mode in ("train", "infer"):
        times = []
        for i in range(a.steps + 1):
            x = torch.rand(a.batch, 1, a.size, a.size)
            t = time.perf_counter()
            if mode == "train":
                net.train()
                opt.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()
            else:
                net.eval()
                with torch.no_grad():
                    net(x).argmax(1)
            if i > 0:
                times.append(time.perf_counter() - t)
        print(f"torch {mode}: {a.batch / statistics.median(times):.2f} slices/s")


if __name__ == "__main__":
    main()
