"""Images per second of the scratch arm's training step on this CPU, with the settings that could make it faster.

Times the step ``core.train.NetworkTrainer`` runs (preprocess, forward, cross-entropy, backward, AdamW) on random
uint8 batches at 160 px, interleaved over rounds so background load hits every setting alike:

- ``current``: as ``core.train`` runs it on a CPU (the uint8 NHWC batch hands the network channels-last strides);
- ``channels_last``: the model's weights in channels_last too;
- ``nchw``: the batch made a contiguous NCHW tensor first (the conventional layout);
- ``compile``: ``torch.compile`` of the model (its compile time reported apart, not in the rate);
- ``threads=N``: torch's intra-op threads set to N (the default is torch's own choice).

    python scripts/bench_train_step.py [--batch 32] [--size 160] [--rounds 4] [--steps 3]

A setting is worth adopting when it is faster by at least 15% in every round; results are compared within this one
run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.preprocess import ImagePreprocess  # noqa: E402


def make_step(setting: str, batch: torch.Tensor, labels: torch.Tensor) -> tuple[Callable[[], None], float]:
    torch.manual_seed(0)
    model = models.build_classifier("efficientnet_lite0", 10, pretrained=False).train()
    preprocess = ImagePreprocess(model.spec.mean, model.spec.std)
    if setting == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    net: Callable[[torch.Tensor], torch.Tensor] = model
    compile_s = 0.0
    if setting == "compile":
        net = torch.compile(model)

    def step() -> None:
        x = preprocess(batch)
        if setting == "nchw":
            x = x.contiguous()
        loss = F.cross_entropy(net(x), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if setting == "compile":
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
    return step, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--settings", default="current,channels_last,nchw,compile,threads=1")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    batch = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    settings = args.settings.split(",")
    steps, notes = {}, {}
    for setting in settings:
        steps[setting], compile_s = make_step(setting, batch, labels)
        steps[setting]()  # warm-up
        if compile_s:
            notes[setting] = f"first step (compiling) {compile_s:.1f} s"
    rates: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            threads = int(setting.split("=")[1]) if setting.startswith("threads=") else default_threads
            torch.set_num_threads(threads)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[setting]()
            rates[setting].append(args.batch * args.steps / (time.perf_counter() - start))
        torch.set_num_threads(default_threads)
    base = rates[settings[0]]
    print(f"training step, efficientnet_lite0 from scratch, batch {args.batch}, {args.size} px, "
          f"torch {torch.__version__}, {default_threads} threads by default; {args.rounds} rounds x {args.steps} steps")
    for setting in settings:
        ratios = [r / b for r, b in zip(rates[setting], base)]
        print(f"{setting:<14} {statistics.median(rates[setting]):6.1f} images/s  "
              f"{statistics.median(ratios):.2f}x {settings[0]} (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
              + (f"  [{notes[setting]}]" if setting in notes else ""))


if __name__ == "__main__":
    main()
