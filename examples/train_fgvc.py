"""Train a fine-grained classifier with MC-Loss on class folders (CUB-200-2011, Stanford Cars,
FGVC-Aircraft, ...), laid out for torchvision's ImageFolder: DIR/train/<class>/*.jpg and
DIR/val/<class>/*.jpg (DIR/test/ is used when there is no DIR/val/).

The network is a torchvision backbone whose last feature map feeds MC-Loss, plus a classifier
head on that map that gives the cross-entropy logits (as in the authors' code):

    features = backbone(images)                  # (B, C, H, W), C split into K groups
    logits = head(global_max_pool(features))     # (B, K)
    loss = CE(logits, y) + mu * (alpha * L_dis + beta * L_div)

Backbones: vgg16_bn / vgg16 with conv4_3 and conv5_3 widened to K*cnum channels and the last
max pool removed, as published (cnum=3: 600 channels, 14x14 at 224 px, for CUB-200); a stock
resnet50 (2048 channels) or resnet18 (512), split into K balanced groups (cnum=None).

Presets (every value can be overridden on the command line; sources: the authors' code,
github.com/PRIS-CV/Mutual-Channel-Loss, CUB-200-2011.py, CUB-200-2011_ResNet18.py, MC_ResNet50.py):
  scratch          from scratch: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 32, 300 epochs, lr x0.1
                   at epochs 150 and 225, 224 px, alpha 1.5, beta 20, mu 1 (resnet18 by default)
  paper-vgg16-cub  scratch on the widened vgg16_bn with cnum 3 (the paper's VGG16 row)
  paper-resnet50   ImageNet resnet50, 448 px crops of 600 px images, batch 64, 300 epochs, cosine
                   lr from 0.1 (head) and 0.01 (backbone), 4 channels of every group dropped,
                   mu 0.0005, alpha 1, beta 20: their loss was CE + 0.0005 * (L_dis + 10 * L_div)
                   with L_div the sum of two means (over the 152 groups of 10 channels and the
                   48 of 11), about twice the single mean over all groups that MC-Loss takes

    python examples/train_fgvc.py --data CUB --preset paper-vgg16-cub --amp --out runs/vgg
    torchrun --nproc_per_node 4 examples/train_fgvc.py --data CUB --preset paper-resnet50 --amp
    python examples/train_fgvc.py --data CUB --resume runs/vgg/last.pt --out runs/vgg

Needs torchvision (pip install "mcloss_cuda[recipe]"); tqdm is optional.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import mcloss_cuda as mc
except ImportError:  # run from a checkout without installing: the package is one level up
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import mcloss_cuda as mc

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

SCRATCH = dict(
    arch="resnet18",
    weights="none",
    epochs=300,
    batch_size=32,
    image_size=224,
    resize_ratio=1.0,
    crop_padding=4,
    lr=0.1,
    backbone_lr_scale=1.0,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="step",
    milestones=[150, 225],
    alpha=1.5,
    beta=20.0,
    mu=1.0,
    drop=None,
    cnum=None,
)
PRESETS = {
    "scratch": SCRATCH,
    "paper-vgg16-cub": dict(SCRATCH, arch="vgg16_bn", cnum=3),
    "paper-resnet50": dict(
        SCRATCH,
        arch="resnet50",
        weights="imagenet",
        batch_size=64,
        image_size=448,
        resize_ratio=600 / 448,
        crop_padding=0,
        backbone_lr_scale=0.1,
        schedule="cosine",
        alpha=1.0,
        beta=20.0,
        mu=0.0005,
        drop=4,
    ),
}
ARCHS = ("vgg16", "vgg16_bn", "resnet50", "resnet18")


def cnum_arg(text):
    return None if text.lower() == "none" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="scratch",
        help="published settings, see above; the options below override them",
    )
    p.add_argument("--data", required=True, help="folder with train/ and val/ (or test/)")
    p.add_argument("--out", default="runs/fgvc", help="last.pt, best.pt, metrics.json go here")
    p.add_argument("--arch", choices=ARCHS, help="vgg16_bn is the published VGG16")
    p.add_argument("--weights", choices=("none", "imagenet"), help="imagenet: downloads")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="default: the number of class folders in train/",
    )
    p.add_argument(
        "--cnum",
        type=cnum_arg,
        help="channels per class, or 'none' for balanced "
        "groups over the backbone's channels (vgg: default 3)",
    )
    p.add_argument("--alpha", type=float, help="weight of L_dis inside MC-Loss")
    p.add_argument("--beta", type=float, help="weight of L_div inside MC-Loss")
    p.add_argument("--mu", type=float, help="weight of MC-Loss next to the cross-entropy")
    p.add_argument("--drop", type=int, help="channels masked per group (default: half)")
    p.add_argument(
        "--pooling",
        choices=("max", "avg"),
        default="max",
        help="MC-Loss's discriminality pooling: max (CCMP, published) or avg (CCAP, "
        "the paper's ablation)",
    )
    p.add_argument(
        "--head",
        choices=("paper", "linear"),
        default="paper",
        help="paper: max pool, BN, fc 512, BN, ELU, fc; linear: avg pool, fc",
    )
    p.add_argument("--epochs", type=int, help="the last epoch (a resumed run goes on to it)")
    p.add_argument("--batch-size", type=int, help="per process (global = x world size)")
    p.add_argument("--image-size", type=int, help="crop side")
    p.add_argument(
        "--resize",
        type=int,
        help="images are resized to a square of this side "
        "before cropping (default: image size x the preset's ratio)",
    )
    p.add_argument("--resize-ratio", type=float, help=argparse.SUPPRESS)
    p.add_argument("--crop-padding", type=int, help="padding of the random crop")
    p.add_argument("--lr", type=float, help="lr of the head")
    p.add_argument("--backbone-lr-scale", type=float, help="backbone lr = lr x this")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay")
    p.add_argument("--schedule", choices=("step", "cosine"), help="lr schedule, per epoch")
    p.add_argument("--milestones", type=int, nargs="*", help="step schedule: lr x0.1 there")
    p.add_argument(
        "--amp",
        action="store_true",
        help="autocast (float16 + GradScaler on CUDA, bfloat16 on the CPU)",
    )
    p.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:1, cpu (under torchrun: cuda:LOCAL_RANK)",
    )
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="cap the train and val batches per epoch (0: no cap), for smoke tests",
    )
    p.add_argument("--seed", type=int, default=0, help="weights, masks, augmentation")
    p.add_argument("--resume", default=None, help="a last.pt to continue from")
    p.add_argument(
        "--progress",
        choices=("auto", "tqdm", "plain"),
        default="auto",
        help="auto: tqdm on a terminal when installed, else a line every --log-every",
    )
    p.add_argument("--log-every", type=int, default=20)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="scratch")
    # the preset fills in what the command line leaves out (and shows in --help)
    p.set_defaults(**PRESETS[pre.parse_known_args(argv)[0].preset])
    args = p.parse_args(argv)
    if args.resize is None:
        args.resize = round(args.image_size * args.resize_ratio)
    return args


def require_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.exit(
            "train_fgvc.py needs torchvision: pip install torchvision tqdm "
            '(or pip install "mcloss_cuda[recipe]")'
        )


# ---------------------------------------------------------------------------------------------
# the model


def _copy_overlap(new, old):
    """Warm-start a resized conv or BatchNorm from a pretrained one, on the shared channels."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if src is not None and dst is not None:
                index = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
                dst[index] = src[index]
    return new


