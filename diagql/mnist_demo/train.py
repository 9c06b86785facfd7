"""Train the demo LeNet-5 on the training half of the 5,000 digits and save its weights.

Run ``python -m diagql.mnist_demo.train [--out PATH] [--epochs N] [--arch wide]
[--checkpoints DIR]``: ``--checkpoints`` also saves the weights after every epoch as
``DIR/epoch<N>.pt`` (for ``diagql --demo --checkpoint 'DIR/*.pt'``), ``--arch wide`` trains the
twice-as-wide variant. Training is seeded and single-threaded so that reruns on the same
machine write byte-identical weights.
"""

import argparse
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_digits_5k, split_indices
from .model import ARCHITECTURES, WEIGHTS_PATH

SEED = 0
BATCH_SIZE = 50
LEARNING_RATE = 1e-3


def make_deterministic(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    # Parallel reductions may sum in a different order with another thread count.
    torch.set_num_threads(1)


def train_epoch(model, optimizer, X, y, generator):
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(X), generator=generator)
    total = 0.0
    for batch in order.split(BATCH_SIZE):
        optimizer.zero_grad()
        loss = loss_fn(model(X[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(X)


@torch.no_grad()
def predict(model, X):
    model.eval()
    return model(X).argmax(dim=1)


def save_state_dict(model, path):
    # torch.save names the archive after the file it writes to; going through a buffer
    # makes the bytes, and so the sha256, the same whatever --out is called.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where to save the state dict")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="lenet5",
                        help="the demo's LeNet-5, or its twice-as-wide variant")
    parser.add_argument("--checkpoints", type=Path, metavar="DIR",
                        help="also save the weights after every epoch as DIR/epoch<N>.pt")
    args = parser.parse_args(argv)
    if args.arch != "lenet5" and args.out == WEIGHTS_PATH:
        parser.error("--arch wide needs --out: the shipped weights are the LeNet-5's")

    start = time.perf_counter()
    make_deterministic(SEED)
    X, y = load_digits_5k()
    train_idx, test_idx = split_indices(y, seed=SEED)
    X_train, y_train, X_test, y_test = X[train_idx], y[train_idx], X[test_idx], y[test_idx]

    model = ARCHITECTURES[args.arch]()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(model, optimizer, X_train, y_train, generator)
        print(f"epoch {epoch}: train loss {loss:.4f}")
        if args.checkpoints is not None:
            save_state_dict(model, args.checkpoints / f"epoch{epoch}.pt")

    train_acc = (predict(model, X_train) == y_train).float().mean().item()
    test_pred = predict(model, X_test)
    wrong = test_pred != y_test
    print(f"train accuracy {train_acc:.4f}, held-out accuracy {1 - wrong.float().mean().item():.4f}")
    print(f"misclassified held-out items: {int(wrong.sum())} of {len(y_test)}")
    print("misclassified per true label:", torch.bincount(y_test[wrong], minlength=10).tolist())

    save_state_dict(model, args.out)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    print(f"saved {args.out} ({args.out.stat().st_size} bytes), sha256 {sha256_of(args.out)}")


if __name__ == "__main__":
    main()
