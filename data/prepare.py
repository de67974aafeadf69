"""Tokenize any text source into uint16 .npy shards plus manifest.json, through the `datasets` library.

    python data/prepare.py --source data/shakespeare --out data/shakespeare_tokens --val_tokens 100000
    python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
    python data/prepare.py --verify data/fineweb10B        # check every shard's sha256 against the manifest

SOURCE is a folder or file of .txt (one document per file), .jsonl or .parquet, or a Hugging Face
dataset id (streamed, so 10B tokens never sit in memory). Each document is preceded by <|endoftext|>.
Val is a random sample of whole documents drawn from the whole source (seeded by --seed): each document
is drawn with probability --val_fraction (default 0.1, so a small corpus keeps about 90% for training),
and val stops growing at --val_tokens (default 1e7); when a large source has more drawn documents than
that, val keeps those of smallest random key, so it is still spread over all of the source. The run ends
by printing the train/val split, with a warning when val holds more than 20% of the tokens. Output is
identical whatever --workers, and a killed run re-run with the same arguments skips its finished shards.
"""

import argparse
import bisect
import fcntl
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
import urllib.error
import urllib.request

import numpy as np

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import sha256_of, write_shard  # noqa: E402
from data.tokenizer import EOT_TOKEN, encode_array  # noqa: E402
from gpt2_pretrain.atomic import atomic_write  # noqa: E402

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
STATE_FILE = "prepare_state.npz"  # an unfinished run: options, documents read, shards done, val so far, carry
OWN_FILE = re.compile(r"^((val|train)_\d{6}\.npy|manifest\.json|prepare_state\.npz)(\.tmp(\.\d+)?)?$")  # names we write
TEMPORARY = re.compile(r"\.tmp(\.\d+)?$")  # atomic_write's PATH.tmp.PID (PATH.tmp: older versions)
VAL_SHARE_WARNING = 0.2  # a val split above this share of the tokens is worth a warning
CHUNK_DOCUMENTS = 256  # documents per task sent to a worker
EOT_ARRAY = np.array([EOT_TOKEN], dtype=np.uint32)


class PrepareError(Exception):
    """A problem with the source or output the user can fix."""


class NotText(Exception):
    """Document `index` (from 0, over the whole source) holds `value`, which is not a string."""

    def __init__(self, index, value):
        super().__init__(index, value)
        self.index, self.value = index, value


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
    index = 0  # of the batch's first document in the source
    for batch in dataset.iter(batch_size=batch_size):
        if text_field not in batch:
            raise PrepareError(f"documents have no field '{text_field}' (fields: {sorted(batch)}); pass --text_field")
        texts = batch[text_field]
        if skip >= len(texts):
            skip -= len(texts)
            index += len(texts)
            continue
        for offset, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise NotText(index + offset, text)
        yield [text or "" for text in texts[skip:]]
        index += len(texts)
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


GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def document_keys(seed, start, count):
    """The random key of documents start..start+count-1: the i-th output of splitmix64 seeded with `seed`.

    A function of the seed and the document's index alone, so the val draw is the same for any --workers,
    and the same again when a killed run resumes."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around on purpose
        x = np.uint64(seed % 2**64) + (np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)) \
            * np.uint64(GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class ShardWriter:
    """Splits documents into val and train and writes train shards of shard_size tokens as they fill, resumably.

    Val is a seeded random sample of whole documents from the whole source: each document has a random key,
    and val holds the documents of smallest key, among those whose key falls below val_fraction of the key
    range, until it holds val_tokens. That set can change until the last document is read, so val is kept
    in memory (at most val_tokens plus one document) and written at the end; a document that leaves it goes
    to train then. The single document of smallest key is in val even when no key falls below the fraction,
    so a source of a few documents still gets a val split.
    """

    def __init__(self, out_dir, options):
        self.out_dir, self.options = out_dir, options
        self.shard_size = options["shard_size"]
        self.val_cap = options["val_tokens"]
        self.wants_val = options["val_tokens"] > 0 and options["val_fraction"] > 0
        fraction = options["val_fraction"]
        self.threshold = None if fraction >= 1 else int(fraction * 2**64)  # keys below it may go to val
        self.shards, self.documents, self.train_documents = [], 0, 0
        self.buffer, self.buffered = [], 0  # train tokens not yet in a shard
        self.val, self.val_size = [], 0  # (key, index, tokens) in key order

    def resume(self):
        """Continue an unfinished run of the same options; return how many documents to skip."""
        path = os.path.join(self.out_dir, STATE_FILE)
        if not os.path.isfile(path):
            return 0
        with np.load(path) as saved:
            state = json.loads(saved["state"].tobytes())
            arrays = {name: saved[name] for name in saved.files}
        if state["options"] != self.options:  # the state is written with each train shard: there is one at least
            raise PrepareError(f"{self.out_dir} holds an unfinished run with other options "
                               f"({option_changes(state['options'], self.options)}) and {len(state['shards'])} "
                               f"finished train shards: re-run with its options to finish it, or use another "
                               f"--out folder.")
        for shard in state["shards"]:
            shard_path = os.path.join(self.out_dir, shard["name"])
            if not os.path.isfile(shard_path) or np.load(shard_path, mmap_mode="r").size != shard["tokens"]:
                raise PrepareError(f"{shard_path} is missing or truncated: delete {self.out_dir} and start again.")
        self.shards, self.documents = state["shards"], state["documents"]
        self.train_documents = state["train_documents"]
        self.buffer, self.buffered = [arrays["carry"]], arrays["carry"].size
        pieces = np.split(arrays["val_tokens"], np.cumsum(arrays["val_lengths"])[:-1])
        self.val = [(int(key), int(index), tokens) for key, index, tokens in
                    zip(arrays["val_keys"], arrays["val_indices"], pieces)] if arrays["val_lengths"].size else []
        self.val_size = sum(tokens.size for _, _, tokens in self.val)
        return self.documents

    def add(self, tokens, key):
        """The next document's tokens and its random key."""
        index, shards = self.documents, len(self.shards)
        self.documents += 1
        if tokens.size == 0:
            return
        eligible = self.threshold is None or key < self.threshold
        if self.wants_val and (eligible or not self.val or key < self.val[0][0]):
            bisect.insort(self.val, (key, index, tokens), key=lambda entry: entry[:2])
            self.val_size += tokens.size
            # drop the largest keys while val is full without them (or holds a key beyond the fraction)
            while len(self.val) > 1:
                last_key, _, last = self.val[-1]
                beyond = self.threshold is not None and last_key >= self.threshold
                if not beyond and self.val_size - last.size < self.val_cap:
                    break
                self.val.pop()
                self.val_size -= last.size
                self._train(last)
        else:
            self._train(tokens)
        if len(self.shards) > shards:
            self._save_state()  # at a document's end, where the state is whole

    def _train(self, tokens):
        self.train_documents += 1
        self.buffer.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_size:
            flat = np.concatenate(self.buffer)
            self._write_train(flat[: self.shard_size], flat[self.shard_size:])

    def _write_train(self, tokens, carry):
        name = f"train_{len(self.shards) + 1:06d}.npy"
        self.shards.append(dict(write_shard(self.out_dir, name, tokens), split="train"))
        self.buffer, self.buffered = [carry], carry.size

    def _save_state(self):
        """Everything a resume needs, in one file written atomically: the state never points at a stale carry."""
        state = {"options": self.options, "documents": self.documents, "train_documents": self.train_documents,
                 "shards": self.shards}
        val_tokens = [tokens for _, _, tokens in self.val]
        carry = np.concatenate(self.buffer) if self.buffer else np.empty(0, dtype=np.uint16)
        arrays = dict(state=np.frombuffer(json.dumps(state).encode(), dtype=np.uint8), carry=carry,
                      val_keys=np.array([key for key, _, _ in self.val], dtype=np.uint64),
                      val_indices=np.array([index for _, index, _ in self.val], dtype=np.int64),
                      val_lengths=np.array([t.size for t in val_tokens], dtype=np.int64),
                      val_tokens=np.concatenate(val_tokens) if val_tokens else np.empty(0, dtype=np.uint16))
        atomic_write(os.path.join(self.out_dir, STATE_FILE), lambda f: np.savez(f, **arrays))
        delay = float(os.environ.get("GPT2_PREPARE_SHARD_DELAY", "0"))  # test hook: time to kill a run mid-way
        if delay:
            time.sleep(delay)

    def finish(self, source, name):
        """Check the split, write the val shard and the last train shard, then manifest.json."""
        train_tokens = sum(shard["tokens"] for shard in self.shards) + self.buffered
        if not train_tokens:
            if not self.val:
                raise PrepareError("the source holds no text: every document in it is empty.")
            if len(self.val) == 1:
                raise PrepareError(f"the source holds a single document ({self.val_size:,} tokens), and val and "
                                   f"train each take whole documents: split it into several (a .txt file into "
                                   f"files: mkdir parts && split -l 200 --additional-suffix=.txt BOOK.txt parts/, "
                                   f"then --source parts/).")
            raise PrepareError(f"all {len(self.val)} documents of the source ({self.val_size:,} tokens) were drawn "
                               f"into the val split: lower --val_fraction (now {self.options['val_fraction']:g}) "
                               f"or --val_tokens (now {self.val_cap:,}), or give more text.")
        if self.buffered:
            self._write_train(np.concatenate(self.buffer), np.empty(0, dtype=np.uint16))
        shards = self.shards
        if self.val:
            val = np.concatenate([tokens for _, _, tokens in sorted(self.val, key=lambda entry: entry[1])])
            shards = [dict(write_shard(self.out_dir, "val_000000.npy", val), split="val"), *shards]
        manifest = {"source": source, "name": name, "tokenizer": "gpt2", "dtype": "uint16", "options": self.options,
                    "documents": {"train": self.train_documents, "val": len(self.val),
                                  "skipped": self.documents - self.train_documents - len(self.val)},  # empty ones
                    "shards": shards}
        text = json.dumps(manifest, indent=2).encode()
        atomic_write(os.path.join(self.out_dir, "manifest.json"), lambda f: f.write(text))
        remove_own_files(self.out_dir, [STATE_FILE])
        return manifest


