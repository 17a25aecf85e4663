"""Assignment 3: top-K routing and dropless dispatch of one MoE layer (read brief.md first).

Notation: B batch, T tokens, N = B·T tokens flattened, D model dim, F hidden size of one expert,
E experts, K experts per token.

The grader calls these two methods with `self` set to a toy_moe MoE layer, which holds:
    self.router          nn.Linear(D, E, bias=False): router logits z = x Wᵀ
    self.gate_up         (E, D, 2F) parameter: expert e's SwiGLU gate and up projections, side by side
    self.down            (E, F, D) parameter: expert e's down projection
    self.n_experts       E
    self.top_k           K
    self.norm_topk_prob  bool: renormalise the K gates of a token to sum to 1
    self.router_fp32     bool: compute the router logits in float32

Grade it with:
    python -m minirspo.grade moe_dispatch --submission tutorials/assignments/moe_dispatch/moe_dispatch.py
Importing toy_moe.model's MoELayer or ToyMoE scores 0; `swiglu` (one expert's MLP) is given.
"""
import torch
from torch import Tensor

from toy_moe.model import swiglu  # swiglu(x, self.gate_up[e], self.down[e]): expert e applied to x (n, D)


class MoELayer:
    def route(self, x: Tensor, forced_idx: Tensor | None, freeze_router: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Return (router_logits (B, T, E) float32, topk_idx (B, T, K) int64, gates (B, T, K)).

        x (B, T, D). p = softmax(router_logits) over all E experts; the experts are the K largest p, or
        `forced_idx` (B, T, K) when given (routing replay: use those experts, in that order); the gates are
        p at the chosen experts, divided by their sum when self.norm_topk_prob. With freeze_router the
        router weight gets no gradient, while x still does.
        """
        # Exercise stub, allowed in this student file only: replace this line with your implementation.
        raise NotImplementedError("MoELayer.route is not implemented yet")

    def experts(self, x: Tensor, topk_idx: Tensor, gates: Tensor) -> Tensor:
        """y (N, D) with y[n] = Σ_k gates[n, k] · expert_{topk_idx[n, k]}(x[n]); x (N, D), topk_idx and gates (N, K).

        Dropless: every (token, expert) pair is computed, however many pairs an expert gets (none, too).
        Run each expert once on all of its tokens (one matmul per expert, not one per token).
        """
        # Exercise stub, allowed in this student file only: replace this line with your implementation.
        raise NotImplementedError("MoELayer.experts is not implemented yet")
