"""Train a small CNN with MC-Loss on a synthetic fine-grained data set, on the CPU.

The data set is generated here (nothing is downloaded). Every image shows the same kind of
object, a blob of random colour at a random place on a noisy background, with three small
textured "parts" (head, wing, tail) at fixed places relative to the object. A class is a
combination of textures at the three parts (stripes, checks, dots, ...), so two classes can
differ by the texture of one 6x6 part only, in a random colour and under noise: the features
must look at the right places, which is what MC-Loss encourages.

The same network is trained twice from the same initial weights on the same data and batches:
once with cross-entropy alone, once with cross-entropy + MC-Loss on the last feature map
(CE + alpha * L_dis + beta * L_div, 3 channels per class as published; alpha = 1.5 as
published, beta = 2 rather than the published 20, which suits a pretrained ResNet but swamps the
classifier of this small network trained from scratch). Both test accuracies are printed.
``--save-maps maps.png`` draws, for a few test images, the per-class channel attention maps of
the MC-Loss model (``mc.channel_attention_maps``).

    python examples/train_synthetic.py                      # default: ~1 min on 2 CPU cores
    python examples/train_synthetic.py --quick --save-maps /tmp/maps.png     # ~20 s, for CI
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import mcloss_cuda as mc
except ImportError:  # run from a checkout without installing: the package is one level up
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import mcloss_cuda as mc

SIZE = 32  # image side
PATCH = 6  # side of a textured part
PARTS = {"head": (-8, -7), "wing": (3, 0), "tail": (-2, 8)}  # (dy, dx) from the object centre
TEXTURES = ["h-stripes", "v-stripes", "checks", "diagonal", "dots"]


def texture_bank():
    """(T, PATCH, PATCH) patterns in {0, 1}."""
    i = torch.arange(PATCH)[:, None].expand(PATCH, PATCH)
    j = torch.arange(PATCH)[None, :].expand(PATCH, PATCH)
    return torch.stack(
        [
            (i % 2 == 0),  # horizontal stripes
            (j % 2 == 0),  # vertical stripes
            ((i + j) % 2 == 0),  # checks
            ((i + j) % 3 == 0),  # diagonal stripes
            ((i % 3 == 1) & (j % 3 == 1)),  # dots
        ]
    ).float()


def class_table(num_classes, generator):
    """The texture of every part for every class: distinct combinations, (K, parts) ints."""
    T, P = len(TEXTURES), len(PARTS)
    combos = torch.randperm(T**P, generator=generator)[:num_classes]
    return torch.stack([(combos // T**p) % T for p in range(P)], dim=1)


def make_images(labels, table, generator, noise=0.2):
    """Images (N, 3, SIZE, SIZE) of the given classes."""
    N = labels.numel()
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    # background: smooth random colour gradient
    bg = torch.rand(N, 3, 1, 1, generator=generator) * 0.5
    tilt = (torch.rand(N, 3, 1, 1, generator=generator) - 0.5) * 0.02
    img = bg + tilt * (xx + yy - SIZE)
    # the object: an ellipse of random colour around a jittered centre
    cy = SIZE / 2 + torch.randint(-3, 4, (N,), generator=generator)
    cx = SIZE / 2 + torch.randint(-3, 4, (N,), generator=generator)
    body = (((yy - cy[:, None, None]) / 11) ** 2 + ((xx - cx[:, None, None]) / 12) ** 2) <= 1
    body_colour = torch.rand(N, 3, 1, 1, generator=generator) * 0.6 + 0.2
    img = torch.where(body[:, None], body_colour, img)
    # the parts: a class-specific texture in a random colour at each part
    bank = texture_bank()
    for p, (dy, dx) in enumerate(PARTS.values()):
        pattern = bank[table[labels, p]]  # (N, PATCH, PATCH)
        colour = torch.rand(N, 3, 1, 1, generator=generator)
        for n in range(N):
            y0 = int(cy[n]) + dy - PATCH // 2
            x0 = int(cx[n]) + dx - PATCH // 2
            region = img[n, :, y0 : y0 + PATCH, x0 : x0 + PATCH]
            img[n, :, y0 : y0 + PATCH, x0 : x0 + PATCH] = torch.where(
                pattern[n].bool(), colour[n], region * 0.5
            )
    img = img + noise * torch.randn(img.shape, generator=generator)
    return img.clamp(-0.5, 1.5)


def make_dataset(num_classes, n_train, n_test, seed):
    g = torch.Generator().manual_seed(seed)
    table = class_table(num_classes, g)
    y_train = torch.arange(n_train) % num_classes
    y_test = torch.arange(n_test) % num_classes
    x_train = make_images(y_train, table, g)
    x_test = make_images(y_test, table, g)
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, table


class Net(nn.Module):
    """A small CNN; its last feature map has num_classes * cnum channels (8 x 8 for 32 x 32)."""

    def __init__(self, num_classes, cnum):
        super().__init__()

        def block(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(3, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 48),
            nn.Conv2d(48, num_classes * cnum, 3, padding=1),
            nn.BatchNorm2d(num_classes * cnum),
            nn.ReLU(inplace=True),
        )
        # as published: global max pooling, then the classifier
        self.classifier = nn.Linear(num_classes * cnum, num_classes)

    def forward(self, x):
        f = self.features(x)
        return f, self.classifier(f.amax(dim=(2, 3)))


def accuracy(model, x, y, batch=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch])[1].argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(name, data, args, use_mc):
    x_train, y_train, x_test, y_test, _ = data
    torch.manual_seed(args.seed)  # same initial weights for both runs
    model = Net(args.classes, args.cnum)
    mc_loss = mc.MCLoss(args.classes, args.cnum, alpha=args.alpha, beta=args.beta)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    order_gen = torch.Generator().manual_seed(args.seed + 1)  # same batches for both runs
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=order_gen)
        tot = {"ce": 0.0, "dis": 0.0, "div": 0.0}
        n_batches = correct = 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            features, logits = model(x)
            ce = F.cross_entropy(logits, y)
            loss = ce
            if use_mc:
                out = mc_loss(features, y)  # random channel mask drawn from torch's RNG
                loss = ce + out.loss
                tot["dis"] += out.dis.item()
                tot["div"] += out.div.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot["ce"] += ce.item()
            n_batches += 1
            correct += (logits.argmax(1) == y).sum().item()
        msg = f"[{name}] epoch {epoch}/{args.epochs}  ce {tot['ce'] / n_batches:.3f}"
        if use_mc:
            msg += f"  L_dis {tot['dis'] / n_batches:.3f}  L_div {tot['div'] / n_batches:.3f}"
        msg += f"  train acc {correct / len(order):.3f}  ({time.time() - t0:.1f} s)"
        print(msg, flush=True)
    acc = accuracy(model, x_test, y_test)
    print(f"[{name}] test accuracy {acc:.3f}", flush=True)
    return model, acc


def save_maps(path, model, data, args, n_images=4):
    """A grid: one row per test image, the image and then the K per-class attention maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, x_test, y_test, table = data
    idx = torch.arange(n_images) * (len(x_test) // n_images) + torch.arange(n_images)
    idx = idx % len(x_test)
    x, y = x_test[idx], y_test[idx]
    model.eval()
    with torch.no_grad():
        features, logits = model(x)
    maps = mc.channel_attention_maps(features, args.classes, args.cnum)  # (n, K, 8, 8)
    maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    pred = logits.argmax(1)
    K = args.classes
    shown = x - x.amin(dim=(1, 2, 3), keepdim=True)
    shown = (shown / shown.amax(dim=(1, 2, 3), keepdim=True)).permute(0, 2, 3, 1)
    fig, axes = plt.subplots(
        n_images, K + 1, figsize=(1.35 * (K + 1), 1.5 * n_images), squeeze=False
    )
    for r in range(n_images):
        ax = axes[r, 0]
        ax.imshow(shown[r].numpy())
        ax.set_title(f"class {int(y[r])}\npred {int(pred[r])}", fontsize=7)
        for c in range(K):
            ax = axes[r, c + 1]
            ax.imshow(maps[r, c].numpy(), cmap="inferno", vmin=0)
            mark = " (true)" if c == int(y[r]) else ""
            ax.set_title(f"map {c}{mark}", fontsize=7, color="tab:green" if mark else "black")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    names = ", ".join(
        f"{c}: " + "/".join(TEXTURES[t][:4] for t in table[c].tolist()) for c in range(K)
    )
    fig.suptitle(
        "per-class channel attention maps (CCMP of the spatial softmax)\n"
        f"classes (head/wing/tail textures) {names}",
        fontsize=6,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--cnum", type=int, default=3, help="channels per class (published: 3)")
    p.add_argument("--train-size", type=int, default=1600)
    p.add_argument("--test-size", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=1.5, help="weight of L_dis (published: 1.5)")
    p.add_argument(
        "--beta",
        type=float,
        default=2.0,
        help="weight of L_div (published: 20, for a pretrained ResNet; trained from "
        "scratch here, 20 swamps the classifier)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny run (for CI): 2 epochs on 320 images"
    )
    p.add_argument("--save-maps", metavar="PATH", help="write a PNG of attention maps here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.test_size = 2, 320, 160
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    data = make_dataset(args.classes, args.train_size, args.test_size, args.seed)
    print(
        f"data: {args.train_size} train / {args.test_size} test images, {args.classes} classes, "
        f"{SIZE}x{SIZE} ({time.time() - t0:.1f} s); MC-Loss backend: {mc.backend('cpu')}",
        flush=True,
    )
    _, acc_ce = train("CE", data, args, use_mc=False)
    model, acc_mc = train("CE+MC", data, args, use_mc=True)
    print(
        f"test accuracy: cross-entropy only {acc_ce:.3f}, with MC-Loss {acc_mc:.3f}  "
        f"(total {time.time() - t0:.1f} s)"
    )
    if args.save_maps:
        save_maps(args.save_maps, model, data, args)
        print(f"attention maps written to {args.save_maps}")


if __name__ == "__main__":
    main()
