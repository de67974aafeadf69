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


def test_bytes_to_unicode_is_gpt2s_table():
    table = tokenizer.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā" and table[ord("A")] == "A"
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))


def test_recover_merge_follows_bpe_not_the_first_split():
    # "abc" splits as ab+c and as a+bc, both in the vocab; BPE merges bc first (rank 3 < 4), so a+bc made it
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert tokenizer.recover_merge(ranks, b"abc") == (b"a", b"bc")
    with pytest.raises(ValueError, match="not one merge"):
        tokenizer.recover_merge({b"a": 0, b"b": 1, b"c": 2, b"abc": 3}, b"abc")


def test_hf_vocab_and_merges_match_gpt2s_files():
    vocab, merges = tokenizer.hf_vocab_and_merges()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257)) and vocab["<|endoftext|>"] == 50256
    assert len(merges) == 50000
    # the first lines of GPT-2's merges.txt
    assert merges[:7] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"), ("Ġt", "he")]
    assert vocab["Ġthe"] == 262 and vocab["Hello"] == 15496
    # line i makes token 256 + i: the merge order is the id order
    assert all(vocab[left + right] == 256 + i for i, (left, right) in enumerate(merges))
