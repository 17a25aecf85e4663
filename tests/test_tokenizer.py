"""toy_moe.tokenizer: exact round trips, one token per digit, the chat layout, a reproducible ranks file."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from toy_moe.tokenizer import RANKS_PATH, SPECIAL_TOKENS, build_ranks_file, load_tokenizer, parse_ranks

TOKENIZER = load_tokenizer()
ARITHMETIC_TEXT = st.text(alphabet="0123456789+-*/()=>: abcxyz\n", max_size=40)


@settings(deadline=None, max_examples=300)
@given(st.text(max_size=60))
def test_decode_inverts_encode_for_any_string(text):
    assume(not any(special in text for special in SPECIAL_TOKENS))
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text


@settings(deadline=None, max_examples=200)
@given(st.one_of(ARITHMETIC_TEXT, st.text(max_size=40)))
def test_every_ascii_digit_is_a_token_of_its_own(text):
    assume(not any(special in text for special in SPECIAL_TOKENS))
    pieces = [TOKENIZER.encoding.decode_single_token_bytes(token) for token in TOKENIZER.encode(text)]
    digit_pieces = [piece for piece in pieces if any(chr(byte).isdigit() for byte in piece if byte < 128)]
    assert all(len(piece) == 1 for piece in digit_pieces)
    assert len(digit_pieces) == sum(character in "0123456789" for character in text)


def test_vocabulary_fits_the_model_default():
    assert TOKENIZER.vocab_size <= 512
    assert len(set(TOKENIZER.special_ids)) == len(SPECIAL_TOKENS)
    assert max(TOKENIZER.special_ids) == TOKENIZER.vocab_size - 1


def test_special_tokens_encode_and_decode():
    prompt_ids, answer_ids = TOKENIZER.encode_example("12+34=", "46")
    prompt_text_ids = TOKENIZER.encode("12+34=")
    assert prompt_ids == [TOKENIZER.bos_id, TOKENIZER.user_id, *prompt_text_ids, TOKENIZER.assistant_id]
    assert answer_ids == [*TOKENIZER.encode("46"), TOKENIZER.eos_id]
    assert TOKENIZER.decode(prompt_ids) == "<|bos|><|user|>12+34=<|assistant|>"
    for special, token in zip(SPECIAL_TOKENS, TOKENIZER.special_ids):
        assert TOKENIZER.decode([token]) == special


def test_special_spelling_in_ordinary_text_is_an_error():
    with pytest.raises(ValueError, match="<\\|eos\\|>"):
        TOKENIZER.encode("1+1=<|eos|>")


def test_decode_response_stops_at_eos_or_pad_and_drops_specials():
    answer = TOKENIZER.encode("3*7+12")
    ids = [TOKENIZER.assistant_id, *answer, TOKENIZER.eos_id, *TOKENIZER.encode("99")]
    assert TOKENIZER.decode_response(ids) == "3*7+12"
    padded = torch.tensor([*answer, TOKENIZER.pad_id, TOKENIZER.pad_id])
    assert TOKENIZER.decode_response(padded) == "3*7+12"
    assert TOKENIZER.decode_response(answer) == "3*7+12"


def test_shipped_ranks_file_is_what_the_corpus_rebuilds(tmp_path):
    rebuilt = build_ranks_file(ranks_path=tmp_path / "rebuilt.tiktoken")
    assert rebuilt.read_bytes() == RANKS_PATH.read_bytes()
    text = "Use 3 7 12 to make 33"
    assert load_tokenizer(rebuilt).encode(text) == TOKENIZER.encode(text)


def test_bad_ranks_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        load_tokenizer(tmp_path / "missing.tiktoken")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        parse_ranks("AA== 0\nnot-a-rank-line\n", source="bad.tiktoken")