def widened_vgg16(batch_norm, width, weights):
    """VGG16 conv layers as in the MC-Loss paper: conv4_3 and conv5_3 give `width` channels
    (conv5_1 reads the widened conv4_3), and the last max pool is dropped (stride 16)."""
    from torchvision import models

    if weights is None:  # the conv layers only: the 120M-parameter classifier is not used
        layers = list(models.vgg.make_layers(models.vgg.cfgs["D"], batch_norm=batch_norm))
    else:
        layers = list((models.vgg16_bn if batch_norm else models.vgg16)(weights=weights).features)
    assert isinstance(layers[-1], nn.MaxPool2d)
    layers.pop()
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
    for which, (c_in, c_out) in {9: (512, width), 10: (width, 512), 12: (512, width)}.items():
        i = convs[which]
        wide = [nn.Conv2d(c_in, c_out, 3, padding=1)] + [nn.BatchNorm2d(c_out)] * batch_norm
        for j, layer in enumerate(wide, i):
            if weights is None:
                layers[j] = layer
            else:  # warm start: pretrained weights on the shared channels, fresh on the rest
                init_vgg([layer])
                layers[j] = _copy_overlap(layer, layers[j])
    if weights is None:
        init_vgg(layers)
    return nn.Sequential(*layers), width


def init_vgg(layers):
    """torchvision's VGG initialisation."""
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(arch, weights_name, num_classes, cnum):
    """(module images -> (B, C, H, W), C)."""
    from torchvision import models

    weights = None
    if weights_name == "imagenet":  # torchvision downloads these on first use
        weights = models.get_model_weights(arch).DEFAULT
    if arch.startswith("vgg16"):
        return widened_vgg16(arch == "vgg16_bn", num_classes * (cnum or 3), weights)
    net = getattr(models, arch)(weights=weights)
    channels = net.fc.in_features
    if isinstance(cnum, int) and cnum * num_classes != channels:
        sys.exit(
            f"--cnum {cnum}: {arch}'s last map has {channels} channels, not "
            f"{cnum} x {num_classes}; use --cnum none (balanced groups) or a vgg16"
        )
    return nn.Sequential(*list(net.children())[:-2]), channels  # no avgpool, no fc


