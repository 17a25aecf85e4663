"""ToyMoE against a Hugging Face Mixtral of the same dimensions on CPU, and KV-cache against no-cache generation.

    .venv/bin/python benchmarks/toy_moe_bench.py                  # 2 threads, about 1-2 minutes on an idle machine
    .venv/bin/python benchmarks/toy_moe_bench.py --threads 1 --rounds 3
    .venv/bin/python benchmarks/toy_moe_bench.py --write-readme   # also rewrite its section of benchmarks/README.md

Training: one step = forward + backward of next-token cross-entropy plus the router loss (HF: `labels=` with
output_router_logits=True, i.e. its Switch aux loss), on batch × seq_len random tokens, no padding. Both
models are built from one set of dimensions (the ToyMoEConfig defaults, tied embeddings) with random init,
offline; the parameter counts are checked equal. HF runs with its default experts implementation
(grouped_mm) and with its "eager" loop. Steps alternate between the models in rounds, so that load from
other processes on a shared machine hits all of them, and the median step is reported.

Generation: toy_moe.generate, 256 new tokens per row (no stop token), with the KV cache against
use_cache=False, which recomputes the whole prefix every step; the cached run is timed before and after the
uncached one and the slower time is kept.

The machine is shared: the 1-minute load average is printed before and after; numbers taken under load
(above ~1) understate throughput, and 2 threads on busy cores suffer most.
"""

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from rich.console import Console
from rich.table import Table

from toy_moe.generate import generate
from toy_moe.model import ToyMoE, ToyMoEConfig

README = Path(__file__).with_name("README.md")
SECTION = "## toy_moe_bench"
README_NOTES = """Reading it:
- Training: both models do the same arithmetic with the same kernels (SDPA, MKL matmuls), so the ratio
  measures overhead only. ToyMoE issues fewer operations per layer (one fused qkv projection, one sort of
  the N·K (token, expert) pairs, then one matmul pair per expert); HF's default grouped_mm expert kernel is
  about as fast as that loop on CPU, its eager one-hot loop slower.
- Generation: a cached step costs about the same whatever the prefix length, a no-cache step grows with
  it, so the ratio grows with the number of rows and new tokens.
- The machine is shared. With 2 threads on cores that other jobs occupy, every parallel region waits for a
  descheduled thread, and a decode step (hundreds of tiny operations) slows down 20-30×: figures taken with
  a load average well above 1 are not comparable, which is why the load is printed."""


def hf_mixtral(config: ToyMoEConfig, experts_implementation: str):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.expert_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        num_local_experts=config.n_experts, num_experts_per_tok=config.top_k,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=1e-6, tie_word_embeddings=True, router_aux_loss_coef=config.aux_loss_coef,
        output_router_logits=True, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    model = MixtralForCausalLM(hf_config)
    model.set_experts_implementation(experts_implementation)
    return model


def toy_train_step(model: ToyMoE, ids: torch.Tensor) -> None:
    out = model(ids)
    predicted = rearrange(out.logits[:, :-1], "b t v -> (b t) v")  # (B·(T-1), V)
    next_token_loss = F.cross_entropy(predicted, rearrange(ids[:, 1:], "b t -> (b t)"))
    (next_token_loss + model.router_loss(out)).backward()


