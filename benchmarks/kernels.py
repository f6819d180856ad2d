"""Per-element cost of the CPU kernels alone, on one thread: the joint (forward) and backward ops
called directly (no autograd, no Python wrapper), median CPU time of the calling thread.

    python -m benchmarks.kernels
"""

import time

import torch

import dmi_ext  # noqa: F401  (registers torch.ops.dmi_ext)

SHAPES = [(8192, 10), (8192, 100), (10**6, 10)]


def cpu_time(fn, rounds):
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return sorted(times)[len(times) // 2]


def main():
    torch.set_num_threads(1)
    ops = torch.ops.dmi_ext
    print("one thread, median thread CPU time per call, ns per input element")
    for N, C in SHAPES:
        x = torch.randn(N, C)
        y = torch.randint(0, C, (N,))
        loss, _, _, table = ops.dmi.default(x, y, True, True, 0.0, -100, 1, True)
        rounds = max(5, 2 * 10**7 // (N * C))
        joint = cpu_time(lambda: ops.joint.default(x, y, True, -100, True), rounds)
        backward = cpu_time(lambda: ops.dmi_backward.default(loss, x, y, table, True, -100, 1),
                            rounds)
        print(f"N={N} C={C}: forward (joint) {joint * 1e9 / (N * C):.2f} ns, "
              f"backward {backward * 1e9 / (N * C):.2f} ns")


if __name__ == "__main__":
    main()
