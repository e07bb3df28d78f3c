"""Train the FD-FMNIST feature classifier on the Fashion-MNIST train split and save it as safetensors.

    python -m moezoo.tasks.generation.train_classifier --epochs 5
        --out tasks/generation/weights/fd_fmnist_cnn.safetensors

Images are scaled to ``[-1, 1]`` (the generation task's range). Seeded; prints the test accuracy at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moezoo.tasks.generation.data import fashion_mnist_unit_range
from moezoo.tasks.generation.fd import WEIGHTS_PATH, FMNISTClassifier
from moezoo.tasks.vision.data import FASHION_MNIST_DEBIAN_ROOT, random_shift


@torch.no_grad()
def accuracy(model: FMNISTClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    return correct / len(y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=FASHION_MNIST_DEBIAN_ROOT)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS_PATH))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train = fashion_mnist_unit_range(Path(args.root), "train")
    x_test, y_test = fashion_mnist_unit_range(Path(args.root), "test")
    model = FMNISTClassifier()
    steps = args.epochs * (len(x_train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            xb = random_shift(x_train[idx], 1)
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (i + 1) % 100 == 0:
                print(
                    f"epoch {epoch + 1} step {i + 1}: loss {float(loss.detach()):.3f} ({time.time() - start:.0f}s)",
                    flush=True,
                )
        print(
            f"epoch {epoch + 1}: test acc {accuracy(model, x_test, y_test):.4f} ({time.time() - start:.0f}s)",
            flush=True,
        )
    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    print(f"saved {out} ({out.stat().st_size} bytes); test accuracy {accuracy(model, x_test, y_test):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
