"""Tokenize any text source into uint16 .npy shards plus manifest.json, through the `datasets` library.

    python data/prepare.py --source data/shakespeare --out data/shakespeare_tokens --val_tokens 100000
    python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
    python data/prepare.py --verify data/fineweb10B        # check every shard's sha256 against the manifest

SOURCE is a folder or file of .txt (one document per file), .jsonl or .parquet, or a Hugging Face
dataset id (streamed, so 10B tokens never sit in memory). Each document is preceded by <|endoftext|>;
the first documents, up to --val_tokens, make the val shard, which comes first. Output is identical
whatever --workers, and a killed run re-run with the same arguments skips its finished shards.
"""

import argparse
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request
import multiprocessing

import numpy as np

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import atomic_write, sha256_of, write_shard  # noqa: E402
from data.tokenizer import EOT_TOKEN, encode_array  # noqa: E402

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STATE_FILE = "prepare_state.json"  # progress of an unfinished run: options, documents consumed, shards done
CARRY_FILE = "prepare_carry.npy"  # tokens read past the last finished shard
CHUNK_DOCUMENTS = 256  # documents per task sent to a worker
EOT_ARRAY = np.array([EOT_TOKEN], dtype=np.uint32)


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


class LocalDocuments:
    """Local .txt/.jsonl files read without `datasets` (optional for them): the documents and order of its text
    builder (one document a file) and json builder, as batches of columns like its `iter`."""

    column_names = None  # rows keep every field; document_batches picks the text one

    def __init__(self, builder, files):
        self.builder, self.files = builder, files

    def rows(self):
        for path in self.files:
            with open(path, encoding="utf-8") as f:
                if self.builder == "text":
                    yield {"text": f.read()}
                    continue
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise PrepareError(f"{path} line {number} is not JSON. Fix or remove that file.") from None

    def iter(self, batch_size):
        rows = self.rows()
        while batch := list(itertools.islice(rows, batch_size)):
            keys = dict.fromkeys(key for row in batch for key in row)
            yield {key: [row.get(key) for row in batch] for key in keys}


def open_source(source, name=None, split="train"):
    """A streaming `datasets` dataset for a local path or a Hugging Face dataset id."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if os.path.exists(source):
        builder, files = local_files(source)
        if datasets is None:
            if not all(f.endswith((".txt", ".jsonl")) for f in files):
                raise PrepareError(f"{source}: reading .json or .parquet needs the datasets library: pip install "
                                   f"datasets, or give .txt or .jsonl files.")
            return LocalDocuments(builder, files)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    if source.startswith((os.sep, ".", "~")) or os.path.splitext(source)[1] in LOCAL_BUILDERS:
        raise PrepareError(f"{source}: no such file or folder (a Hugging Face dataset id looks like owner/name).")
    if datasets is None:
        raise PrepareError(f"'{source}' is a Hugging Face dataset id, which needs the datasets library: pip install "
                           f"datasets, or give local .txt/.jsonl files as --source.")
    check_hub(source)
    try:
        return datasets.load_dataset(source, name=name, split=split, streaming=True)
    except Exception as e:  # the hub's errors come from several libraries; all mean the same to the user
        raise PrepareError(
            f"could not open '{source}' from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}). "
            f"Check the dataset id, --name and your network, or give local .txt/.jsonl/.parquet files as --source."
        ) from None


def check_hub(source, timeout=10):
    """One quick request to the hub before `datasets` starts its own retries (tens of seconds when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return  # offline mode: datasets reads its cache or says what is missing
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets/{source}", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the hub answered (a 401/404 also comes for gated ids): datasets says the rest, with auth
    except OSError as e:
        raise PrepareError(f"'{source}' is not a local path, and the Hugging Face hub ({endpoint}) cannot be reached "
                           f"({getattr(e, 'reason', e)}). Check your network, or give local .txt/.jsonl/.parquet "
                           f"files as --source.") from None


def document_batches(dataset, text_field="text", batch_size=256, skip=0):
    """Lists of document strings, empty ones included (they are skipped after tokenizing, so counts stay aligned).

    Reads Arrow batches of the text column only: many times faster than a dict per row, and the reading
    happens in the main process while the workers tokenize.
    """
    if dataset.column_names and text_field in dataset.column_names:
        dataset = dataset.select_columns([text_field])
    for batch in dataset.iter(batch_size=batch_size):
        if text_field not in batch:
            raise PrepareError(f"documents have no field '{text_field}' (fields: {sorted(batch)}); pass --text_field")
        texts = batch[text_field]
        if skip >= len(texts):
            skip -= len(texts)
            continue
        yield [text or "" for text in texts[skip:]]
        skip = 0


def count_documents(source, name=None, split="train"):
    """How many documents the source holds, when that is cheap to know (for the progress bar's ETA), else None."""
    if os.path.exists(source):
        builder, files = local_files(source)
        if builder == "text":
            return len(files)
        if builder == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if all(f.endswith(".jsonl") for f in files):
            total = 0
            for f in files:
                with open(f, "rb") as handle:
                    total += sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))
            return total  # a blank line would count too: the ETA is a guide, not a promise
        return None
    try:
        import datasets

        info = datasets.load_dataset_builder(source, name=name).info
        return info.splits[split].num_examples if info.splits and split in info.splits else None
    except Exception:  # no metadata on the hub for this dataset: the bar just shows no ETA
        return None


