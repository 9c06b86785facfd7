"""The Ray engine against the local one on 100,000 demo-sized items (docs/SCALING.md).

    python benchmarks/scale.py [--n 100000] [--workers 1 2] [--skip-local-2]

The demo's LeNet-5 over benchmarks/bigdata.py's shifted MNIST digits. Each engine runs the
same statements on a fresh connection: the profile pass (every item), a full-data query
(AVG over fc1 by class: every item, the pass stops after fc1), a 1% sample query (1,000
items) and an exact SIMILARITY of three layers (every item: feature-space moments merged per
shard). The local engine runs with torch on 1 thread and on 2 (the machine's cores); each Ray
worker runs 1 thread. Ray's fixed costs are printed apart: starting the local instance, and
starting the workers (each imports torch and receives the model and the 300 MB of data once).
Every Ray answer is compared with the 1-thread local engine's (same kernels: equal to 1e-12)
and the bytes each pass sent are printed: tasks out, states back.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from bigdata import big_data, demo_model, machine_line  # benchmarks/ is sys.path[0]

STATEMENTS = {"full query": "AVG NEURONS IN fc1 GROUP BY class",
              "1% sample query": "TOPK 10 NEURONS IN conv2 USING SAMPLE random(0.01)",
              "SIMILARITY": "SIMILARITY pool2, fc1, fc2"}


def timed(conn) -> tuple[dict, dict]:
    """Seconds of the profile pass and of each statement, and the answers."""
    seconds, answers = {}, {}
    started = time.perf_counter()
    answers["profile"] = conn.profile
    seconds["profile"] = time.perf_counter() - started
    for name, statement in STATEMENTS.items():
        started = time.perf_counter()
        answers[name] = conn.query(statement)
        seconds[name] = time.perf_counter() - started
    return seconds, answers


def largest_difference(a: dict, b: dict) -> float:
    """The largest relative difference between two runs' answers (0 for equal ones)."""
    worst = 0.0

    def compare(x, y):
        nonlocal worst
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            worst = float("inf")
        elif x.size:
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30))))

    for field in ("latents", "confidence", "predictions"):
        compare(getattr(a["profile"], field), getattr(b["profile"], field))
    for name in STATEMENTS:
        results = [(a[name], b[name])]
        while results:
            x, y = results.pop()
            compare(x.values, y.values)
            compare(x.neurons, y.neurons)
            if x.matrix is not None or y.matrix is not None:
                compare(x.matrix, y.matrix)
            results += [(x.groups[k], y.groups[k]) for k in x.groups or {}]
    return worst


def resnet50() -> torch.nn.Module:
    """ResNet-50 in plain torch (no torchvision here): bottlenecks of 3, 4, 6, 3 blocks."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inputs, width, stride):
            super().__init__()
            out = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(), nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
            self.skip = nn.Identity() if stride == 1 and inputs == out else nn.Sequential(
                nn.Conv2d(inputs, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    layers, inputs = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            layers.append(Bottleneck(inputs, width, stride if block == 0 else 1))
            inputs = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def resnet50_seconds_per_item(batch: int = 8, repeat: int = 3) -> float:
    """A ResNet-50 forward pass per 224×224 image on this CPU (best of ``repeat``)."""
    model, x = resnet50(), torch.rand(batch, 3, 224, 224)
    best = float("inf")
    with torch.inference_mode():
        model(x[:1])
        for _ in range(repeat):
            started = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - started)
    return best / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-local-2", action="store_true",
                        help="leave out the local engine on 2 threads")
    args = parser.parse_args()

    import diagql

    X, y = big_data(args.n)
    rows = []
    print(machine_line())
    print(f"{args.n:,} items, X {tuple(X.shape)} float32 ({X.numel() * 4 / 2**20:,.0f} MiB)\n")
    reference = None
    for threads in (1, 2):
        if threads == 2 and args.skip_local_2:
            continue
        torch.set_num_threads(threads)
        conn = diagql.connect(demo_model(), (X, y), cache_dir=False, progress=False)
        seconds, answers = timed(conn)
        if threads == 1:
            reference = answers
        rows.append((f"local, {threads} thread{'s' * (threads > 1)}", "", seconds,
                     largest_difference(reference, answers), None))
        print(rows[-1])
    torch.set_num_threads(1)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    ray_start = time.perf_counter() - started
    for workers in args.workers:
        conn = diagql.connect(demo_model(), (X, y), cache_dir=False, progress=False,
                              engine="ray", ray_workers=workers)
        started = time.perf_counter()
        actors = conn.engine.start()
        ray.get([actor.__ray_ready__.remote() for actor in actors])
        start = time.perf_counter() - started
        seconds, answers = timed(conn)
        rows.append((f"ray, {workers} worker{'s' * (workers > 1)}", start, seconds,
                     largest_difference(reference, answers), dict(conn.engine.traffic)))
        print(rows[-1])
        conn.engine.close()
        del conn

    base = rows[0][2]
    print(f"\nstarting the local Ray instance: {ray_start:.1f} s\n")
    print("| engine | start workers s | profile s | full query s | 1% sample query s | "
          "SIMILARITY s | profile items/s | profile vs local 1 thread | SIMILARITY vs local 1 "
          "thread | largest difference from local, 1 thread |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, start, seconds, difference, _ in rows:
        print(f"| {name} | {start if start == '' else f'{start:.1f}'} | {seconds['profile']:.2f} | "
              f"{seconds['full query']:.2f} | {seconds['1% sample query']:.2f} | "
              f"{seconds['SIMILARITY']:.2f} | {args.n / seconds['profile']:,.0f} | "
              f"{base['profile'] / seconds['profile']:.2f}× | "
              f"{base['SIMILARITY'] / seconds['SIMILARITY']:.2f}× | {difference:.1e} |")
    print("\nbytes per run of the statements (tasks out, states back):")
    for name, _, _, _, traffic in rows:
        if traffic is not None:
            print(f"  {name}: tasks {traffic['tasks'] / 1e6:.2f} MB, results "
                  f"{traffic['results'] / 1e6:.2f} MB")
    print("\nload average at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    per_item = base["profile"] / args.n
    print(f"\nper-item cost of the profile pass, local 1 thread: {per_item * 1e6:.1f} µs")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"ResNet-50 forward on this CPU, {threads} thread{'s' * (threads > 1)}: "
              f"{resnet50_seconds_per_item() * 1e3:.0f} ms per 224×224 image")


if __name__ == "__main__":
    main()
