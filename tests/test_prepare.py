"""data/prepare.py on local txt, jsonl and parquet made here: content, splits, workers, crash-resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data.prepare as prepare_module
from data.loader import DataError, DataLoader
from data.prepare import PrepareError, prepare
from data.tokenizer import decode, encode
from tests.conftest import ROOT, run_python

DOCS = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(40 + i % 13)) for i in range(60)]


def write_source(tmp_path, kind, docs=DOCS):
    folder = tmp_path / f"src_{kind}"
    folder.mkdir()
    if kind == "txt":
        for i, doc in enumerate(docs):
            (folder / f"doc{i:03d}.txt").write_text(doc)
    elif kind == "jsonl":
        (folder / "part.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        pq.write_table(pa.table({"text": docs}), folder / "part.parquet")
    return str(folder)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_document_count_for_the_progress_bar(tmp_path, kind):
    assert prepare_module.count_documents(write_source(tmp_path, kind)) == len(DOCS)


def all_tokens(out_dir, split=None):
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    return manifest, np.concatenate([np.load(os.path.join(out_dir, s["name"])) for s in manifest["shards"]
                                     if split in (None, s["split"])])


def documents_of(tokens):
    """The documents in a stream of tokens, each preceded by <|endoftext|>."""
    text = decode(tokens.tolist())
    assert text.startswith("<|endoftext|>")
    return text.split("<|endoftext|>")[1:]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_shards_decode_to_the_documents(tmp_path, kind):
    out = str(tmp_path / "out")
    prepare(write_source(tmp_path, kind), out, shard_size=1000, val_tokens=300, workers=1, progress=False)
    manifest, tokens = all_tokens(out)
    assert tokens.dtype == np.uint16
    assert sorted(documents_of(tokens)) == sorted(DOCS)  # every document once, whole, in val or in train
    val = documents_of(all_tokens(out, "val")[1])
    assert val == [d for d in DOCS if d in val]  # val keeps the source's order
    assert tokens.size == sum(1 + len(encode(d)) for d in DOCS)


def test_val_shard_first_and_shard_sizes(tmp_path):
    out = str(tmp_path / "out")
    manifest = prepare(write_source(tmp_path, "jsonl"), out, shard_size=1000, val_tokens=300, val_fraction=0.5,
                       workers=1, progress=False)
    shards = manifest["shards"]
    assert shards[0]["split"] == "val" and all(s["split"] == "train" for s in shards[1:])
    longest = max(1 + len(encode(d)) for d in DOCS)
    assert 300 <= shards[0]["tokens"] < 300 + longest  # whole documents until val holds val_tokens
    assert all(s["tokens"] == 1000 for s in shards[1:-1]) and 0 < shards[-1]["tokens"] <= 1000
    for shard in shards:
        assert np.load(os.path.join(out, shard["name"])).size == shard["tokens"]
    assert not os.path.exists(os.path.join(out, prepare_module.STATE_FILE))


def test_same_bytes_with_one_and_two_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_DOCUMENTS", 4)  # many tasks, so the two workers interleave
    source = write_source(tmp_path, "txt")
    for workers in (1, 2):
        prepare(source, str(tmp_path / f"w{workers}"), shard_size=700, val_tokens=200, workers=workers, progress=False)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert names == sorted(os.listdir(tmp_path / "w2"))
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path):
    source = write_source(tmp_path, "jsonl")
    args = ["data/prepare.py", "--source", source, "--shard_size", "500", "--val_tokens", "200", "--workers", "1"]
    reference = run_python([*args, "--out", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, GPT2_PREPARE_SHARD_DELAY="3", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / prepare_module.STATE_FILE).exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()  # it really died mid-way
    resumed = run_python([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "manifest.json").read_bytes() == (tmp_path / "reference" / "manifest.json").read_bytes()
    for name in os.listdir(tmp_path / "reference"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_empty_documents_are_skipped(tmp_path):
    out = str(tmp_path / "out")
    prepare(write_source(tmp_path, "jsonl", ["first doc", "", "   \n", "last doc"]), out, shard_size=100,
            val_tokens=0, workers=1, progress=False)
    _, tokens = all_tokens(out)
    assert decode(tokens.tolist()) == "<|endoftext|>first doc<|endoftext|>last doc"


def test_token_ids_beyond_uint16_are_refused(monkeypatch):
    monkeypatch.setattr(prepare_module, "encode_array", lambda text: np.array([70000], dtype=np.uint32))
    with pytest.raises(PrepareError, match="does not fit uint16"):
        prepare_module.tokenize_documents(["anything"])


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_python(["data/prepare.py", "--source", write_source(tmp_path, "txt"), "--out", f"{blocker}/out"])
    assert result.returncode == 2 and "cannot write to output folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_fails_fast(tmp_path):
    start = time.time()
    result = run_python(["data/prepare.py", "--source", "nobody/no-such-dataset", "--out", str(tmp_path / "out")],
                        env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2 and "cannot be reached" in result.stderr and "local" in result.stderr
    assert time.time() - start < 30


def test_missing_truncated_and_corrupt_shards_are_named(tmp_path):
    out = tmp_path / "out"
    prepare(write_source(tmp_path, "jsonl"), str(out), shard_size=1000, val_tokens=300, workers=1, progress=False)
    manifest = json.load(open(out / "manifest.json"))
    victim = out / manifest["shards"][1]["name"]
    original = victim.read_bytes()
    victim.write_bytes(original[:-100])  # truncated
    with pytest.raises(DataError, match=f"{victim.name}.*truncated"):
        DataLoader(str(out), "train", 2, 16)
    victim.write_bytes(original[:-2] + b"\x00\x01")  # same size, other content: only the hash tells
    with pytest.raises(DataError, match=f"{victim.name}.*sha256"):
        DataLoader(str(out), "train", 2, 16)
    result = run_python(["data/prepare.py", "--verify", str(out)])
    assert result.returncode == 2 and victim.name in result.stderr and "sha256" in result.stderr
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name}.*missing"):
        DataLoader(str(out), "train", 2, 16)
    victim.write_bytes(original)
    assert run_python(["data/prepare.py", "--verify", str(out)]).returncode == 0


@pytest.mark.parametrize("files, message", [
    (None, "no such file or folder"),
    ({"a.txt": b""}, "the source holds no text"),
    ({"a.txt": b"a few words"}, "the source holds a single document (4 tokens)"),
    ({"a.txt": bytes(range(256)) * 4}, "holds text that is not UTF-8"),
    ({"a.txt": "caf\xe9 au lait".encode("latin-1")}, "holds text that is not UTF-8"),
    ({"a.jsonl": b'{"text": "hi"\n'}, "cannot be read: JSON parse error"),
    # each names the file (and row) at fault; the old code raised AttributeError, CastError, or named the folder
    ({"a.jsonl": b'{"text": "hello there"}\n\n{"text": 5}\n'}, "a.jsonl line 3: its 'text' is a int ('5'), not text"),
    ({"1.jsonl": b'{"text": "hello there"}\n', "2.jsonl": b'{"body": "hi"}\n'},
     "2.jsonl has other columns (body) than "),
    ({"1.parquet": "parquet:text", "2.parquet": "parquet:content"}, "2.parquet has other columns (content) than "),
    ({"1.txt": b"fine words", "2.txt": b"more\ncaf\xe9"}, "2.txt line 2 holds text that is not UTF-8"),
])
def test_bad_sources_are_one_error_line(tmp_path, capsys, files, message):
    source = tmp_path / "src"
    for name, content in (files or {}).items():
        source.mkdir(exist_ok=True)
        if isinstance(content, str):  # "parquet:COLUMN": a parquet file of two documents in that column
            pq.write_table(pa.table({content.split(":")[1]: ["a few words", "and some more"]}), source / name)
        else:
            (source / name).write_bytes(content)
    code = prepare_module.main(["--source", str(source), "--out", str(tmp_path / "out"), "--workers", "1",
                                "--val_tokens", "1000"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_document_keys_are_splitmix64():
    def splitmix64(seed, i):  # the reference, in Python integers
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) % 2**64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    for seed in (0, 1337, 2**64 - 1):
        assert prepare_module.document_keys(seed, 1000, 5).tolist() == [splitmix64(seed, i) for i in range(1000, 1005)]


MARKED = [f"marker{i:03d} " + " ".join(f"w{(i * 5 + j) % 61}" for j in range(30)) for i in range(100)]


def val_markers(out_dir):
    return sorted(int(d[6:9]) for d in documents_of(all_tokens(out_dir, "val")[1]))


def test_val_is_drawn_from_the_whole_source(tmp_path):
    """100 files, each with its marker: val holds early and late ones, by default and when val_tokens binds."""
    source = write_source(tmp_path, "txt", MARKED)
    prepare(source, str(tmp_path / "default"), shard_size=10_000, workers=1, progress=False)
    drawn = val_markers(tmp_path / "default")
    assert 3 <= len(drawn) <= 20  # about 10 of 100 drawn; 3..20 holds for this seed (the draw is fixed by it)
    assert min(drawn) < 30 and max(drawn) >= 70
    # a cap that 4 documents reach: val keeps the smallest keys of the ~50 drawn, still from across the source
    smallest = np.argsort(prepare_module.document_keys(1337, 0, 100))[:4].tolist()
    cap = sum(1 + len(encode(MARKED[i])) for i in smallest[:3]) + 1  # 3 stay below it, so a 4th is taken
    prepare(source, str(tmp_path / "capped"), shard_size=10_000, val_tokens=cap, val_fraction=0.5, workers=1,
            progress=False)
    capped = val_markers(tmp_path / "capped")
    assert capped == sorted(smallest) and min(capped) < 30 and max(capped) >= 70
    _, tokens = all_tokens(tmp_path / "capped")
    assert sorted(documents_of(tokens)) == MARKED  # the documents val let go are in train


def test_split_is_printed_and_a_large_val_warned(tmp_path, capsys):
    source = write_source(tmp_path, "jsonl", MARKED)
    assert prepare_module.main(["--source", source, "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    val = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    train = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    documents = manifest["documents"]
    assert documents["train"] + documents["val"] == 100
    assert (f"train {train:,} tokens ({train / (train + val):.1%}, {documents['train']} documents), "
            f"val {val:,} tokens ({val / (train + val):.1%}, {documents['val']} documents)") in captured.out
    assert "warning" not in captured.out + captured.err
    few = write_source(tmp_path, "txt", MARKED[:3])  # 3 documents: val takes one of them, about a third
    assert prepare_module.main(["--source", few, "--out", str(tmp_path / "few"), "--workers", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and re.search(r"val holds 3\d% of the tokens.*lower --val_fraction", warnings[0])


def test_the_suggested_retry_after_an_all_val_error_works(tmp_path, capsys):
    """A small corpus all drawn into val is refused; the command the error suggests then works in the same --out."""
    source, out = write_source(tmp_path, "txt", MARKED[:20]), str(tmp_path / "mine")
    assert prepare_module.main(["--source", source, "--out", out, "--workers", "1", "--val_fraction", "1"]) == 2
    error = capsys.readouterr().err
    assert "all 20 documents of the source" in error and "lower --val_fraction (now 1)" in error
    assert os.listdir(out) == []  # nothing left behind that the retry would trip on
    assert prepare_module.main(["--source", source, "--out", out, "--workers", "1", "--val_fraction", "0.3"]) == 0
    assert "train " in capsys.readouterr().out


def test_other_options_on_a_folder_with_finished_shards_are_refused(tmp_path, monkeypatch):
    source, out = write_source(tmp_path, "txt", MARKED), str(tmp_path / "out")

    def killed(self, source, name):
        raise KeyboardInterrupt  # a run stopped after writing train shards, before its manifest

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module.ShardWriter, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare(source, out, shard_size=1000, workers=1, progress=False)
    assert os.path.exists(os.path.join(out, prepare_module.STATE_FILE))
    with pytest.raises(PrepareError, match=r"unfinished run with other options \(val_fraction 0.1 there, 0.2 now\)"):
        prepare(source, out, shard_size=1000, val_fraction=0.2, workers=1, progress=False)
    prepare(source, out, shard_size=1000, workers=1, progress=False)  # the same options finish it
    reference = str(tmp_path / "reference")
    prepare(source, reference, shard_size=1000, workers=1, progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(reference, name), "rb").read(), name
    with pytest.raises(PrepareError, match=r"prepared with other options \(shard_size 1000 there, 2000 now\)"):
        prepare(source, out, shard_size=2000, workers=1, progress=False)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "train_000009.npy.tmp.4242").write_bytes(b"cut short")  # a killed atomic_write's
    prepare(source, out, shard_size=1000, workers=1, progress=False)  # the same options: prepared again
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference) + ["notes.txt"])


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_local_text_without_the_datasets_library_gives_the_same_shards(tmp_path, monkeypatch, kind):
    """.txt and .jsonl need no `datasets` (a GPU image may lack it): byte for byte what its builders give."""
    docs = DOCS[:20] + ["two lines\r\nwith a windows break\n", "", "  trailing spaces and a tab\t\n\n"]
    source = write_source(tmp_path, kind, docs)
    prepare(source, str(tmp_path / "with"), shard_size=500, val_tokens=200, workers=1, progress=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError):
        import datasets  # noqa: F401
    prepare(source, str(tmp_path / "without"), shard_size=500, val_tokens=200, workers=1, progress=False)
    names = sorted(os.listdir(tmp_path / "with"))
    assert names == sorted(os.listdir(tmp_path / "without"))
    for name in names:
        assert (tmp_path / "with" / name).read_bytes() == (tmp_path / "without" / name).read_bytes(), name


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    source, out = write_source(tmp_path, "txt", DOCS[:10]), str(tmp_path / "out")
    os.makedirs(out)
    held = prepare_module.hold_out(out)  # as a first run holds it while it tokenizes
    try:
        assert prepare_module.main(["--source", source, "--out", out, "--workers", "1"]) == 2
    finally:
        os.close(held)
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: --out {out} is in use by another prepare.py run (pid {os.getpid()}: ")
    assert os.listdir(out) == [".prepare.lock"]  # the first run's: nothing written
    assert prepare_module.main(["--source", source, "--out", out, "--workers", "1"]) == 0
    assert ".prepare.lock" not in os.listdir(out)  # a finished run leaves only its data


@pytest.mark.parametrize("flags", [["--val_fraction", "0"], ["--val_tokens", "0"]])
def test_no_val_split_is_refused(tmp_path, capsys, flags):
    # the old code wrote data without a val shard, which train.py then refused
    source = write_source(tmp_path, "txt", DOCS[:10])
    assert prepare_module.main(["--source", source, "--out", str(tmp_path / "out"), "--workers", "1", *flags]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert "writes no val split, and train.py reads one" in error and "--val_fraction 0.01" in error


def test_skipped_documents_are_counted(tmp_path, capsys):
    source = write_source(tmp_path, "jsonl", [*DOCS[:10], "", "  \n"])
    assert prepare_module.main(["--source", source, "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert json.load(open(tmp_path / "out" / "manifest.json"))["documents"]["skipped"] == 2
    assert "2 empty documents skipped" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"shards": [{"name": 3, "sha256": "x"}]}', '{"shards": [{}]}', "{"])
def test_verify_of_a_broken_manifest_is_one_error_line(tmp_path, capsys, manifest):
    (tmp_path / "manifest.json").write_text(manifest)
    assert prepare_module.main(["--verify", str(tmp_path)]) == 2
    (error,) = capsys.readouterr().err.splitlines()
    assert error.startswith(f"error: {tmp_path / 'manifest.json'} is not a manifest that prepare.py writes (")


def test_a_text_that_is_not_a_string_is_named_without_the_datasets_library(tmp_path, monkeypatch):
    source = write_source(tmp_path, "jsonl", ["first doc", ["a", "list"], "last doc"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrepareError, match=r"part.jsonl line 2: its 'text' is a list \(\"\['a', 'list'\]\"\), not"):
        prepare(source, str(tmp_path / "out"), workers=1, progress=False)
