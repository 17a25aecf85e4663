"""A hand-built rollout through the RL loop's scoring: advantages, masks, old log-probs and routing line up.

The batched path left-pads prompts to different lengths, right-pads ragged responses and reads each token's
log-prob one position before it and its routing at its own position. Here every row is also run alone,
unpadded, through a plain forward, and the batched values must equal those of that naive loop; and the
on-policy GRPO gradient must equal plain REINFORCE's, −mean_i Â_i · mean_t ∇ log π(y_it).
"""
import pytest
import torch

from minirspo.config import RLConfig
from minirspo.loss import group_advantages, policy_loss
from minirspo.module import Group, Minibatch, RLModule
from minirspo.policy import Samples, ToyPolicy
from tests.tolerance import MODEL_ULPS, assert_close_in_ulps, largest
from toy_moe.model import ToyMoE, ToyMoEConfig
from toy_moe.tokenizer import load_tokenizer

TINY = ToyMoEConfig(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=32, max_seq_len=64)
PROMPTS = ["7+8=", "12+34=", "7+8=", "12+34="]   # two groups of G = 2, prompts of different token lengths
RESPONSES = ["15", "1", "46", "4"]               # ragged: EOS appended, so 3, 2, 3 and 2 tokens
REWARDS = torch.tensor([1.0, 0.1, 1.0, 0.0])
GROUP_SIZE = 2


@pytest.fixture(scope="module")
def handmade():
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    policy = ToyPolicy(ToyMoE(TINY), tokenizer)
    config = RLConfig(loss="grpo", n_prompts=2, group_size=GROUP_SIZE, minibatch_size=4, eval_size=1)
    module = RLModule(policy, config)
    prompt_ids, prompt_mask = policy.encode_prompts(PROMPTS)                                  # (B, P)
    answers = [tokenizer.encode(text) + [tokenizer.eos_id] for text in RESPONSES]
    width = max(len(answer) for answer in answers)
    tokens = torch.tensor([a + [tokenizer.pad_id] * (width - len(a)) for a in answers])       # (B, N)
    mask = torch.tensor([[True] * len(a) + [False] * (width - len(a)) for a in answers])      # (B, N)
    advantages = group_advantages(REWARDS, GROUP_SIZE)                                        # (B,)
    return module, policy, Minibatch(prompt_ids, prompt_mask, tokens, mask, advantages, Samples(tokens, mask)), answers