def hf_train_step(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()


def median_step_seconds(steps: dict, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Alternate the step functions round by round; median wall time of one step of each."""
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up: first-call allocations and kernel selection
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(steps_per_round):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def generation_seconds(model: ToyMoE, batch: int, prompt_len: int, new_tokens: int, use_cache: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.bool)
    start = time.perf_counter()
    rollout = generate(model, prompt_ids, prompt_mask, max_new_tokens=new_tokens, generator=generator,
                       use_cache=use_cache)
    seconds = time.perf_counter() - start
    if rollout.tokens.shape != (batch, new_tokens):
        raise RuntimeError(f"generation stopped early: {tuple(rollout.tokens.shape)}")
    return seconds


def write_readme_section(body: str) -> None:
    """Replace (or append) this benchmark's own section of benchmarks/README.md; other sections stay as they are."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="training batch (rows of seq_len tokens)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="training rounds; each runs every model")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--gen-batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--write-readme", action="store_true", help=f"rewrite the '{SECTION}' section of {README.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()

    config = ToyMoEConfig(max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens))
    toy = ToyMoE(config)
    hf_models = {impl: hf_mixtral(config, impl) for impl in ("grouped_mm", "eager")}
    n_params = sum(p.numel() for p in toy.parameters())
    for impl, model in hf_models.items():
        if (hf_params := sum(p.numel() for p in model.parameters())) != n_params:
            raise RuntimeError(f"HF Mixtral ({impl}) has {hf_params} parameters, ToyMoE {n_params}: dimensions differ")

    load_before = os.getloadavg()[0]
    # Generation first: its two paths are timed one after the other, not interleaved, so they get the start.
    console.print(f"generation: {args.gen_batch} rows × {args.new_tokens} new tokens, with and without the KV cache")
    toy.eval()
    generation_seconds(toy, args.gen_batch, args.prompt_len, min(8, args.new_tokens), True)  # warm-up
    # The cached run is short and the uncached one long: time the cached run before and after it and keep the
    # slower, so that load arriving mid-way cannot flatter the ratio.
    cached_before = generation_seconds(toy, args.gen_batch, args.prompt_len, args.new_tokens, True)
    without_cache = generation_seconds(toy, args.gen_batch, args.prompt_len, args.new_tokens, False)
    with_cache = max(cached_before, generation_seconds(toy, args.gen_batch, args.prompt_len, args.new_tokens, True))
    toy.train()

    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    console.print(f"training: {args.rounds} rounds × {args.steps_per_round} steps per model, "
                  f"{args.batch}×{args.seq_len} tokens ...")
    steps = {
        "ToyMoE": lambda: toy_train_step(toy, ids),
        "HF Mixtral, grouped_mm experts (default)": lambda: hf_train_step(hf_models["grouped_mm"], ids),
        "HF Mixtral, eager experts": lambda: hf_train_step(hf_models["eager"], ids),
    }
    train = median_step_seconds(steps, args.rounds, args.steps_per_round)
    load_after = os.getloadavg()[0]

    tokens_per_step = args.batch * args.seq_len
    hf_default = train["HF Mixtral, grouped_mm experts (default)"]
    generated = args.gen_batch * args.new_tokens
    rows = [
        (f"train fwd+bwd: {name}", tokens_per_step / seconds, f"{hf_default / seconds:.2f}× HF default")
        for name, seconds in train.items()
    ]
    rows += [
        ("generate: ToyMoE, KV cache", generated / with_cache, f"{without_cache / with_cache:.2f}× no cache"),
        ("generate: ToyMoE, no cache (full prefix each step)", generated / without_cache, "1.00× no cache"),
    ]
    context = (
        f"{args.threads} threads, torch {torch.__version__}, {n_params / 1e6:.2f}M parameters each "
        f"(d_model {config.d_model}, {config.n_layers} layers, E={config.n_experts}, K={config.top_k}, "
        f"F={config.expert_hidden}); "
        f"training {args.batch}×{args.seq_len} tokens/step, median of {args.rounds * args.steps_per_round} steps; "
        f"generation {args.gen_batch} rows, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after"
    )
    table = Table(title="toy_moe_bench", caption=context)
    for column in ("what", "tokens/s", "ratio"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for what, rate, ratio in rows:
        table.add_row(what, f"{rate:,.0f}", ratio)
    console.print(table)

    if args.write_readme:
        lines = ["| what | tokens/s | ratio |", "|---|---:|---:|"] + [f"| {w} | {r:,.0f} | {q} |" for w, r, q in rows]
        command = "`.venv/bin/python benchmarks/toy_moe_bench.py --write-readme`"
        write_readme_section(f"{command} ({context}).\n\n" + "\n".join(lines) + "\n\n" + README_NOTES)
        console.print(f"wrote the '{SECTION}' section of {README}")


if __name__ == "__main__":
    main()
