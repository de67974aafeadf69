"""GPT-2 BPE through tiktoken, built offline from the rank file bundled beside this module."""

import base64
import hashlib
import os

import tiktoken

RANK_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")
RANK_FILE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base
# GPT-2's pre-tokenization pattern (tiktoken's r50k_base)
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = 50256  # <|endoftext|>
N_VOCAB = 50257

_encoding = None


def load_ranks(path=RANK_FILE):
    with open(path, "rb") as f:
        contents = f.read()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != RANK_FILE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {RANK_FILE_SHA256}: restore it from git.")
    ranks = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def get_encoding():
    """The GPT-2 tiktoken.Encoding (cached): 50257 ids, <|endoftext|> = 50256."""
    global _encoding
    if _encoding is None:
        _encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=PATTERN,
            mergeable_ranks=load_ranks(),
            special_tokens={"<|endoftext|>": EOT_TOKEN},
            explicit_n_vocab=N_VOCAB,
        )
    return _encoding


def encode(text):
    """Ordinary tokens only: a literal '<|endoftext|>' in the text is encoded as plain text."""
    return get_encoding().encode_ordinary(text)


def encode_array(text):
    """The same ids as encode(), as a uint32 numpy array straight from tiktoken (no Python list in between)."""
    return get_encoding().encode_to_numpy(text, disallowed_special=())


def decode(ids):
    return get_encoding().decode(list(ids))


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: vocab.json and merges.txt spell tokens in these characters.

    Printable latin-1 bytes stand for themselves; the other 68 (controls, space, ...) map to 256, 257, ...
    in byte order, so the space byte is 'Ġ' (U+0120) and newline is 'Ċ' (U+010A)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def recover_merge(ranks, token):
    """The pair of tokens that BPE merges into `token`: run BPE on its bytes with only the merges of lower rank,
    which must leave exactly two parts (a rank file holds one merge per multi-byte token, in rank order)."""
    limit = ranks[token]
    parts = [bytes([byte]) for byte in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


def hf_vocab_and_merges(ranks=None):
    """(vocab, merges) in the form of GPT-2's vocab.json and merges.txt, from the tiktoken rank file: vocab maps
    each token, spelled through bytes_to_unicode(), to its id (<|endoftext|> included); merges lists the
    pairs in priority order, which is the rank order of the tokens they make."""
    ranks = load_ranks() if ranks is None else ranks
    table = bytes_to_unicode()

    def spell(token):
        return "".join(table[byte] for byte in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = [tuple(spell(part) for part in recover_merge(ranks, token))
              for token, _ in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges
