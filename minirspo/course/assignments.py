"""The course assignments and the properties that grade them: Hypothesis property tests against the package's own code.

Notation: B sequences, T tokens, L MoE layers, E experts per layer, K experts per token, D model dim,
F hidden size of one expert, N tokens handed to one MoE layer.

Each assignment asks for one piece of minirspo, and the package itself is the reference solution:
    router_shift_ratio  minirspo.loss.router_shift_ratio            the router-shift ratio γ (RSPO.md)
    rspo_loss           minirspo.loss.rspo_loss                     GMPO + router-shift weighting
    moe_dispatch        toy_moe.model.MoELayer.route and .experts   top-K routing and dropless dispatch
so grading `minirspo/loss.py` or `toy_moe/model.py` as a submission scores full marks.

A property is one clause of the contract (value, gradient, mask handling, stop-gradient, γ floor, ...):
a Hypothesis strategy that draws small shapes and a seed, a function that builds the tensors from them
(so `example_inputs` rebuilds any counterexample from what the grader printed), and a check that compares
the submission with the reference and raises `Mismatch` saying how they differ. A check calls the reference
here and the submission through its sandbox (`submission.run`: another process, outputs back as plain
tensors), both with `wire.run_call`, so the same call gives both their outputs and gradients. Running the
properties, points and reports are `minirspo.course.grade`'s business.
"""
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from hypothesis import strategies as st
from torch import Tensor

import minirspo
import minirspo.loss as loss_reference
import toy_moe
import toy_moe.model as moe_reference
from minirspo.course.sandbox import Sandbox, SubmissionRaised
from minirspo.course.wire import run_call

REFERENCE_PACKAGES = (minirspo, toy_moe)  # no submission runs where these can be imported

ASSIGNMENTS_DIR = Path(__file__).resolve().parents[2] / "tutorials" / "assignments"


class Mismatch(AssertionError):
    """The submission ran but broke a property; the message says how."""


# ---------------------------------------------------------------------------------------------------
# Comparing a submission's outputs with the reference's
# ---------------------------------------------------------------------------------------------------

def short_repr(tensor: Tensor) -> str:
    """A tensor as nested lists rounded to 4 decimals: readable for the few entries a shrunk example has."""
    values = tensor.detach().cpu()
    return str(values.tolist() if not values.is_floating_point() else values.double().round(decimals=4).tolist())


