"""Are the demo's samples recognisable digits? A classifier fitted on the same digits judges.

    python benchmarks/demo_quality.py --checkpoint checkpoints/demo/ckpt.pt --n 500

Trains a small CNN on the embedded digits at the checkpoint's resolution, draws n samples from
the checkpoint's EMA model, and prints the share classified with probability >= 0.9, how many
of the ten digits appear, and the timings. The issue's bar: >= 80% confident, all ten digits.
The judge is fitted on all 5,000 digits; the same recipe fitted on 4,500 reports its held-out
accuracy and its confidence on 500 real digits it never saw (the ceiling for the samples).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from smol_diffusion import load_checkpoint
from smol_diffusion.data import mnist_5k, mnist_5k_arrays


def digit_classifier() -> nn.Module:
    """A small CNN for 1-channel digits of any size (global pooling before the head)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.3), nn.Linear(128, 10))


def train_classifier(image_size: int, holdout: int = 0, epochs: int = 20,
                     seed: int = 0) -> tuple[nn.Module, float]:
    """Fit the CNN on all but `holdout` random digits; returns it (eval mode) and its accuracy
    on the held-out ones (nan when holdout is 0)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = mnist_5k(image_size).images  # (5000, 1, H, W) in [-1, 1]
    y = torch.from_numpy(mnist_5k_arrays()[1])
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[holdout:], perm[:holdout]
    net = digit_classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(tr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            xb = x[idx]
            # small random shifts, so the classifier does not lean on exact pixel positions
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[va]).argmax(1) == y[va]).float().mean().item() if holdout else float("nan")
    return net, acc


@torch.no_grad()
def score(net: nn.Module, images: torch.Tensor, threshold: float = 0.9) -> dict:
    """Share of images classified with probability >= threshold, and the classes seen."""
    p = F.softmax(net(images.float().cpu()), dim=1)
    conf, cls = p.max(1)
    confident = conf >= threshold
    counts = torch.bincount(cls[confident], minlength=10)
    return {"n": len(images), "confident": confident.float().mean().item(),
            "classes": int((counts > 0).sum()), "counts": counts.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/demo/ckpt.pt")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (config's)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    size = ckpt.config.model.image_size
    t0 = time.time()
    # The same recipe fitted on 4,500 digits shows how well it generalises and how confident it
    # is on 500 real digits it never saw: the ceiling for the samples' score.
    check, acc = train_classifier(size, holdout=500)
    x_real = mnist_5k(size).images[torch.randperm(5000, generator=torch.Generator().manual_seed(0))]
    real = score(check, x_real[:500])
    net, _ = train_classifier(size)  # the judge: fitted on all 5,000 digits
    t1 = time.time()
    print(f"classifier at {size}x{size} ({t1 - t0:.0f}s for both fits): held-out accuracy "
          f"{acc:.3f}; {real['confident']:.1%} of 500 held-out real digits classified with "
          f"p >= 0.9 ({real['classes']}/10 classes)")
    gen = torch.Generator().manual_seed(args.seed)
    samples = torch.cat([ckpt.sample(min(250, args.n - i), generator=gen, steps=args.steps)
                         for i in range(0, args.n, 250)])
    t2 = time.time()
    s = score(net, samples)
    steps = args.steps or ckpt.config.diffusion.sample_steps
    print(f"samples ({ckpt.step} training steps, {steps} sampling steps, {t2 - t1:.0f}s): "
          f"{s['confident']:.1%} of {s['n']} classified with p >= 0.9, {s['classes']}/10 "
          f"classes, counts {s['counts']}")


if __name__ == "__main__":
    main()