def naive_row(policy: ToyPolicy, prompt: str, answer: list[int],
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One row alone, no padding anywhere: log-probs (n,) of its answer tokens, each from the logits one
    position before it, divided by the temperature, with the banned tokens masked, and the experts (L, n, K)
    at each answer token."""
    prompt_ids = policy.tokenizer.encode_prompt(prompt)
    ids = torch.tensor([prompt_ids + answer])                                                 # (1, S)
    out = policy.model(ids, torch.ones_like(ids, dtype=torch.bool))
    logits = out.logits[0, len(prompt_ids) - 1:-1].float() / temperature                      # (n, V)
    logits[:, list(policy.banned)] = float("-inf")
    logprobs = logits.log_softmax(dim=-1)[torch.arange(len(answer)), torch.tensor(answer)]   # (n,)
    return logprobs, out.topk_idx[:, 0, len(prompt_ids):]                                     # (L, n, K)


def test_advantages_follow_the_groups_by_hand():
    # group 1: rewards (1, 0.1) -> +1/std, −1/std with std = 0.9/√2; group 2: (1, 0) likewise with std 1/√2
    want = torch.tensor([1.0, -1.0, 1.0, -1.0]) / 2 ** 0.5
    assert torch.allclose(group_advantages(REWARDS, GROUP_SIZE), want, atol=1e-5)  # eps=1e-6 in the std: ~1e-6


def test_old_logprobs_and_routing_equal_a_naive_unpadded_loop(handmade):
    module, policy, mb, answers = handmade
    policy.model.eval()
    old = module.score_old(mb)
    with torch.no_grad():
        for row, (prompt, answer) in enumerate(zip(PROMPTS, answers)):
            n = len(answer)
            logprobs, experts = naive_row(policy, prompt, answer, module.config.temperature)
            # float32 forward of a 2-layer width-32 model, batched (padded) against alone: MODEL_ULPS (tolerance.py)
            assert_close_in_ulps(old.logprobs[row, :n], logprobs)
            assert (old.logprobs[row, n:] == 0).all()                        # padding carries exactly 0
            torch.testing.assert_close(old.topk_idx[:, row, :n].sort(dim=-1).values, experts.sort(dim=-1).values)
            assert bool(mb.mask[row, :n].all()) and not bool(mb.mask[row, n:].any())


def test_on_policy_grpo_gradient_is_plain_reinforce(handmade):
    module, policy, mb, _ = handmade
    policy.model.train()
    old = module.score_old(mb)
    params = [p for p in policy.model.parameters() if p.requires_grad]

    def gradient(loss_of_logprobs):
        logprobs = policy.score(mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.mask,
                                temperature=module.config.temperature).logprobs             # (B, N)
        return torch.autograd.grad(loss_of_logprobs(logprobs), params, allow_unused=True)

    grpo = gradient(lambda lp: policy_loss("grpo", logprobs=lp, old_logprobs=old.logprobs, advantages=mb.advantages,
                                           mask=mb.mask).loss)
    weight = mb.mask.float()                                                                  # (B, N)
    reinforce = gradient(lambda lp: -(mb.advantages * (lp * weight).sum(1) / weight.sum(1)).mean())
    scale = largest(*reinforce)
    assert scale > 0
    for got, want in zip(grpo, reinforce):
        # The two losses differ only in exp(log π − log π_old) = 1 (± rounding): same backward graph, so the
        # gradients agree to MODEL_ULPS of the largest one; a wrong mask, advantage or position would not.
        assert_close_in_ulps(got, want, scale=scale, ulps=MODEL_ULPS)


class _OneProcess:
    """The little of a Lightning Trainer that `collect_rollouts` asks for, for one process."""
    world_size, global_rank = 1, 0

    class strategy:
        @staticmethod
        def reduce(value, reduce_op):
            return value


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_resampling_replaces_flat_groups_and_keeps_the_batch_shape(handmade, monkeypatch, rounds):
    module, policy, _, answers = handmade
    monkeypatch.setattr(type(module), "trainer", property(lambda self: _OneProcess()))
    monkeypatch.setattr(module.config, "resample_rounds", rounds)
    width = max(len(answer) for answer in answers[:GROUP_SIZE])
    response = Samples(torch.tensor([a + [0] * (width - len(a)) for a in answers[:GROUP_SIZE]]),  # G responses
                       torch.tensor([[True] * len(a) + [False] * (width - len(a)) for a in answers[:GROUP_SIZE]]))
    # Each round samples 2 prompt groups: round 0 one flat and one informative, round 1 one informative.
    scripted = {0: [torch.tensor([0.1, 0.1]), torch.tensor([1.0, 0.1])],
                1: [torch.tensor([0.0, 0.0]), torch.tensor([0.1, 1.0])]}
    calls = []

    def sample_groups(self, problems, generator):
        calls.append([p.prompt for p in problems])
        rewards = scripted.get(len(calls) - 1, [torch.tensor([0.1, 0.1])] * 2)
        return [Group(problem, response, r) for problem, r in zip(problems, rewards)]

    monkeypatch.setattr(type(module), "sample_groups", sample_groups)
    minibatches, stats = module.collect_rollouts(step=0)
    advantages = torch.cat([mb.advantages for mb in minibatches])                             # (B,)
    assert len(calls) == min(1 + rounds, 2)              # stops as soon as the batch is all informative
    assert stats["reward_mean"] == torch.tensor([0.1, 0.1, 1.0, 0.1]).mean()  # round 0: the policy itself
    assert stats["zero_variance_frac"] == 0.5
    assert len(advantages) == 2 * GROUP_SIZE                                                    # shape kept
    if rounds == 0:   # round 0 as sampled: flat group (Â = 0) first, then the informative one
        assert stats["informative_frac"] == 0.5
        assert (advantages[:2] == 0).all() and advantages[2] > 0 > advantages[3]
    else:             # the flat group replaced in place by round 1's informative one
        assert stats["informative_frac"] == 1.0
        assert advantages[0] < 0 < advantages[1] and advantages[2] > 0 > advantages[3]
    assert calls[0] != calls[-1] or len(calls) == 1     # a later round draws fresh prompts
