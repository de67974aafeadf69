"""data/prepare.py on local txt, jsonl and parquet made here: content, splits, workers, crash-resume, bad input."""

import json
import os
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
from data.tokenizer import EOT_TOKEN, decode, encode
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


def all_tokens(out_dir):
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    return manifest, np.concatenate([np.load(os.path.join(out_dir, s["name"])) for s in manifest["shards"]])


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_shards_decode_to_the_documents(tmp_path, kind):
    out = str(tmp_path / "out")
    prepare(write_source(tmp_path, kind), out, shard_size=1000, val_tokens=300, workers=1, progress=False)
    manifest, tokens = all_tokens(out)
    assert tokens.dtype == np.uint16
    expected = np.concatenate([[EOT_TOKEN] + encode(d) for d in DOCS])
    assert np.array_equal(tokens, expected)
    assert decode(tokens.tolist()) == "".join("<|endoftext|>" + d for d in DOCS)


def test_val_shard_first_and_shard_sizes(tmp_path):
    out = str(tmp_path / "out")
    manifest = prepare(write_source(tmp_path, "jsonl"), out, shard_size=1000, val_tokens=300, workers=1,
                       progress=False)
    shards = manifest["shards"]
    assert shards[0]["split"] == "val" and all(s["split"] == "train" for s in shards[1:])
    assert shards[0]["tokens"] >= 300  # whole documents up to val_tokens
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
    ({"a.txt": b"a few words"}, "all taken by the val split: lower --val_tokens"),
    ({"a.txt": bytes(range(256)) * 4}, "holds text that is not UTF-8"),
    ({"a.txt": "caf\xe9 au lait".encode("latin-1")}, "holds text that is not UTF-8"),
    ({"a.jsonl": b'{"text": "hi"\n'}, "cannot be read: JSON parse error"),
])
def test_bad_sources_are_one_error_line(tmp_path, capsys, files, message):
    source = tmp_path / "src"
    for name, content in (files or {}).items():
        source.mkdir(exist_ok=True)
        (source / name).write_bytes(content)
    code = prepare_module.main(["--source", str(source), "--out", str(tmp_path / "out"), "--workers", "1",
                                "--val_tokens", "1000"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out" / "manifest.json").exists()


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
