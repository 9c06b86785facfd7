"""Do the intervals of a sequence layer's token view hold? A GRU's TOKEN -1, per class.

    python benchmarks/token_views.py [--n 20000] [--samplers random maxmargin vas gmm weighted
                                      stratified] [--seeds 2]

A GRU classifier (embedding, GRU of 48 units, a Linear and ReLU, the head) trained for three
epochs on 4-class token sequences (the class: which marker token comes last, 10% of labels
flipped). Its head reads the GRU's last token through the Linear, so ``rnn TOKEN -1`` is no
view the profile holds as the latent; the profile keeps its own projections, as a sequence
block's other token view (model/auxiliaries.py), which for 48 units hold every item's row:
the answer is then exact. Before they were kept it was fitted on the latent and the GRU's
mean view's leading projections (engine/covariates.py) and checked on them
(engine/extrapolation.py); ``EXTRA_BUDGET = 0`` in model/auxiliaries.py measures that way.
For each class, seed and sampler at 5%: ``AVG NEURONS IN rnn TOKEN -1 WHERE class = c``
against its exact answer. Printed per sampler: coverage of the 95%
intervals, rms of error / standard error, expected and actual cosine distance (means over
classes and seeds).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from calibration_scale import score
from torch import nn

import diagql

CLASSES, LENGTH, VOCAB = 4, 12, 30


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.rnn = nn.GRU(24, 48, batch_first=True)
        self.fc, self.act, self.head = nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, CLASSES)

    def forward(self, tokens):
        return self.head(self.act(self.fc(self.rnn(self.embed(tokens))[0][:, -1])))


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(n, LENGTH))
    marks = np.where(x <= CLASSES, x, 0)
    last = np.array([row[row > 0][-1] - 1 if (row > 0).any() else rng.integers(CLASSES)
                     for row in marks])
    y = np.where(rng.random(n) < 0.1, rng.integers(0, CLASSES, n), last)
    return torch.from_numpy(x), torch.from_numpy(y)


def trained(x: torch.Tensor, y: torch.Tensor) -> GRUClassifier:
    torch.manual_seed(0)
    model = GRUClassifier()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        for start in range(0, len(x), 128):
            loss = nn.functional.cross_entropy(model(x[start:start + 128]),
                                               y[start:start + 128])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--samplers", nargs="+",
                        default=["random", "maxmargin", "vas", "gmm", "weighted", "stratified"])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    x, y = data(args.n)
    model = trained(x, y)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    conn = diagql.connect(model, (x, y), cache_dir=False, progress=False)
    print(f"GRU, {args.n:,} items, accuracy {accuracy:.3f}, samplers at 5%, {args.seeds} seeds")
    scores = {name: [] for name in args.samplers}
    for seed in range(args.seeds):
        conn.execute(f"SET seed = {seed}")
        for c in range(CLASSES):
            query = f"AVG NEURONS IN rnn TOKEN -1 WHERE class = {c}"
            exact = conn.query(query + " USING FULL").values
            for name in args.samplers:
                params = ", j=0.7" if name in ("maxmargin", "gmm") else ""
                result = conn.query(f"{query} USING SAMPLE {name}(0.05{params})")
                scores[name].append(score(result, exact))
    print("| sampler | coverage | rms error/se | expected cosine | actual cosine |")
    print("|---|---|---|---|---|")
    for name, rows in scores.items():
        cover, ratio, expected, actual = np.mean(rows, axis=0)
        print(f"| {name} | {cover:.3f} | {ratio:.2f} | {expected:.2e} | {actual:.2e} |")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
