"""Forward+backward cost of every policy loss and of the router-shift ratio, side by side in one run.

    python benchmarks/loss_bench.py                 # CPU, both sizes
    python benchmarks/loss_bench.py --device cuda   # on a GPU
    python benchmarks/loss_bench.py --sizes small   # only B=64, T=1024, L=24, E=64, K=8
    python benchmarks/loss_bench.py --losses-only   # the four losses only (seconds, not minutes, on a CPU)

Losses get γ precomputed (as the training loop does, which also computes γ's metrics once, outside the
loss), so "rspo / gmpo" is the price of RS weighting inside the loss. The losses are timed in turns
(interleaved rounds), and "× gmpo_loss" is the median over rounds of each round's ratio, so that other
jobs on a shared machine slow both sides of a ratio alike. `router_shift_ratio` is timed as the loop calls it (no grad: the loss stops its
gradient anyway) and with backward (what an assignment or analysis would do). Peak memory is reported
on CUDA, where it is measurable, next to the router logits' own size.
"""
import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.benchmark import Timer

from minirspo.loss import LOSSES, router_logprobs_at, router_shift_ratio

SIZES = {"small": dict(B=64, T=1024, L=24, E=64, K=8),
         "qwen3-30b-a3b": dict(B=64, T=1024, L=48, E=128, K=8)}


def seconds(fn) -> float:
    fn()  # warm-up
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median


def interleaved_seconds(fns: dict[str, callable], rounds: int = 30, calls: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each fn in each round. A round calls every fn `calls` times, in an order that
    rotates from round to round, so that load from other jobs falls on all of them alike."""
    names = list(fns)
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.perf_counter() - started) / calls)
    return samples


def paired_ratio(samples: list[float], baseline: list[float]) -> float:
    """Median over rounds of (this round's time / the baseline's time in the same round): robust to load
    that drifts between rounds, which a ratio of two medians is not."""
    return statistics.median(a / b for a, b in zip(samples, baseline))


def bench_size(B, T, L, E, K, device, losses_only=False) -> list[tuple[str, float, str]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    old_logprobs = (-torch.rand(B, T, generator=gen) * 3).to(device)
    logprobs = (old_logprobs + 0.05 * torch.randn(B, T, generator=gen).to(device)).requires_grad_()
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen).to(device)
    mask = torch.arange(T, device=device) < lengths[:, None]                   # (B, T) ragged
    advantages = torch.randn(B, generator=gen).to(device)
    router_logits = torch.randn(L, B, T, E, generator=gen).to(device)
    old_idx = router_logits.topk(K, dim=-1).indices                            # (L, B, T, K)
    old_lp = router_logprobs_at(router_logits, old_idx)                       # (L, B, T, K)
    moved = (router_logits + 0.1 * torch.randn(L, B, T, E, generator=gen).to(device)).requires_grad_()
    gamma = router_shift_ratio(moved.detach(), old_idx, old_lp, mask)

    def loss_step(loss_fn, shift):
        def step():
            loss_fn(logprobs, old_logprobs, advantages, mask, router_shift=shift).loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()  # time the kernels, not their launch
        return step
    losses = interleaved_seconds({name: loss_step(loss_fn, gamma if name == "rspo" else None)
                                  for name, loss_fn in LOSSES.items()})
    rows = [(f"{name}_loss fwd+bwd", statistics.median(samples), "", paired_ratio(samples, losses["gmpo"]))
            for name, samples in losses.items()]
    if losses_only:
        return rows

    def shift_no_grad():
        with torch.no_grad():
            router_shift_ratio(moved, old_idx, old_lp, mask)
    def shift_fwd_bwd():
        router_shift_ratio(moved, old_idx, old_lp, mask).sum().backward()
    for label, fn in (("router_shift_ratio (no grad)", shift_no_grad),
                      ("router_shift_ratio fwd+bwd", shift_fwd_bwd)):
        memory = ""
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(); torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - base) / moved.nbytes
            memory = f"{extra:.2f}× logits"
        secs = seconds(fn)
        rows.append((label, secs, memory, secs / statistics.median(losses["gmpo"])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--losses-only", action="store_true", help="skip the router_shift_ratio rows")
    args = parser.parse_args()
    console = Console()
    for size in args.sizes:
        dims = SIZES[size]
        rows = bench_size(**dims, device=args.device, losses_only=args.losses_only)
        table = Table(title=f"{size}: {dims} on {args.device} ({torch.get_num_threads()} threads)")
        for column in ("call", "ms (median)", "× gmpo_loss", "extra peak memory"):
            table.add_column(column, justify="left" if column == "call" else "right")
        for label, secs, memory, ratio in rows:
            table.add_row(label, f"{secs * 1e3:.2f}", f"{ratio:.2f}", memory)
        console.print(table)


if __name__ == "__main__":
    main()
