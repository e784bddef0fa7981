"""Why torch work from a second thread slows a process's later torch calls (docs/measurements.md §8).

    python -m experiments.bench.omp_spin [--threads 2] [--iters 300]

torch's CPU build runs its parallel regions on GNU OpenMP (libgomp). After a region a worker
thread spin-waits (GOMP_SPINCOUNT, default 300,000 pauses: ~10 ms here) before it sleeps on a
futex, so the next region within that time starts at once. libgomp counts every thread it
manages, over all the thread teams of the process: each thread that ever started a region has a
team of its own, kept while that thread lives. Once the count exceeds the CPUs the process may
use, every wait spins only 100 times (``gomp_throttled_spin_count_var``) and every later region
wakes its workers through the kernel. One region from a live pool thread (``asyncio.to_thread``,
a ``ThreadPoolExecutor``) is enough, for the rest of the process's life.

It prints, in one process: the CPU seconds the workers burn while the main thread sleeps after
one region (the spin), and the milliseconds per iteration of a decode-like loop (a small GEMM,
then 1 ms of Python work), first as started, then after one region on a thread that has ended,
then after one region on a live pool thread. Figures, not a test.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import resource
import threading
import time

import torch


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spin_after_a_region(x: torch.Tensor, rounds: int = 4, sleep_s: float = 0.3) -> float:
    """Median CPU seconds the process uses while its main thread sleeps right after a region."""
    burnt = []
    for _ in range(rounds):
        x @ x
        start = cpu_seconds()
        time.sleep(sleep_s)
        burnt.append(cpu_seconds() - start)
    return sorted(burnt)[len(burnt) // 2]


def ms_per_decode_like_step(iters: int, gap_s: float = 0.001) -> float:
    y, w = torch.randn(64, 512), torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(iters):
        y @ w
        t = time.perf_counter()
        while time.perf_counter() - t < gap_s:   # the Python work between a step's regions
            pass
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(512, 512)
    for _ in range(5):
        x @ x

    def line(when: str) -> None:
        print(f"{when:<45} spin after a region {spin_after_a_region(x) * 1e3:6.1f} ms CPU, "
              f"decode-like step {ms_per_decode_like_step(args.iters):.3f} ms")

    line("as started")
    ended = threading.Thread(target=lambda: x @ x)
    ended.start()
    ended.join()
    line("after a region on a thread that ended")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: x @ x).result()
        line("after a region on a live pool thread")


if __name__ == "__main__":
    main()
