"""Byte-level BPE tokenizer for the toy MoE: a `tiktoken.Encoding` built offline from a shipped ranks file.

Notation: V vocabulary size (256 byte tokens + BPE merges + 5 special tokens = 512 = ToyMoEConfig.vocab_size).

tiktoken's named encodings download their ranks, so this module trains its own with tiktoken's reference
trainer (`tiktoken._educational.bpe_train`) on `data/corpus.txt` (a few KB of plain English and
Countdown-like lines) and ships the result as `data/toy_moe.tiktoken` (tiktoken's format: base64 token,
space, rank, one per line). The split pattern is GPT-4's (cl100k) with two changes that keep every digit
and every operator a token of its own, because arithmetic is much harder to learn when a BPE merges digit
runs (a CPU prototype of this repo learned `a+b=` well with one token per digit).

Rebuild the ranks file after editing the corpus (the run is deterministic):

    python -m toy_moe.tokenizer
    python -m toy_moe.tokenizer --corpus my_corpus.txt --out my.tiktoken
"""
from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Iterable

import tiktoken
from tiktoken._educational import bpe_train

DATA_DIR = Path(__file__).parent / "data"
CORPUS_PATH = DATA_DIR / "corpus.txt"
RANKS_PATH = DATA_DIR / "toy_moe.tiktoken"

# cl100k's pattern with `\p{N}{1,3}` -> `\p{N}` (one digit per pre-token) and ` ?[^\s\p{L}\p{N}]++[\r\n]*`
# -> `[^\s\p{L}\p{N}]` (one symbol per pre-token), so an expression like `3*(7+12)` tokenizes character by
# character and merges only ever join letters (and whitespace runs).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}|[^\s\p{L}\p{N}]|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>")
N_BYTE_TOKENS = 256
N_MERGES = 512 - N_BYTE_TOKENS - len(SPECIAL_TOKENS)  # fills exactly the model's default vocab_size=512


def train_ranks(text: str, n_merges: int = N_MERGES) -> dict[bytes, int]:
    """Byte-level BPE ranks (256 single bytes, then `n_merges` merges in the order they were learned)."""
    return bpe_train(text, vocab_size=N_BYTE_TOKENS + n_merges, pat_str=SPLIT_PATTERN, visualise=None)


def format_ranks(ranks: dict[bytes, int]) -> str:
    """tiktoken's file format. (`tiktoken.load.dump_tiktoken_bpe` would need the `blobfile` package.)"""
    by_rank = sorted(ranks.items(), key=lambda token_rank: token_rank[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)


def parse_ranks(text: str, source: str = "<ranks text>") -> dict[bytes, int]:
    """Inverse of `format_ranks`. (`tiktoken.load.load_tiktoken_bpe` caches local files by path in a temp
    directory, so after a rebuild it could return the stale ranks.)"""
    ranks = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{source}:{line_number}: expected '<base64 token> <rank>', got {line!r}")
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    return ranks


def build_ranks_file(corpus_path: Path | str = CORPUS_PATH, ranks_path: Path | str = RANKS_PATH) -> Path:
    """Retrain the BPE on `corpus_path` and write the ranks to `ranks_path`."""
    ranks = train_ranks(Path(corpus_path).read_text(encoding="utf-8"))
    ranks_path = Path(ranks_path)
    ranks_path.write_text(format_ranks(ranks), encoding="utf-8")
    return ranks_path


class ToyTokenizer:
    """A thin wrapper around a `tiktoken.Encoding` (`.encoding`) that knows the chat layout of the toy tasks:
    a prompt is `<|bos|><|user|> text <|assistant|>` and the answer that follows ends with `<|eos|>`."""

    def __init__(self, ranks: dict[bytes, int]):
        if len(ranks) + len(SPECIAL_TOKENS) > 512:
            raise ValueError(f"ranks: {len(ranks)} tokens + {len(SPECIAL_TOKENS)} specials exceed 512")
        self.encoding = tiktoken.Encoding(
            name="toy_moe",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)},
        )
        self.special_ids = tuple(self.encoding.encode_single_token(token) for token in SPECIAL_TOKENS)
        self.bos_id, self.eos_id, self.pad_id, self.user_id, self.assistant_id = self.special_ids
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: a special token's spelling inside `text` is an error, not a silent special."""
        for special in SPECIAL_TOKENS:
            if special in text:
                raise ValueError(f"text contains the special token {special!r}; encode ordinary text only")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Exact inverse of `encode` for any string; special ids decode to their spelling."""
        return self.encoding.decode(_as_int_list(ids))

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.bos_id, self.user_id, *self.encode(prompt), self.assistant_id]

    def encode_example(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids + eos): the supervised pair; the loss covers the second part only."""
        return self.encode_prompt(prompt), [*self.encode(answer), self.eos_id]

    def decode_response(self, ids: Iterable[int]) -> str:
        """The text of a generated response: everything before the first eos/pad, special tokens dropped."""
        ids = _as_int_list(ids)
        end = next((i for i, token in enumerate(ids) if token in (self.eos_id, self.pad_id)), len(ids))
        return self.encoding.decode([token for token in ids[:end] if token not in self.special_ids])


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Lists, tuples and 1-D tensors alike (a tensor's `.tolist()` is much faster than iterating it)."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(token) for token in ids]


def load_tokenizer(path: Path | str | None = None) -> ToyTokenizer:
    """The tokenizer whose ranks are in `path` (default: the shipped `toy_moe/data/toy_moe.tiktoken`)."""
    path = Path(path) if path is not None else RANKS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer ranks file not found: {path}")
    return ToyTokenizer(parse_ranks(path.read_text(encoding="utf-8"), source=str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Retrain the toy MoE's byte-level BPE and write its tiktoken ranks file.",
        epilog=__doc__[__doc__.index("Rebuild"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS_PATH, help="training text (%(default)s)")
    parser.add_argument("--out", type=Path, default=RANKS_PATH, help="ranks file to write (%(default)s)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(build_ranks_file(args.corpus, args.out))
    specials = dict(zip(SPECIAL_TOKENS, tokenizer.special_ids))
    print(f"wrote {args.out}: vocab_size {tokenizer.vocab_size}, special ids {specials}")


if __name__ == "__main__":
    main()