class MCNet(nn.Module):
    """Backbone plus classifier head; forward returns (features for MC-Loss, logits for CE).

    The authors' ResNet heads max-pool the whole map; their VGG16 head flattened a 2x2 max pool
    of it instead (600x7x7 at 224 px): here every head pools globally, for any image size."""

    def __init__(self, backbone, channels, num_classes, head="paper", hidden=512):
        super().__init__()
        self.backbone = backbone
        self.pool = "max" if head == "paper" else "avg"
        if head == "paper":  # the authors' head: BN, fc, BN, ELU, fc on the pooled features
            self.head = nn.Sequential(
                nn.BatchNorm1d(channels),
                nn.Linear(channels, hidden),
                nn.BatchNorm1d(hidden),
                nn.ELU(inplace=True),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.head = nn.Linear(channels, num_classes)

    def forward(self, images):
        features = self.backbone(images)
        pooled = features.amax(dim=(2, 3)) if self.pool == "max" else features.mean(dim=(2, 3))
        return features, self.head(pooled)


# ---------------------------------------------------------------------------------------------
# data


def build_data(args, rank, world):
    from torchvision import datasets, transforms

    root_val = os.path.join(args.data, "val")
    if not os.path.isdir(root_val):
        root_val = os.path.join(args.data, "test")
    for root in (os.path.join(args.data, "train"), root_val):
        if not os.path.isdir(root):
            sys.exit(f"--data {args.data}: expected class folders in {root}")
    # the authors normalise with 0.5 everywhere; pretrained weights expect ImageNet's statistics
    if args.weights == "imagenet":
        normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    else:
        normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    size = (args.resize, args.resize)
    train_tf = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.RandomCrop(args.image_size, padding=args.crop_padding),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(args.image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train_set = datasets.ImageFolder(os.path.join(args.data, "train"), train_tf)
    val_set = datasets.ImageFolder(root_val, val_tf)
    if val_set.classes != train_set.classes:
        sys.exit(f"the class folders of {root_val} differ from those of train/")
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(
            train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True
        )
        # every rank scores a disjoint share of val (no padding), the counts are summed
        val_set = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    common = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=args.device.startswith("cuda"),
        persistent_workers=args.workers > 0,
    )
    # drop_last as published: the BatchNorm1d of the head cannot train on a batch of one
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=sampler is None, sampler=sampler, drop_last=True, **common
    )
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader, train_set.classes


