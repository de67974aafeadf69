"""Tokenize a text source into uint16 .npy shards plus manifest.json, through the `datasets` library.

    python data/prepare.py --source data/shakespeare --out data/shakespeare_tokens --val_tokens 100000
    python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B

SOURCE is a folder or file of .txt (one document per file), .jsonl or .parquet, or a Hugging Face
dataset id (streamed). Each document is preceded by <|endoftext|>; the val shard comes first.
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.tokenizer import EOT_TOKEN, encode  # noqa: E402

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class PrepareError(Exception):
    """A problem with the source or output the user can fix."""


def local_files(source):
    if os.path.isdir(source):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
        files = [f for f in files if os.path.splitext(f)[1] in LOCAL_BUILDERS]
    else:
        files = [source]
    if not files:
        raise PrepareError(f"no .txt, .jsonl or .parquet files in {source}")
    kinds = {LOCAL_BUILDERS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) > 1:
        raise PrepareError(f"{source}: use files of one kind (.txt, .jsonl or .parquet), got {sorted(map(str, kinds))}")
    return kinds.pop(), files


def iter_documents(source, name=None, split="train", text_field="text"):
    """Yield document strings from a local path or a Hugging Face dataset id, streaming."""
    import datasets

    if os.path.exists(source):
        builder, files = local_files(source)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    else:
        dataset = datasets.load_dataset(source, name=name, split=split, streaming=True)
    for row in dataset:
        text = row.get(text_field)
        if text is None:
            raise PrepareError(f"documents have no field '{text_field}' (fields: {sorted(row)}); pass --text_field")
        if text.strip():
            yield text


def tokenize_document(text):
    return np.array([EOT_TOKEN] + encode(text), dtype=np.uint16)


def write_shard(out_dir, name, tokens):
    """Write tokens as a .npy file atomically: a temporary name, fsync, then rename."""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, tokens)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"name": name, "tokens": int(tokens.size), "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}


def prepare(source, out_dir, name=None, split="train", text_field="text", shard_size=100_000_000,
            val_tokens=10_000_000):
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    buffer, buffered = [], 0
    in_val = val_tokens > 0
    prefix = os.path.basename(os.path.normpath(out_dir))
    for text in iter_documents(source, name, split, text_field):
        tokens = tokenize_document(text)
        buffer.append(tokens)
        buffered += tokens.size
        if in_val and buffered >= val_tokens:
            shards.append(dict(write_shard(out_dir, f"{prefix}_val_{0:06d}.npy", np.concatenate(buffer)), split="val"))
            buffer, buffered, in_val = [], 0, False
        while not in_val and buffered >= shard_size:
            flat = np.concatenate(buffer)
            index = len(shards)
            shards.append(dict(write_shard(out_dir, f"{prefix}_train_{index:06d}.npy", flat[:shard_size]), split="train"))
            buffer, buffered = [flat[shard_size:]], flat.size - shard_size
    if buffered:
        split_name = "val" if in_val else "train"
        shards.append(dict(write_shard(out_dir, f"{prefix}_{split_name}_{len(shards):06d}.npy", np.concatenate(buffer)),
                           split=split_name))
    manifest = {"source": source, "name": name, "tokenizer": "gpt2", "dtype": "uint16", "shards": shards}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder/file of .txt, .jsonl, .parquet, or a HF dataset id")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--name", default=None, help="HF dataset config name, e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="HF dataset split")
    parser.add_argument("--text_field", default="text", help="field holding the document text")
    parser.add_argument("--shard_size", type=float, default=1e8, help="tokens per train shard")
    parser.add_argument("--val_tokens", type=float, default=1e7, help="tokens (whole documents) in the val split")
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.source, args.out, args.name, args.split, args.text_field, int(args.shard_size),
                           int(args.val_tokens))
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    total = sum(s["tokens"] for s in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards, {total:,} tokens, to {args.out}")


if __name__ == "__main__":
    main()