def expect_close(what: str, got, expected: Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    if not isinstance(got, Tensor):
        raise Mismatch(f"{what} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Mismatch(f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    wrong = ~torch.isclose(got.detach().double(), expected.detach().double(), rtol=rtol, atol=atol)
    if wrong.any():
        first = tuple(int(i) for i in wrong.nonzero()[0])
        raise Mismatch(f"{what}{list(first) if first else ''}: expected {float(expected[first]):.6g}, got "
                       f"{float(got[first]):.6g} ({int(wrong.sum())} of {wrong.numel()} entries differ)\n"
                       f"  expected {what} = {short_repr(expected)}\n  your {what}     = {short_repr(got)}")


def expect_equal(what: str, got, expected: Tensor) -> None:
    if not isinstance(got, Tensor) or tuple(got.shape) != tuple(expected.shape) or not torch.equal(got, expected):
        shown = short_repr(got) if isinstance(got, Tensor) else repr(got)
        raise Mismatch(f"{what}: expected {short_repr(expected)}, got {shown}")


def expect_no_gradient(what: str, grad: Tensor | None) -> None:
    if grad is not None and bool(grad.ne(0).any()):
        raise Mismatch(f"{what} must get no gradient, but got {short_repr(grad)}")


def expect_same_gradients(got: dict | None, expected: dict[str, Tensor], shown: dict[str, str] | None = None) -> None:
    """Gradients from run_call on both sides; `got` None: the output carried no gradient at all. `shown`
    renames leaves in messages (self.router.weight -> router.weight)."""
    if got is None:
        raise Mismatch("your output carries no gradient: keep it in the autograd graph (no .detach(), "
                       "no torch.no_grad(), no .item()/.tolist())")
    for name, want in expected.items():
        expect_close(f"gradient wrt {(shown or {}).get(name, name)}", got.get(name), want, rtol=1e-3, atol=1e-5)


def both(submission: Sandbox, reference: Callable, inputs: dict, leaves: tuple[str, ...] = (),
         parts: tuple[tuple, ...] = ()) -> tuple[tuple, tuple]:
    """((output, gradients) of the submission, the same of the reference) for one call made alike on both."""
    expected = run_call(reference, inputs, leaves, parts)
    return submission.run(reference.__qualname__, inputs, leaves, parts), expected


# ---------------------------------------------------------------------------------------------------
# Assignment 1: router_shift_ratio
# ---------------------------------------------------------------------------------------------------

@st.composite
def router_shapes(draw, *, all_experts: bool):
    experts = draw(st.integers(2, 6))
    top_k = experts if all_experts else draw(st.integers(1, experts - 1))
    return {"layers": draw(st.integers(1, 3)), "batch": draw(st.integers(1, 3)),
            "tokens": draw(st.integers(1, 4)), "experts": experts, "top_k": top_k,
            "seed": draw(st.integers(0, 2**16))}


def router_inputs(layers: int, batch: int, tokens: int, experts: int, top_k: int, seed: int, *,
                  masked: bool) -> dict:
    """An old router, a current one that moved a little, and the old top-K routing a rollout would keep."""
    generator = torch.Generator().manual_seed(seed)
    shape = (layers, batch, tokens, experts)
    old_logits = 1.5 * torch.randn(shape, generator=generator)                              # (L, B, T, E)
    router_logits = old_logits + 0.5 * torch.randn(shape, generator=generator)              # (L, B, T, E)
    old_topk_idx = old_logits.topk(top_k, dim=-1).indices                                   # (L, B, T, K)
    old_topk_logprobs = old_logits.log_softmax(dim=-1).gather(-1, old_topk_idx)             # (L, B, T, K)
    mask = None
    if masked:
        mask = torch.rand(batch, tokens, generator=generator) < 0.6                         # (B, T)
        # a rollout stores 0 for the router log-probs of padding, so only the mask tells padding apart
        padding = rearrange(~mask, "b t -> 1 b t 1")
        old_topk_logprobs = old_topk_logprobs.masked_fill(padding, 0.0)                     # (L, B, T, K)
    return {"router_logits": router_logits, "old_topk_idx": old_topk_idx,
            "old_topk_logprobs": old_topk_logprobs, "mask": mask}


def check_gamma_value(submission: Sandbox, inputs: dict) -> None:
    (got, _), (expected, _) = both(submission, loss_reference.router_shift_ratio, inputs)
    expect_close("γ", got, expected)


def check_gamma_value_and_gradient(submission: Sandbox, inputs: dict) -> None:
    check_gamma_value(submission, inputs)
    (_, got), (_, expected) = both(submission, loss_reference.router_shift_ratio, inputs, ("router_logits",), ((),))
    expect_same_gradients(got, expected)


# router_logits (B, T, E) without L; old_topk_idx one sequence short; old_topk_logprobs one expert short;
# the mask transposed to (T, B)
BAD_ROUTER_INPUTS = ("router_logits_3d", "idx_shape", "logprobs_shape", "mask_shape")


@st.composite
def bad_router_shapes(draw):
    return draw(router_shapes(all_experts=False)) | {"defect": draw(st.sampled_from(BAD_ROUTER_INPUTS))}


def bad_router_inputs(defect: str, **shapes) -> dict:
    """Valid inputs with one defect; T != B is guaranteed where the defect is a transposed mask."""
    if defect == "mask_shape" and shapes["tokens"] == shapes["batch"]:
        shapes["tokens"] += 1
    inputs = router_inputs(**shapes, masked=True)
    if defect == "router_logits_3d":
        inputs["router_logits"] = inputs["router_logits"][0]
    elif defect == "idx_shape":
        inputs["old_topk_idx"] = inputs["old_topk_idx"][:, :-1]
        inputs["old_topk_logprobs"] = inputs["old_topk_logprobs"][:, :-1]
    elif defect == "logprobs_shape":
        inputs["old_topk_logprobs"] = inputs["old_topk_logprobs"][..., :-1]
    else:
        inputs["mask"] = rearrange(inputs["mask"], "b t -> t b")
    return inputs


def check_input_errors(submission: Sandbox, inputs: dict) -> None:
    try:
        submission.run("router_shift_ratio", inputs)
    except SubmissionRaised as error:
        if error.is_a("ValueError"):
            return
        if error.is_a("NotImplementedError"):
            raise
        raise Mismatch(f"bad input should raise ValueError naming the argument, your code raised {error}") from None
    raise Mismatch("bad input should raise ValueError naming the argument, your code returned a result")


# ---------------------------------------------------------------------------------------------------
# Assignment 2: rspo_loss
# ---------------------------------------------------------------------------------------------------

@st.composite
def loss_shapes(draw, *, kind: str):
    shapes = {"batch": draw(st.integers(1, 4)), "tokens": draw(st.integers(1, 5)),
              "seed": draw(st.integers(0, 2**16))}
    if kind == "clipping":
        shapes["clip"] = draw(st.sampled_from([0.2, 0.4, 0.6]))
    if kind == "floor":
        shapes["gamma_min"] = draw(st.sampled_from([0.7, 0.8, 0.9]))
    return shapes


def loss_inputs(batch: int, tokens: int, seed: int, clip: float = 0.4, gamma_min: float = 0.8, *, kind: str) -> dict:
    """Inputs that exercise one clause of RSPO at a time. Every kind but "clipping" keeps each |log w̃| inside
    the clip band, every kind but "floor" keeps γ above γ_min, and only "mask" has padding, so one mistake
    breaks one property. kind: value | mask | clipping | floor | stop_gradient."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    # |log w| <= 0.15 with γ >= 0.8, or |log w| <= 0.03 with γ̃ >= 0.7 ("floor"), keep |log w̃| < 0.4: inside
    # the narrowest clip band tested outside "clipping"
    log_ratio_bound = {"clipping": 1.5, "floor": 0.03}.get(kind, 0.15)
    old_logprobs = uniform(-3.0, -0.05, batch, tokens)                                      # (B, T)
    logprobs = old_logprobs + uniform(-log_ratio_bound, log_ratio_bound, batch, tokens)     # (B, T)
    advantages = torch.randn(batch, generator=generator)                                    # (B,)
    advantages = advantages.masked_fill(uniform(0, 1, batch) < 0.2, 0.0)  # an all-equal group has Â = 0
    lowest_gamma = 0.05 if kind == "floor" else gamma_min
    router_shift = uniform(lowest_gamma, 1.0, batch, tokens)                                # (B, T)
    mask = torch.ones(batch, tokens, dtype=torch.bool)                                      # (B, T)
    if kind == "mask":
        mask = uniform(0, 1, batch, tokens) < 0.6
        # padding holds garbage that must not reach the loss (a rollout may leave anything there)
        logprobs = torch.where(mask, logprobs, 20 * torch.randn(batch, tokens, generator=generator))
        router_shift = torch.where(mask, router_shift, uniform(0.01, 1.0, batch, tokens))
    return {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask,
            "router_shift": router_shift, "clip_low": clip, "clip_high": clip, "gamma_min": gamma_min}


def _loss_of(output, who: str) -> Tensor:
    loss = getattr(output, "loss", None)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise Mismatch(f"{who} rspo_loss must return LossOutput(loss=<0-d tensor>, metrics=...), got {output!r}")
    return loss


def check_loss_value(submission: Sandbox, inputs: dict) -> None:
    (got, _), (expected, _) = both(submission, loss_reference.rspo_loss, inputs)
    expect_close("loss", _loss_of(got, "your"), _loss_of(expected, "the reference"), atol=1e-6)


def check_loss_gradient(submission: Sandbox, inputs: dict) -> None:
    (output, got), (_, expected) = both(submission, loss_reference.rspo_loss, inputs, ("logprobs",), (("loss",),))
    _loss_of(output, "your")
    expect_same_gradients(got, expected)


def check_loss_value_and_gradient(submission: Sandbox, inputs: dict) -> None:
    check_loss_value(submission, inputs)
    check_loss_gradient(submission, inputs)


def check_stop_gradient(submission: Sandbox, inputs: dict) -> None:
    output, grads = submission.run("rspo_loss", inputs, ("logprobs", "router_shift"), (("loss",),))
    if not _loss_of(output, "your").requires_grad or grads is None:
        raise Mismatch("your loss carries no gradient to logprobs")
    expect_no_gradient("router_shift (γ is a weight, sg[γ])", grads.get("router_shift"))


# ---------------------------------------------------------------------------------------------------
# Assignment 3: moe_dispatch (MoELayer.route and MoELayer.experts)
# ---------------------------------------------------------------------------------------------------

@st.composite
def moe_shapes(draw, *, kind: str):
    experts = draw(st.integers(2 if kind != "idle" else 3, 5))
    top_k = draw(st.integers(1, experts - 1 if kind == "idle" else experts))
    # "dispatch" gives every expert at least one token: N·K >= E
    tokens = draw(st.integers(math.ceil(experts / top_k) if kind == "dispatch" else 1, 6))
    return {"tokens": tokens, "d_model": draw(st.sampled_from([2, 4])), "experts": experts, "top_k": top_k,
            "hidden": draw(st.integers(1, 4)), "norm_topk_prob": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**16))}


def moe_inputs(tokens: int, d_model: int, experts: int, top_k: int, hidden: int, norm_topk_prob: bool,
               seed: int, *, kind: str) -> dict:
    """Keyword arguments of `MoELayer.route` (kind route | replay | frozen) or `MoELayer.experts` (kind
    dispatch: every expert busy | idle: some experts get no token), `self` being a seeded toy_moe layer."""
    generator = torch.Generator().manual_seed(seed)
    config = moe_reference.ToyMoEConfig(d_model=d_model, n_heads=1, n_experts=experts, top_k=top_k,
                                        expert_hidden=hidden, norm_topk_prob=norm_topk_prob)
    layer = moe_reference.MoELayer(config)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    if kind in ("route", "replay", "frozen"):
        x = torch.randn(1, tokens, d_model, generator=generator)                            # (B, T, D)
        forced_idx = None
        if kind == "replay":
            scores = torch.rand(1, tokens, experts, generator=generator)                    # (B, T, E)
            forced_idx = scores.argsort(dim=-1)[..., :top_k]                                # (B, T, K) distinct
        return {"self": layer, "x": x, "forced_idx": forced_idx, "freeze_router": kind == "frozen"}
    x = torch.randn(tokens, d_model, generator=generator)                                   # (N, D)
    if kind == "dispatch":
        # token n takes experts nK .. nK+K-1 (mod E): distinct per token, every expert used once N·K >= E
        blocks = torch.arange(tokens * top_k) % experts                                     # (N·K,)
        topk_idx = rearrange(blocks, "(n k) -> n k", k=top_k)                               # (N, K)
        topk_idx = topk_idx[torch.randperm(tokens, generator=generator)]                    # (N, K)
    else:
        n_busy = top_k + int(torch.randint(0, experts - top_k, (), generator=generator))   # K .. E − 1
        used = torch.randperm(experts, generator=generator)[:n_busy]                        # (busy,)
        scores = torch.rand(tokens, n_busy, generator=generator)                            # (N, busy)
        topk_idx = used[scores.argsort(dim=-1)[:, :top_k]]                                  # (N, K)
    gates = torch.rand(tokens, top_k, generator=generator).softmax(dim=-1)                  # (N, K)
    return {"self": layer, "x": x, "topk_idx": topk_idx, "gates": gates}


ROUTE_LEAVES = ("x", "self.router.weight")  # route runs on a private copy of the layer and of x
EXPERT_LEAVES = ("x", "gates", "self.gate_up", "self.down")
SHOWN = {"self.router.weight": "router.weight", "self.gate_up": "gate_up", "self.down": "down"}


def _route(submission: Sandbox, inputs: dict, parts: tuple[tuple, ...] = ()) -> tuple[tuple, tuple]:
    """((output, gradients) of your route, the same of the reference); gradients wrt x and router.weight of
    the `parts` of the output (0 router_logits, 2 gates)."""
    (got, grads), expected = both(submission, moe_reference.MoELayer.route, inputs, ROUTE_LEAVES, parts)
    if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(o, Tensor) for o in got)):
        raise Mismatch(f"route must return a tuple of three tensors (router_logits, topk_idx, gates), got {got!r}")
    return (got, grads), expected


def _by_expert(topk_idx: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
    """Experts and their gates sorted by expert id: the top-K is a set, its order is free."""
    order = topk_idx.argsort(dim=-1)                                                        # (B, T, K)
    return topk_idx.gather(-1, order), gates.gather(-1, order)


def check_topk_selection(submission: Sandbox, inputs: dict) -> None:
    ((logits, topk_idx, _), _), ((expected_logits, expected_idx, _), _) = _route(submission, inputs)
    expect_close("router_logits", logits, expected_logits)
    if topk_idx.shape != expected_idx.shape:
        raise Mismatch(f"topk_idx should have shape {tuple(expected_idx.shape)}, got {tuple(topk_idx.shape)}")
    expect_equal("topk_idx (sorted: the top-K is a set)", topk_idx.sort(dim=-1).values,
                 expected_idx.sort(dim=-1).values)


def check_gates(submission: Sandbox, inputs: dict) -> None:
    ((_, topk_idx, gates), grads), ((_, expected_idx, expected_gates), expected_grads) = _route(submission, inputs, ((2,),))
    if topk_idx.shape != expected_idx.shape or gates.shape != expected_gates.shape:
        raise Mismatch(f"topk_idx and gates should have shape {tuple(expected_idx.shape)}, got "
                       f"{tuple(topk_idx.shape)} and {tuple(gates.shape)}")
    expected_idx, expected_gates = _by_expert(expected_idx, expected_gates)
    topk_idx, gates = _by_expert(topk_idx, gates)
    expect_equal("topk_idx (sorted)", topk_idx, expected_idx)
    expect_close("gates (sorted by expert)", gates, expected_gates)
    expect_same_gradients(grads, expected_grads, SHOWN)


def check_replay(submission: Sandbox, inputs: dict) -> None:
    ((_, topk_idx, gates), _), ((_, expected_idx, expected_gates), _) = _route(submission, inputs)
    expect_equal("topk_idx (the forced experts, in their order)", topk_idx, expected_idx)
    expect_close("gates of the forced experts", gates, expected_gates)


def check_frozen_router(submission: Sandbox, inputs: dict) -> None:
    """Gradients of router_logits² + gates² (summed): none to the router weight, the reference's to x."""
    ((logits, _, _), grads), (_, expected_grads) = _route(submission, inputs, ((0,), (2,)))
    if not logits.requires_grad or grads is None:
        raise Mismatch("route's router_logits and gates must stay differentiable wrt x under freeze_router")
    expect_no_gradient("router.weight under freeze_router=True", grads.get("self.router.weight"))
    expect_close("gradient wrt x under freeze_router=True", grads.get("x"), expected_grads["x"], rtol=1e-3)


def check_dispatch_value(submission: Sandbox, inputs: dict) -> None:
    (got, _), (expected, _) = both(submission, moe_reference.MoELayer.experts, inputs, EXPERT_LEAVES)
    expect_close("experts output", got, expected)


def check_dispatch_gradients(submission: Sandbox, inputs: dict) -> None:
    (_, got), (_, expected) = both(submission, moe_reference.MoELayer.experts, inputs, EXPERT_LEAVES, ((),))
    expect_same_gradients(got, expected, SHOWN)


def check_idle_experts(submission: Sandbox, inputs: dict) -> None:
    check_dispatch_value(submission, inputs)
    check_dispatch_gradients(submission, inputs)


# ---------------------------------------------------------------------------------------------------
# The assignments
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Property:
    name: str                             # its key in the points file
    checks: str                           # one line for the score table
    examples: st.SearchStrategy           # -> dict of small ints (shapes, seed, ...)
    build: Callable[..., dict]            # example -> keyword arguments of the graded function
    check: Callable[[Sandbox, dict], None]  # (the submission's sandbox, inputs) -> raises Mismatch
    function: str = ""                    # which graded function the inputs are for ("" = the only one)


@dataclass(frozen=True)
class Assignment:
    name: str
    student_file: str                     # relative to tutorials/assignments/
    graded: tuple[str, ...]               # what the submission must define ("MoELayer.route": a method)
    given: tuple                          # what the student file may import from the package (the shim's content)
    properties: tuple[Property, ...]


ASSIGNMENTS = {assignment.name: assignment for assignment in (
    Assignment(
        "router_shift_ratio", "router_shift_ratio/router_shift.py", ("router_shift_ratio",),
        (),
        (Property("value", "γ (B, T) with K = E, no mask", router_shapes(all_experts=True),
                  partial(router_inputs, masked=False), check_gamma_value),
         Property("gradient", "γ is differentiable wrt router_logits", router_shapes(all_experts=True),
                  partial(router_inputs, masked=False), check_gamma_value_and_gradient),
         Property("mask", "γ = 1 and no gradient at padding (its old log-probs are 0)",
                  router_shapes(all_experts=True), partial(router_inputs, masked=True),
                  check_gamma_value_and_gradient),
         Property("old top-K", "averages over the K experts the old policy activated, K < E",
                  router_shapes(all_experts=False), partial(router_inputs, masked=False), check_gamma_value),
         Property("input checks", "bad shapes raise ValueError", bad_router_shapes(), bad_router_inputs,
                  check_input_errors))),
    Assignment(
        "rspo_loss", "rspo_loss/rspo_loss.py", ("rspo_loss",),
        (loss_reference.LossOutput,),
        (Property("value", "−J inside the clip band, γ ≥ γ_min, no padding", loss_shapes(kind="value"),
                  partial(loss_inputs, kind="value"), check_loss_value),
         Property("gradient", "d loss / d logprobs", loss_shapes(kind="value"), partial(loss_inputs, kind="value"),
                  check_loss_gradient),
         Property("mask", "padding ignored, an empty sequence still counts in B", loss_shapes(kind="mask"),
                  partial(loss_inputs, kind="mask"), check_loss_value_and_gradient),
         Property("clipping", "one-sided clip of log w̃ at ±ε by the sign of Â", loss_shapes(kind="clipping"),
                  partial(loss_inputs, kind="clipping"), check_loss_value_and_gradient),
         Property("gamma floor", "γ̃ = max(γ, γ_min)", loss_shapes(kind="floor"),
                  partial(loss_inputs, kind="floor"), check_loss_value_and_gradient),
         Property("stop-gradient", "no gradient flows into router_shift", loss_shapes(kind="stop_gradient"),
                  partial(loss_inputs, kind="stop_gradient"), check_stop_gradient))),
    Assignment(
        "moe_dispatch", "moe_dispatch/moe_dispatch.py", ("MoELayer.route", "MoELayer.experts"),
        (moe_reference.swiglu,),
        (Property("top-K selection", "router logits and the K most probable experts", moe_shapes(kind="route"),
                  partial(moe_inputs, kind="route"), check_topk_selection, "MoELayer.route"),
         Property("gates", "softmax over all E at the chosen experts, renormalised if asked; gradients",
                  moe_shapes(kind="route"), partial(moe_inputs, kind="route"), check_gates, "MoELayer.route"),
         Property("routing replay", "forced_idx: those experts, gates from the current router",
                  moe_shapes(kind="replay"), partial(moe_inputs, kind="replay"), check_replay, "MoELayer.route"),
         Property("frozen router", "freeze_router: no gradient to the router weight, still to x",
                  moe_shapes(kind="frozen"), partial(moe_inputs, kind="frozen"), check_frozen_router,
                  "MoELayer.route"),
         Property("dispatch value", "Σ_k gate · expert(x), every expert busy", moe_shapes(kind="dispatch"),
                  partial(moe_inputs, kind="dispatch"), check_dispatch_value, "MoELayer.experts"),
         Property("dispatch gradients", "gradients wrt x, gates and expert weights", moe_shapes(kind="dispatch"),
                  partial(moe_inputs, kind="dispatch"), check_dispatch_gradients, "MoELayer.experts"),
         Property("idle experts", "experts that get no token (dropless, no empty-batch errors)",
                  moe_shapes(kind="idle"), partial(moe_inputs, kind="idle"), check_idle_experts,
                  "MoELayer.experts"))),
)}


def example_inputs(assignment: str, property_name: str, **example) -> dict:
    """The inputs of one counterexample, rebuilt from what the grader printed."""
    return _property(assignment, property_name).build(**example)


def _property(assignment: str, property_name: str) -> Property:
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {assignment!r}; choose one of {sorted(ASSIGNMENTS)}")
    by_name = {prop.name: prop for prop in ASSIGNMENTS[assignment].properties}
    if property_name not in by_name:
        raise ValueError(f"assignment {assignment!r} has no property {property_name!r}; it has {sorted(by_name)}")
    return by_name[property_name]