# ---------------------------------------------------------------------------------------------
# training


class Progress:
    """A tqdm bar, or one plain line every `every` steps; silent off rank 0."""

    def __init__(self, total, desc, mode, every, enabled):
        use_tqdm = tqdm is not None and (mode == "tqdm" or mode == "auto" and sys.stderr.isatty())
        self.bar = tqdm(total=total, desc=desc, leave=False) if enabled and use_tqdm else None
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled

    def want_text(self, step):
        return self.enabled and (step % self.every == 0 or step == self.total)

    def update(self, step, text=None):
        if self.bar is not None:
            self.bar.update(1)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        elif text:
            print(f"  {self.desc} {step}/{self.total} {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def lr_factor(args, epoch):
    """The lr multiplier of a 1-based epoch."""
    if args.schedule == "cosine":  # from 1 down to ~0 over the run
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / args.epochs))
    return 0.1 ** sum(epoch >= m for m in args.milestones)


def reduce_sum(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def train_one_epoch(
    args, epoch, model, mcloss, loader, optimizer, scaler, autocast, device, world, rank
):
    model.train()
    steps = min(len(loader), args.max_steps) if args.max_steps else len(loader)
    # sums of loss, ce, dis, div (times batch size), correct, count: on the device, no syncs
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    bar = Progress(steps, f"epoch {epoch}/{args.epochs}", args.progress, args.log_every, rank == 0)
    for step, (images, targets) in enumerate(loader, 1):
        if step > steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)  # int64, as MC-Loss wants
        with autocast():
            features, logits = model(images)
            ce = F.cross_entropy(logits, targets)
            out = mcloss(features, targets)  # MCLossOutput(loss, dis, div, logits)
            loss = ce + args.mu * out.loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = targets.numel()
        parts = torch.stack([loss.detach(), ce.detach(), out.dis.detach(), out.div.detach()])
        sums[:4] += parts.double() * n
        sums[4] += (logits.detach().argmax(1) == targets).sum()
        sums[5] += n
        text = None
        if bar.want_text(step):
            s = sums.tolist()
            text = f"loss {s[0] / s[5]:.4f} acc {s[4] / s[5]:.3f}"
        bar.update(step, text)
    bar.close()
    s = reduce_sum(sums, world).tolist()
    count = max(s[5], 1.0)
    return dict(
        steps=steps,
        train_loss=s[0] / count,
        train_ce=s[1] / count,
        train_dis=s[2] / count,
        train_div=s[3] / count,
        train_acc=s[4] / count,
    )


