"""A larger data set for the engine benchmarks: the demo's 2,500 held-out MNIST digits, shifted.

    python benchmarks/bigdata.py [--n 100000] [--profile] [--storage] [--threads 1]

Item ``i`` is digit ``i % 2500`` of the demo's held-out half in variant ``i // 2500``. Variant
``v`` shifts the digit by ``SHIFTS[v % 25]`` (every (dx, dy) with |dx|, |dy| <= 2 pixels, the
unshifted digit first, zero-filled, not wrapped); from the 26th variant on, Gaussian pixel
noise (sigma 0.1, seeded by the variant, clipped to [0, 1]) is added too. So 100,000 items are
40 variants: 25 clean shifts and 15 noisy ones. The result is deterministic and in the demo's
input format: X float32 (n, 1, 28, 28) in [0, 1], y int64 (n,).

Other benchmarks import it: ``big_data(n)`` gives (X, y), ``big_connection(n, cache_dir=...)``
gives ``diagql.connect(demo model, (X, y), cache_dir=...)``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

N_DEFAULT = 100_000
DIGITS = 2_500
RADIUS = 2
# The unshifted digit first, then by distance: the first 2,500 items are the demo's data.
SHIFTS = sorted(((dx, dy) for dx in range(-RADIUS, RADIUS + 1)
                 for dy in range(-RADIUS, RADIUS + 1)),
                key=lambda s: (abs(s[0]) + abs(s[1]), s))
NOISE_SIGMA = 0.1

_demo_cache: tuple | None = None


def demo_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's 2,500 held-out digits (X, y), loaded once per process."""
    global _demo_cache
    if _demo_cache is None:
        from diagql.mnist_demo.data import demo_dataset

        _demo_cache = demo_dataset()
    return _demo_cache


def shift(X: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Images moved dx pixels right and dy down; the uncovered border is zero (background)."""
    out = torch.zeros_like(X)
    h, w = X.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        X[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def big_data(n: int = N_DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y): n items, float32 (n, 1, 28, 28) in [0, 1] and int64 (n,), the same every call."""
    if n < 1:
        raise ValueError("n must be at least 1")
    X0, y0 = demo_data()
    n_variants = -(-n // len(X0))
    X = torch.empty((n_variants * len(X0),) + tuple(X0.shape[1:]), dtype=torch.float32)
    for v in range(n_variants):
        block = X[v * len(X0):(v + 1) * len(X0)]
        block.copy_(shift(X0, *SHIFTS[v % len(SHIFTS)]))
        if v >= len(SHIFTS):
            generator = torch.Generator().manual_seed(v)
            block.add_(torch.randn(block.shape, generator=generator) * NOISE_SIGMA).clamp_(0, 1)
    y = y0.repeat(n_variants)
    return X[:n].clone() if len(X) != n else X, y[:n].clone()


def demo_model():
    from diagql.mnist_demo.model import load_model

    return load_model()


def big_connection(n: int = N_DEFAULT, cache_dir=False, model: str = "demo", **options):
    """``diagql.connect(demo model, big_data(n), cache_dir=cache_dir, **options)``;
    ``model="resnet"``: second_model.py's CNN instead of the demo's LeNet.

    ``cache_dir`` defaults to False (no disk cache), so that a benchmark never reads or writes
    the user's cache by accident; pass a (temporary) directory to measure the disk cache.
    """
    import diagql

    if model == "resnet":
        import second_model

        network = second_model.trained()
    else:
        network = demo_model()
    return diagql.connect(network, big_data(n), cache_dir=cache_dir, **options)


# --- shared by the benchmark scripts --------------------------------------------------------

def add_threads_option(parser, what: str = "torch threads") -> None:
    """--threads, as every benchmark here takes it."""
    parser.add_argument("--threads", type=int, default=1,
                        help=f"{what} (default 1: on a shared machine two threads wait on the "
                             f"slower core and ratios scatter; 0 keeps torch's default)")


def use_threads(threads: int) -> None:
    """Torch's intra-op threads for this process; 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def machine() -> dict:
    """CPU model, cores, memory, torch version and threads: printed beside every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as file:
            kb = int(file.readline().split()[1])
            memory = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    import diagql

    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory,
            "diagql": f"{diagql.__version__} from "
                      f"{os.path.dirname(os.path.abspath(diagql.__file__))}",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "load average": load}


def machine_line() -> str:
    m = machine()
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; torch {m['torch']}, "
            f"{m['threads']} threads; python {m['python']}; diagql {m['diagql']}; "
            f"load average {m['load average']}")


def print_table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()) -> None:
    """A plain-text table (also valid Markdown), then notes and the machine line."""
    cells = [[str(c) for c in columns]]
    cells += [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(row):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"

    print(f"\n{title}\n")
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))
    print()
    for note in notes:
        print(note)
    print(machine_line())


