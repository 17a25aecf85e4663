"""Float32 tolerances scaled by the magnitudes compared, for tests that compare two float32 computations.

Why a bound of this form holds on any CPU: IEEE-754 float32 rounds every single operation the same way on
every x86 CPU; what differs between CPUs, thread counts and code paths (a chunked against a whole pass, a
KV cache against a full forward, a batched dispatch against a per-token loop) is only the *order* of the
additions inside reductions (SIMD width, matmul blocking, how work is split over threads). Reordering a
sum of n terms moves it by at most ~n·u·Σ|terms| (u = eps/2), and in practice by a few ulps of the largest
term. So two float32 computations of the same quantity agree to `ulps · eps · scale`, where scale is the
largest magnitude of the reference values and `ulps` grows with the depth of the computation (how many
reductions feed each value), not with the CPU. Each test states its `ulps` and why beside the call.

The scale is taken from the reference (`want`) only: a wrong `got` must not widen its own tolerance.
"""
import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 = 1.2e-7: one ulp of a float32 value in [1, 2)

# Whole-model comparisons (tiny 2-layer models: width <= 64, <= 22 positions): a value passes through ~10
# reductions of <= 64 terms each, forward and backward. Seen on an AMD EPYC: <= 5 ulps of the largest
# gradient (the chunked-scoring test, 2.7e-6 on gradients up to 4.75), <= 1 ulp of the largest log-prob.
# 64 is a >10x margin on that; the mistakes these tests exist for (a wrong mask, position, expert or
# chunk boundary) move values by 1e-3 to 1 of their scale, i.e. by 10^4 ulps or more.
MODEL_ULPS = 64


def largest(*tensors: torch.Tensor | None) -> float:
    """The largest finite magnitude among `tensors` (None and empty tensors count as 0)."""
    finite = [t.detach()[torch.isfinite(t.detach())] for t in tensors if t is not None]
    return max((float(values.abs().max()) for values in finite if values.numel()), default=0.0)


def assert_close_in_ulps(got: torch.Tensor | None, want: torch.Tensor | None, *, ulps: float = MODEL_ULPS,
                         scale: float | None = None, msg=None) -> None:
    """|got − want| <= ulps · eps32 · scale everywhere, scale = max|want| unless given (±inf must match).

    Give `scale` where a value may be a cancelling sum of larger terms (gradients: pass the largest gradient
    of the model, since every parameter's gradient sums the same backward signal times activations of order
    1); a value that is exactly 0 in theory is then rounding noise of its terms, not of itself. None (no
    gradient) must match None.
    """
    if got is None or want is None:
        assert got is None and want is None, msg or f"one side is None: {got is None=}, {want is None=}"
        return
    scale = largest(want) if scale is None else scale
    torch.testing.assert_close(got, want, rtol=0, atol=ulps * EPS32 * scale, msg=msg)
