"""Calibrate the difficulty of the embedded dermoscopy data set.

Trains a ResNet-18 (width 32 by default, from scratch) with plain cross-entropy on clean
labels of the default generated data set (1,500 images of 64², melanoma vs benign; with
``--skin4`` the denoising paper's MEL / NV / BCC / BKL in its proportions), split
70/10/20 by patient, on the shared training loop (Adam, batch 32, random horizontal flips),
and prints the final-epoch and best-validation-epoch test accuracy next to the majority-class
rate. The default difficulty is meant to put the clean-label accuracy between 75 % and 90 %
and clearly above the majority rate (~81 %): room for the noisy-label methods to differ.

    python examples/calibrate_dermoscopy.py            # a few minutes on 2 CPU cores
    python examples/calibrate_dermoscopy.py --skin4    # the denoising paper's four classes
"""

from __future__ import annotations

import argparse
import time

import torch

from fastinfluence.datasets import make_dermoscopy, split_by_patient
from fastinfluence.datasets.dermoscopy import SKIN4_MIX
from fastinfluence.models import resnet18
from fastinfluence.robust import NaiveTrainer, TrainConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--cue-separation", type=float, default=None)
    parser.add_argument("--skin4", action="store_true",
                        help="four classes MEL / NV / BCC / BKL (SKIN4_MIX) instead of binary")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    extra = {} if args.cue_separation is None else {"cue_separation": args.cue_separation}
    if args.skin4:
        extra.update(mix=SKIN4_MIX, binary=False)
    data = make_dermoscopy(args.n_images, image_size=args.image_size, seed=args.seed, **extra)
    generated = time.perf_counter() - start
    split = split_by_patient(data.patient_ids, data.labels, (0.7, 0.1, 0.2), seed=args.seed)
    train, val, test = (data.subset(part) for part in (split.train, split.val, split.test))
    counts = torch.bincount(test.labels, minlength=len(data.class_names))
    majority = counts.max().item() / len(test)
    print(f"data: {len(data)} images of {data.images.shape[-1]}^2 in {generated:.1f} s; "
          f"train/val/test {len(train)}/{len(val)}/{len(test)}; classes {data.class_names} "
          f"with test counts {counts.tolist()}; test majority rate {majority:.3f}")
    torch.manual_seed(args.seed)
    model = resnet18(len(data.class_names), width=args.width)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, recalibrate_bn=True,
                         progress=True)
    result = NaiveTrainer(model, config).fit(
        (train.images, train.labels), (val.images, val.labels), (test.images, test.labels)
    )
    for record in result.history:
        print(f"epoch {record.epoch:2d}  loss {record.train_loss:.3f}  val "
              f"{record.val_accuracy:.3f}  test {record.test_accuracy:.3f}  "
              f"({record.seconds:.1f} s)")
    print(f"final test accuracy {result.final_test_accuracy:.3f}; at best val (epoch "
          f"{result.best_epoch}) {result.test_accuracy_at_best_val:.3f}; majority "
          f"{majority:.3f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
