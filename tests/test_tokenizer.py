import pytest

from data import tokenizer


def test_hello_world_ids():
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_round_trip_and_special_token():
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler… ünïcödé 123"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert 50256 not in tokenizer.encode("<|endoftext|>")  # plain text never turns into the special token


def test_rank_file_hash_is_checked(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(open(tokenizer.RANK_FILE, "rb").read()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        tokenizer.load_ranks(str(bad))


def test_encode_array_gives_the_same_ids_as_encode():
    for text in ["Hello world", "a <|endoftext|> b", "  tabs\tand\nnewlines ünïcödé 123", ""]:
        ids = tokenizer.encode_array(text)
        assert ids.dtype.name == "uint32" and ids.tolist() == tokenizer.encode(text)