def tokenize_documents(texts):
    """(tokens, lengths): every document's <|endoftext|> and tokens in one uint16 array, and each document's
    length (0 for an empty one). One array, not one per document, is cheap to send back from a worker."""
    pieces, lengths = [], []
    for text in texts:
        if not text.strip():
            lengths.append(0)
            continue
        ids = encode_array(text)
        pieces += [EOT_ARRAY, ids]
        lengths.append(1 + ids.size)
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.uint32)
    if tokens.size and tokens.max() >= 2**16:
        raise PrepareError(f"token id {tokens.max()} does not fit uint16: use a tokenizer with < 65536 ids")
    return tokens.astype(np.uint16), np.array(lengths, dtype=np.int64)


class ShardWriter:
    """Collects document tokens into the val shard, then train shards of shard_size tokens, resumably."""

    def __init__(self, out_dir, options, shard_size, val_tokens):
        self.out_dir, self.options = out_dir, options
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.shards, self.documents, self.buffer, self.buffered = [], 0, [], 0
        self.in_val = val_tokens > 0

    def resume(self):
        """Continue an unfinished run of the same options; return how many documents to skip."""
        path = os.path.join(self.out_dir, STATE_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path) as f:
            state = json.load(f)
        if state["options"] != self.options:
            raise PrepareError(f"{self.out_dir} holds an unfinished run with other options ({state['options']}): "
                               f"re-run with those, or use an empty --out folder.")
        for shard in state["shards"]:
            shard_path = os.path.join(self.out_dir, shard["name"])
            if not os.path.isfile(shard_path) or np.load(shard_path, mmap_mode="r").size != shard["tokens"]:
                raise PrepareError(f"{shard_path} is missing or truncated: delete {self.out_dir} and start again.")
        self.shards, self.documents, self.in_val = state["shards"], state["documents"], state["in_val"]
        carry = np.load(os.path.join(self.out_dir, CARRY_FILE))
        self.buffer, self.buffered = [carry], carry.size
        return self.documents

    def add(self, tokens):
        self.documents += 1
        if tokens.size == 0:
            return
        self.buffer.append(tokens)
        self.buffered += tokens.size
        if self.in_val and self.buffered >= self.val_tokens:
            self._write("val", np.concatenate(self.buffer), np.empty(0, dtype=np.uint16))
            self.in_val = False
        while not self.in_val and self.buffered >= self.shard_size:
            flat = np.concatenate(self.buffer)
            self._write("train", flat[: self.shard_size], flat[self.shard_size:])

    def _write(self, split, tokens, carry):
        name = f"{split}_{len(self.shards):06d}.npy"
        self.shards.append(dict(write_shard(self.out_dir, name, tokens), split=split))
        self.buffer, self.buffered = [carry], carry.size
        # the carry first, then the state that points at it: a kill between the two repeats no work wrongly
        atomic_write(os.path.join(self.out_dir, CARRY_FILE), lambda f: np.save(f, carry))
        state = {"options": self.options, "documents": self.documents, "shards": self.shards, "in_val": self.in_val
                 and split != "val"}
        atomic_write(os.path.join(self.out_dir, STATE_FILE), lambda f: f.write(json.dumps(state).encode()))
        delay = float(os.environ.get("GPT2_PREPARE_SHARD_DELAY", "0"))  # test hook: time to kill a run mid-way
        if delay:
            time.sleep(delay)

    def finish(self, source, name):
        if self.buffered:
            tokens = np.concatenate(self.buffer)
            self._write("val" if self.in_val else "train", tokens, np.empty(0, dtype=np.uint16))
        if not any(shard["split"] == "train" for shard in self.shards):
            total = sum(shard["tokens"] for shard in self.shards)
            raise PrepareError(f"the source holds {total:,} tokens, all taken by the val split: lower --val_tokens "
                               f"(now {self.val_tokens:,}) or give more text." if total else
                               "the source holds no text: every document in it is empty.")
        manifest = {"source": source, "name": name, "tokenizer": "gpt2", "dtype": "uint16", "shards": self.shards}
        text = json.dumps(manifest, indent=2).encode()
        atomic_write(os.path.join(self.out_dir, "manifest.json"), lambda f: f.write(text))
        for leftover in (STATE_FILE, CARRY_FILE):
            os.remove(os.path.join(self.out_dir, leftover))
        return manifest


