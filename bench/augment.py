"""CIFAR-10 augmentation and training throughput: the toolkit's against the usual way.

1. Augmented images per second: the on-device batched pad-crop-flip of
   :class:`toolkit.data.cifar.PadCropFlip` through ``DeviceTensors`` against a torchvision
   ``transforms`` pipeline (the same pad 4, random crop 32, flip, normalize) in a
   ``DataLoader`` with 2 workers, on the same images, batch 256.
2. Training images per second of the toolkit loop (``Trainer.optimizer_step`` over
   ``DeviceTensors``) against a hand-written PyTorch loop on the same model (ResNet-9, width
   16), batches, AdamW and 1cycle; the ratio is the toolkit's overhead.

    python bench/augment.py --data-dir ../shared/data/cifar-10-batches-bin
    python bench/augment.py --data-dir ... --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from report import device_name, emit
from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
from toolkit.data.cifar import channel_stats, device_data, load_cifar10
from toolkit.models.resnet9 import ResNet9
from toolkit.trainer import Trainer

BATCH = 256


class TorchvisionCifar(Dataset):
    """The same augmentation the usual way: PIL images through torchvision transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        from torchvision import transforms as T

        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels
        self.tf = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4, padding_mode="symmetric"),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tf(self.images[i]), self.labels[i]


def images_per_s(batches, n_batches: int) -> float:
    it = iter(batches)
    next(it)  # start-up (workers) is not counted
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * BATCH / (time.perf_counter() - start)


def plain_loop(model, train_set, steps: int, lr: float) -> list[float]:
    """A hand-written loop: the same batches, fused AdamW and torch's OneCycleLR."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.99), weight_decay=0.1,
                            fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.4625)
    it, times = train_set.batches(0), []
    model.train()
    for _ in range(steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter())
    return times


def toolkit_loop(model, train_set, steps: int, lr: float) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, train_set, None, train=TrainConfig(
            output_dir=out, max_steps=steps, batch_size=BATCH, progress=False),
            optim=OptimConfig(lr=lr, wd=0.1, no_decay_bias_norm=False),
            schedule=ScheduleConfig(pct=0.075))
        it, times = trainer.train_data.batches(0), []
        trainer.model.train()
        for _ in range(steps):
            trainer.optimizer_step(it)
            times.append(time.perf_counter())
        trainer.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batches", type=int, default=40, help="augmented batches timed")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    data = load_cifar10(args.data_dir)
    mean, std = channel_stats(data.train_x)
    device = torch.device("cpu")
    ours = device_data(data)[0].shard(batch_size=BATCH, world=1, rank=0, accum=1, device=device)
    theirs = DataLoader(TorchvisionCifar(data.train_x, data.train_y, mean, std),
                        batch_size=BATCH, shuffle=True, num_workers=2, persistent_workers=True)
    aug = {"toolkit on-device": [], "torchvision, 2 workers": []}
    for _ in range(args.rounds):
        aug["toolkit on-device"].append(images_per_s(ours.batches(0), args.batches))
        aug["torchvision, 2 workers"].append(images_per_s(theirs, args.batches))
    loops = {"plain PyTorch": [], "toolkit Trainer": []}
    for _ in range(args.rounds):
        for name, loop in (("plain PyTorch", plain_loop), ("toolkit Trainer", toolkit_loop)):
            torch.manual_seed(0)
            times = loop(ResNet9(16), ours, args.steps + 5, 4e-3)[5:]  # 5 warm-up steps
            loops[name].append(BATCH * (len(times) - 1) / (times[-1] - times[0]))
    med = {k: statistics.median(v) for k, v in {**aug, **loops}.items()}
    base_aug, base_loop = med["torchvision, 2 workers"], med["plain PyTorch"]
    lines = [f"### {datetime.date.today()}, {device_name()}, torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}, median of {args.rounds} rounds",
             "", f"`python bench/augment.py --data-dir {args.data_dir}`", "",
             "| what | images/s | ratio |", "|---|---|---|"]
    for k in aug:
        lines.append(f"| augmentation: {k} | {med[k]:,.0f} | {med[k] / base_aug:.2f}x |")
    for k in loops:
        lines.append(f"| training ResNet-9 w16, batch {BATCH}: {k} | {med[k]:,.0f} | "
                     f"{med[k] / base_loop:.3f}x |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
