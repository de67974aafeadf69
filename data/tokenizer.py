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