def prepare(source, out_dir, name=None, split="train", text_field="text", shard_size=100_000_000,
            val_tokens=10_000_000, workers=None, progress=True):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PrepareError(f"cannot write to output folder {out_dir}: {e.strerror}. Choose a writable --out.") from None
    options = {"source": source, "name": name, "split": split, "text_field": text_field, "shard_size": shard_size,
               "val_tokens": val_tokens}
    writer = ShardWriter(out_dir, options, shard_size, val_tokens)
    skip = writer.resume()
    workers = workers or os.cpu_count() or 1
    # spawn, not fork: forking a process that runs threads (W&B, torch) can deadlock the children.
    # started first, so the workers' start-up overlaps with opening the source
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = None
    try:
        batches = document_batches(open_source(source, name, split), text_field, CHUNK_DOCUMENTS, skip)
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit=" docs", initial=skip, total=count_documents(source, name, split),
                       desc=f"tokenizing {source}", dynamic_ncols=True)
        started, tokens_done = time.time(), 0
        results = pool.imap(tokenize_documents, batches) if pool else map(tokenize_documents, batches)
        for tokens, lengths in results:  # imap keeps the input order: the same output for any number of workers
            for document in np.split(tokens, np.cumsum(lengths)[:-1]):
                writer.add(document)
            tokens_done += tokens.size
            if bar is not None:
                bar.update(len(lengths))
                rate = tokens_done / max(time.time() - started, 1e-9)
                bar.set_postfix(tokens=f"{tokens_done:,}", tok_per_s=f"{rate:,.0f}", refresh=False)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{source} holds text that is not UTF-8 ({e.reason} at byte {e.start}): convert it "
                           f"(iconv -f latin1 -t utf-8 FILE) or leave binary files out of --source.") from None
    except ValueError as e:  # pyarrow's ArrowInvalid: a .jsonl line that is not JSON, a .parquet that is not parquet
        if type(e).__name__ != "ArrowInvalid":
            raise
        raise PrepareError(f"{source} cannot be read: {str(e).splitlines()[0]}. Fix or remove that file.") from None
    finally:
        if pool:
            pool.terminate()
        if bar is not None:
            bar.close()
    return writer.finish(source, name)


def verify(out_dir):
    """Check every shard in the manifest exists with its token count and sha256; return the problems."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    problems = []
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["name"])
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif sha256_of(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from manifest.json (corrupt or replaced)")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="folder/file of .txt, .jsonl, .parquet, or a HF dataset id")
    parser.add_argument("--out", help="output folder for shards and manifest.json")
    parser.add_argument("--name", default=None, help="HF dataset config name, e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="HF dataset split")
    parser.add_argument("--text_field", default="text", help="field holding the document text")
    parser.add_argument("--shard_size", type=float, default=1e8, help="tokens per train shard")
    parser.add_argument("--val_tokens", type=float, default=1e7, help="tokens (whole documents) in the val split")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: all cores)")
    parser.add_argument("--verify", metavar="DIR", help="check the shards in DIR against its manifest.json and exit")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            if not os.path.isfile(os.path.join(args.verify, "manifest.json")):
                raise PrepareError(f"no manifest.json in {args.verify}")
            problems = verify(args.verify)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            print(f"{args.verify}: {'all shards match manifest.json' if not problems else 'FAILED'}")
            return 2 if problems else 0
        if not args.source or not args.out:
            parser.error("--source and --out are required (or --verify DIR)")
        if args.shard_size < 1 or args.val_tokens < 0:
            raise PrepareError("--shard_size must be positive and --val_tokens not negative")
        manifest = prepare(args.source, args.out, args.name, args.split, args.text_field, int(args.shard_size),
                           int(args.val_tokens), args.workers or None)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(s["tokens"] for s in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards, {total:,} tokens, to {args.out}")
    return 0


if __name__ == "__main__":
    # datasets imports torch when it is installed (1-2 s of start-up, in every run) only to offer torch
    # formatting, which we never use; set here, not in prepare(), so it never reaches transformers in a caller
    os.environ.setdefault("USE_TORCH", "0")
    sys.exit(main())