def option_changes(before, now):
    """The options that differ, as 'key X there, Y now'."""
    return ", ".join(f"{key} {before.get(key)!r} there, {now.get(key)!r} now" for key in now
                     if before.get(key) != now.get(key))


def remove_own_files(out_dir, names):
    """Remove files that prepare.py writes (shards named as it names them, its state, manifest and their
    temporary files) from out_dir, and nothing else."""
    for name in names:
        if OWN_FILE.match(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def check_finished(out_dir, options):
    """A folder that holds a finished run (manifest.json): of the same options, or from an older prepare.py that
    did not record them, it is prepared again from scratch; of other options, refused."""
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            manifest = json.load(f)
        shards = [shard for shard in manifest["shards"] if isinstance(shard.get("name"), str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PrepareError(f"{path} is not a manifest that prepare.py writes: use another --out folder.") from None
    if manifest.get("options", options) != options:
        raise PrepareError(f"{out_dir} holds shards prepared with other options "
                           f"({option_changes(manifest['options'], options)}): use another --out folder, or delete "
                           f"{out_dir} first.")
    print(f"{out_dir} holds a finished run of these options: preparing it again")
    remove_own_files(out_dir, [shard["name"] for shard in shards] + ["manifest.json", STATE_FILE])


def locate_document(source, index):
    """Where document `index` (from 0) of a local source is, as 'FILE line N' (.jsonl), 'FILE row N' (.parquet)
    or FILE (.txt); for a Hugging Face dataset, its number."""
    if not os.path.exists(source):
        return f"{source}, document {index + 1}"
    builder, files = local_files(source)
    for path in files:
        if builder == "text":
            if index == 0:
                return path
            index -= 1
        elif builder == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
            if index < rows:
                return f"{path} row {index + 1}"
            index -= rows
        else:
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        if index == 0:
                            return f"{path} line {number}"
                        index -= 1
    return source


def columns_of(path, builder):
    if builder == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    keys = set()
    with open(path, "rb") as f:
        for line in f:
            try:
                keys |= set(json.loads(line)) if line.strip() else set()
            except (ValueError, TypeError):  # a broken line: its own error, elsewhere
                pass
    return keys


def differing_columns(source):
    """A message naming the first file of a local .jsonl/.parquet source whose columns differ from the first
    file's, or None."""
    if not os.path.exists(source):
        return None
    builder, files = local_files(source)
    if builder == "text":
        return None
    first = columns_of(files[0], builder)
    for path in files[1:]:
        columns = columns_of(path, builder)
        if columns != first:
            return (f"{path} has other columns ({', '.join(sorted(columns))}) than {files[0]} "
                    f"({', '.join(sorted(first))}): give files of one layout, or leave it out of --source.")
    return None


def not_text_message(where, text_field, value):
    return (f"{where}: its '{text_field}' is a {type(value).__name__} ({str(value)[:40]!r}), not text: fix that "
            f"document, or pass --text_field the field that holds the text.")


def first_not_text(source, text_field):
    """The message for the first document of a local .jsonl/.parquet source whose text is not a string, or None."""
    if not os.path.exists(source):
        return None
    builder, files = local_files(source)
    for path in files if builder in ("json", "parquet") else []:
        if builder == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            if text_field in schema.names and not pa.types.is_string(schema.field(text_field).type):
                return (f"{path}: its column '{text_field}' holds {schema.field(text_field).type}, not text: pass "
                        f"--text_field the column that holds the text.")
            continue
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line) if line.strip() else None
                except ValueError:  # not JSON: its own error
                    continue
                value = row.get(text_field) if isinstance(row, dict) else None
                if value is not None and not isinstance(value, str):
                    return not_text_message(f"{path} line {number}", text_field, value)
    return None


def not_utf8(source):
    """'FILE line N holds text that is not UTF-8 (...)' for the first such file of a local source, or None."""
    if not os.path.exists(source):
        return None
    for path in local_files(source)[1]:
        with open(path, "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            return f"{path} line {line} holds text that is not UTF-8 ({e.reason} at byte {e.start})"
    return None


def hold_out(out_dir):
    """Lock --out for this run (a file descriptor to close at the end): a second prepare.py on it is refused.
    flock, so the kernel drops the lock with its process, however it ends."""
    fd = os.open(os.path.join(out_dir, ".prepare.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise PrepareError(f"--out {out_dir} is in use by another prepare.py run ({holder}): wait for it to end, or "
                           f"give this run another --out.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}".encode())
    return fd


def prepare(source, out_dir, name=None, split="train", text_field="text", shard_size=100_000_000,
            val_tokens=10_000_000, val_fraction=0.1, seed=1337, workers=None, progress=True):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise PrepareError(f"cannot write to output folder {out_dir}: {e.strerror}. Choose a writable --out.") from None
    lock = hold_out(out_dir)
    try:
        return prepare_locked(source, out_dir, name, split, text_field, shard_size, val_tokens, val_fraction, seed,
                              workers, progress)
    finally:
        # removed while held: the folder keeps only data (a run that opens the old file in this instant is refused)
        os.remove(os.path.join(out_dir, ".prepare.lock"))
        os.close(lock)  # releases the lock


def prepare_locked(source, out_dir, name, split, text_field, shard_size, val_tokens, val_fraction, seed, workers,
                   progress):
    options = {"source": source, "name": name, "split": split, "text_field": text_field, "shard_size": shard_size,
               "val_tokens": val_tokens, "val_fraction": val_fraction, "seed": seed}
    writer = ShardWriter(out_dir, options)
    skip = writer.resume()
    if not skip:
        check_finished(out_dir, options)
        # temporary files of a killed write are never read: the next write of that name starts it again
        remove_own_files(out_dir, [name for name in os.listdir(out_dir) if TEMPORARY.search(name)])
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
            keys = document_keys(seed, writer.documents, len(lengths))
            for document, key in zip(np.split(tokens, np.cumsum(lengths)[:-1]), keys.tolist()):
                writer.add(document, key)
            tokens_done += tokens.size
            if bar is not None:
                bar.update(len(lengths))
                rate = tokens_done / max(time.time() - started, 1e-9)
                bar.set_postfix(tokens=f"{tokens_done:,}", tok_per_s=f"{rate:,.0f}", refresh=False)
    except NotText as e:
        raise PrepareError(not_text_message(locate_document(source, e.index), text_field, e.value)) from None
    except UnicodeDecodeError as e:
        where = not_utf8(source) or f"{source} holds text that is not UTF-8 ({e.reason} at byte {e.start})"
        raise PrepareError(f"{where}: convert it (iconv -f latin1 -t utf-8 FILE) or leave binary files out of "
                           f"--source.") from None
    except Exception as e:
        # datasets and pyarrow word a local file they cannot use in many ways (CastError: files whose columns
        # differ; ArrowInvalid or pandas' ValueError: a text that is a number, a line that is not JSON): look
        # for the file at fault, and keep the traceback when there is none
        problem = differing_columns(source) or first_not_text(source, text_field)
        if problem:
            raise PrepareError(problem) from None
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
    path = os.path.join(out_dir, "manifest.json")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
        shards = manifest["shards"]
        if not all(isinstance(s["name"], str) and isinstance(s["sha256"], str) for s in shards):
            raise TypeError("a shard's name or sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: a list or number where a dict belongs
        raise PrepareError(f"{path} is not a manifest that prepare.py writes ({type(e).__name__}: {e}): prepare the "
                           f"data again.") from None
    problems = []
    for shard in shards:
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
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="probability that a document is drawn into the val split (default 0.1)")
    parser.add_argument("--val_tokens", type=float, default=1e7,
                        help="the most tokens in the val split (default 1e7; whole documents, so it may pass "
                             "this by less than one)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the random draw of val documents")
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
        if args.shard_size < 1 or args.val_tokens < 0 or not 0 <= args.val_fraction <= 1:
            raise PrepareError("--shard_size must be positive, --val_tokens not negative and --val_fraction "
                               "between 0 and 1")
        if args.val_fraction == 0 or int(args.val_tokens) == 0:
            raise PrepareError(f"--val_fraction {args.val_fraction:g} --val_tokens {int(args.val_tokens)} writes no "
                               f"val split, and train.py reads one (its val loss): keep a small one, e.g. "
                               f"--val_fraction 0.01 --val_tokens 100000.")
        manifest = prepare(args.source, args.out, args.name, args.split, args.text_field, int(args.shard_size),
                           int(args.val_tokens), args.val_fraction, args.seed, args.workers or None)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in split_summary(manifest, args.out):
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
    return 0


def split_summary(manifest, out_dir):
    """Lines saying what was written, 'train N tokens (share, documents), val ...', and a warning when val is
    large."""
    tokens = {split: sum(s["tokens"] for s in manifest["shards"] if s["split"] == split) for split in ("train", "val")}
    total = sum(tokens.values())
    parts = [f"{split} {tokens[split]:,} tokens ({tokens[split] / total:.1%}, "
             f"{manifest['documents'][split]:,} document{'s' * (manifest['documents'][split] != 1)})"
             for split in ("train", "val")]
    skipped = manifest["documents"].get("skipped", 0)
    parts += [f"{skipped:,} empty document{'s' * (skipped != 1)} skipped"] if skipped else []
    lines = [f"wrote {len(manifest['shards'])} shards to {out_dir}: {', '.join(parts)}"]
    if tokens["val"] > VAL_SHARE_WARNING * total:
        lines.append(f"warning: val holds {tokens['val'] / total:.0%} of the tokens, leaving "
                     f"{tokens['train'] / total:.0%} for training: lower --val_fraction or --val_tokens, or give "
                     f"more text.")
    return lines


if __name__ == "__main__":
    # datasets imports torch when it is installed (1-2 s of start-up, in every run) only to offer torch
    # formatting, which we never use; set here, not in prepare(), so it never reaches transformers in a caller
    os.environ.setdefault("USE_TORCH", "0")
    sys.exit(main())