@torch.no_grad()
def evaluate(args, model, loader, autocast, device, world):
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # ce sum, correct, count
    for step, (images, targets) in enumerate(loader, 1):
        if args.max_steps and step > args.max_steps:
            break
        images, targets = images.to(device), targets.to(device)
        with autocast():
            _, logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum")
        sums[1] += (logits.argmax(1) == targets).sum()
        sums[2] += targets.numel()
    s = reduce_sum(sums, world).tolist()
    return dict(val_loss=s[0] / max(s[2], 1.0), val_acc=s[1] / max(s[2], 1.0))


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def print_table(history):
    cols = [
        ("epoch", "{:d}"),
        ("lr", "{:.2e}"),
        ("train_loss", "{:.4f}"),
        ("train_ce", "{:.4f}"),
        ("train_dis", "{:.4f}"),
        ("train_div", "{:.4f}"),
        ("train_acc", "{:.4f}"),
        ("val_loss", "{:.4f}"),
        ("val_acc", "{:.4f}"),
        ("time_s", "{:.1f}"),
    ]
    rows = [[fmt.format(h[name]) for name, fmt in cols] for h in history]
    widths = [max(len(name), *(len(r[i]) for r in rows)) for i, (name, _) in enumerate(cols)]
    print("  ".join(name.rjust(w) for (name, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def main(argv=None):
    args = parse_args(argv)
    require_torchvision()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:  # under torchrun: one process per GPU (or several CPU processes on gloo)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # the same seed on every rank: the same initial weights and the same MC-Loss masks
    torch.manual_seed(args.seed)

    train_loader, val_loader, classes = build_data(args, rank, world)
    if len(train_loader) == 0:
        sys.exit(f"train/ has fewer images than one batch of {args.batch_size} per process")
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        sys.exit(f"--num-classes {num_classes}, but train/ has {len(classes)} class folders")
    backbone, channels = build_backbone(args.arch, args.weights, num_classes, args.cnum)
    cnum = (args.cnum or 3) if args.arch.startswith("vgg16") else args.cnum
    model = MCNet(backbone, channels, num_classes, args.head).to(device)
    mcloss = mc.MCLoss(
        num_classes, cnum, alpha=args.alpha, beta=args.beta, drop=args.drop, pooling=args.pooling
    )

    optimizer = torch.optim.SGD(
        [
            {"params": model.head.parameters(), "lr_scale": 1.0},
            {"params": model.backbone.parameters(), "lr_scale": args.backbone_lr_scale},
        ],
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    amp_dtype = getattr(
        torch, args.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if args.amp else nullcontext()

    start_epoch, history, best = 1, [], {"val_acc": -1.0, "epoch": 0}
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        if (ckpt["arch"], ckpt["num_classes"], ckpt["channels"]) != (
            args.arch,
            num_classes,
            channels,
        ):
            sys.exit(
                f"--resume {args.resume}: a {ckpt['arch']} for {ckpt['num_classes']} "
                f"classes with {ckpt['channels']} channels; this run: {args.arch}, "
                f"{num_classes}, {channels}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(
            f"{args.arch} (weights: {args.weights}): {channels} channels for {num_classes} "
            f"classes (cnum={cnum}), MC-Loss backend {mc.backend(device)}, {world} "
            f"process(es), preset {args.preset}, epochs {start_epoch}..{args.epochs}",
            flush=True,
        )
    for epoch in range(start_epoch, args.epochs + 1):
        torch.manual_seed(args.seed + epoch)  # a resumed run draws what a straight one would
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * group["lr_scale"] * lr_factor(args, epoch)
        started = time.time()
        row = {"epoch": epoch, "lr": args.lr * lr_factor(args, epoch)}
        row.update(
            train_one_epoch(
                args,
                epoch,
                net,
                mcloss,
                train_loader,
                optimizer,
                scaler,
                autocast,
                device,
                world,
                rank,
            )
        )
        row.update(evaluate(args, net, val_loader, autocast, device, world))
        row["time_s"] = time.time() - started
        history.append(row)
        if rank == 0:
            print(
                f"epoch {epoch}/{args.epochs}: loss {row['train_loss']:.4f} (ce "
                f"{row['train_ce']:.4f}, dis {row['train_dis']:.4f}, div "
                f"{row['train_div']:.4f}), train acc {row['train_acc']:.4f}, val acc "
                f"{row['val_acc']:.4f}, {row['time_s']:.1f} s",
                flush=True,
            )
            is_best = row["val_acc"] > best["val_acc"]
            if is_best:
                best = {"val_acc": row["val_acc"], "epoch": epoch}
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "history": history,
                "arch": args.arch,
                "num_classes": num_classes,
                "channels": channels,
                "cnum": cnum,
                "classes": classes,
            }
            save_atomic(ckpt, os.path.join(args.out, "last.pt"))
            if is_best:
                save_atomic(ckpt, os.path.join(args.out, "best.pt"))
            config = {k: v for k, v in vars(args).items()}
            config.update(num_classes=num_classes, channels=channels, cnum=cnum, world=world)
            with open(os.path.join(args.out, "metrics.json"), "w") as f:
                json.dump({"config": config, "epochs": history, "best": best}, f, indent=1)
    if rank == 0 and history:
        print_table(history)
        print(
            f"best val top-1 {best['val_acc']:.4f} at epoch {best['epoch']}; "
            f"checkpoints and metrics.json in {args.out}"
        )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
