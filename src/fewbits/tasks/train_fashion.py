"""Train the fashion-cnn / fashion-mlp checkpoints: ``python -m fewbits.tasks.train_fashion
[--model mlp]`` (``make train``).

Two epochs of Adam on the 60k training images, fixed seed; prints test accuracy and writes
the checkpoint atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .base import accuracy
from .data.fashion_mnist import load_fashion_mnist, normalise
from .models.fashion_cnn import CHECKPOINT_SCHEMA, MODELS


def train(epochs: int = 2, seed: int = 0, batch: int = 128, lr: float = 2e-3, kind: str = "cnn") -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train")
    x = normalise(x)
    model = MODELS[kind][0]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (len(x) // batch))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        t0 = time.time()
        for step, i in enumerate(range(0, len(x) - batch + 1, batch)):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                print(f"\repoch {epoch + 1}/{epochs} step {step} loss {loss.item():.3f}", end="", file=sys.stderr, flush=True)
        print(f"\repoch {epoch + 1}/{epochs} done in {time.time() - t0:.0f}s" + " " * 20, file=sys.stderr)
    xt, yt = load_fashion_mnist("test")
    return model.eval(), accuracy(model.eval(), normalise(xt), yt) / 100


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", choices=sorted(MODELS), default="cnn")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.out = args.out or MODELS[args.model][1]
    torch.set_num_threads(2)
    model, acc = train(args.epochs, kind=args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save({"schema_version": CHECKPOINT_SCHEMA, "state_dict": model.state_dict(),
                "meta": {"epochs": args.epochs, "test_accuracy": acc}}, tmp)
    os.replace(tmp, args.out)
    print(f"test accuracy {acc:.4f}; checkpoint: {args.out}")


if __name__ == "__main__":
    main()