def storage_tables(X: torch.Tensor, y: torch.Tensor, repeat: int = 5) -> None:
    """--storage: what a new session pays to fingerprint the data (hash functions compared on
    X's bytes) and what the disk cache pays to read entries back (its cost model's figures)."""
    import hashlib
    import statistics
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import xxhash

    from diagql.storage import fingerprint
    from diagql.storage.store import Cache

    raw = X.numpy().reshape(-1).view(np.uint8)
    chunk = fingerprint._CHUNK
    pieces = [memoryview(raw[i:i + chunk]) for i in range(0, raw.nbytes, chunk)]

    def on_threads(hash_piece):
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(hash_piece, pieces))

    cases = {"SHA-256, 1 thread": lambda: hashlib.sha256(memoryview(raw)).digest(),
             f"SHA-256, {chunk >> 20} MB pieces on {os.cpu_count()} threads (before)":
                 lambda: on_threads(lambda p: hashlib.sha256(p).digest())}
    try:
        import blake3
    except ImportError:
        blake3 = None
    if blake3 is not None:
        cases["BLAKE3, 1 thread"] = lambda: blake3.blake3(memoryview(raw)).digest()
        cases["BLAKE3, its own threads"] = lambda: blake3.blake3(
            memoryview(raw), max_threads=blake3.blake3.AUTO).digest()
        cases[f"BLAKE3, {chunk >> 20} MB pieces on {os.cpu_count()} threads"] = \
            lambda: on_threads(lambda p: blake3.blake3(p).digest())
    cases["XXH3-128, 1 thread"] = lambda: xxhash.xxh3_128_digest(memoryview(raw))
    cases[f"XXH3-128, {chunk >> 20} MB pieces on {os.cpu_count()} threads"] = \
        lambda: on_threads(xxhash.xxh3_128_digest)
    cases["data_fingerprint((X, y)) (now)"] = lambda: fingerprint.data_fingerprint((X, y))
    rows = []
    for name, run in cases.items():
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
        rows.append([name, f"{min(seconds) * 1000:.1f}", f"{statistics.median(seconds) * 1000:.1f}",
                     f"{raw.nbytes / min(seconds) / 1e9:.1f}"])
    print_table(f"hashing X ({raw.nbytes / 2**20:.0f} MiB), best and median of {repeat}",
                ["hash", "best ms", "median ms", "GB/s (best)"], rows)

    rows = []
    with tempfile.TemporaryDirectory(prefix="diagql-bench-") as root:
        cache = Cache(root, limit=2 ** 40)
        for size in (1024, 1024 ** 2, 4 * 1024 ** 2, 16 * 1024 ** 2, 47 * 1024 ** 2,
                     94 * 1024 ** 2):
            arrays = {"rows": np.random.default_rng(0).random(size // 4, dtype=np.float32)}
            started = time.perf_counter()
            cache.store("activations", f"s{size}", arrays, {})
            handed = time.perf_counter() - started
            cache.flush()
            landed = time.perf_counter() - started
            seconds = []
            for _ in range(repeat):
                started = time.perf_counter()
                cache.load("activations", f"s{size}")
                seconds.append(time.perf_counter() - started)
            read = statistics.median(seconds)
            rows.append([f"{size / 2**20:.3f}", f"{handed * 1000:.2f}", f"{landed * 1000:.1f}",
                         f"{read * 1000:.2f}", f"{size / read / 1e9:.2f}",
                         f"{cache.read_seconds(size) * 1000:.2f}"])
    print_table(f"disk cache entries (page cache warm): store() returns, the write lands, a "
                f"load reads it back (median of {repeat})",
                ["MiB", "store ms", "landed ms", "load ms", "load GB/s",
                 "cost model's load ms"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=N_DEFAULT, help="items (default 100,000)")
    parser.add_argument("--profile", action="store_true",
                        help="also connect and compute the profile (one forward pass): accuracy")
    parser.add_argument("--storage", action="store_true",
                        help="also time fingerprint hashes on X and disk cache reads and writes")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    started = time.perf_counter()
    demo_data()
    loaded = time.perf_counter()
    X, y = big_data(args.n)
    built = time.perf_counter()
    counts = torch.bincount(y, minlength=10).tolist()
    rows = [["items", f"{len(X):,}"], ["X", f"{X.dtype} {tuple(X.shape)}, "
                                           f"{X.numel() * 4 / 2**20:.0f} MiB"],
            ["variants", f"{-(-len(X) // DIGITS)} (shifts of up to {RADIUS} px in x and y; "
                         f"noise sigma {NOISE_SIGMA} after the first {len(SHIFTS)})"],
            ["items per class", ", ".join(map(str, counts))],
            ["pixel range", f"{float(X.min()):.3f} .. {float(X.max()):.3f}"],
            ["load demo digits (s)", f"{loaded - started:.2f}"],
            ["build (s)", f"{built - loaded:.2f}"]]
    again = big_data(args.n)
    rows.append(["deterministic (rebuilt equal)", str(bool(torch.equal(again[0], X)
                                                          and torch.equal(again[1], y)))])
    if args.profile:
        conn = big_connection(args.n, progress=False)
        started = time.perf_counter()
        profile = conn.profile
        rows.append(["profile pass (s)", f"{time.perf_counter() - started:.2f}"])
        rows.append(["model accuracy", f"{profile.correct.mean():.4f} "
                                       f"({int((~profile.correct).sum()):,} misclassified)"])
        clean = profile.correct[:DIGITS * len(SHIFTS)]
        noisy = profile.correct[DIGITS * len(SHIFTS):]
        rows.append(["accuracy: unshifted digits", f"{profile.correct[:DIGITS].mean():.4f}"])
        rows.append([f"accuracy: the {len(SHIFTS)} clean variants", f"{clean.mean():.4f}"])
        if len(noisy):
            rows.append(["accuracy: the noisy variants", f"{noisy.mean():.4f}"])
    print_table(f"benchmarks/bigdata.py --n {args.n}", ["what", "value"], rows)
    if args.storage:
        storage_tables(X, y)


if __name__ == "__main__":
    main()
