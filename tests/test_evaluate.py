"""HellaSwag scoring, checked against a direct computation with transformers' GPT2LMHeadModel."""

import http.server
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import encode
from gpt2_pretrain.hellaswag import (HellaSwagError, ending_losses, evaluate_hellaswag, fetch_hellaswag, load_examples,
                                     render)
from gpt2_pretrain.hf_interop import export_hf
from model import GPT, GPTConfig
from tests.conftest import EXAMPLES, run_python, write_examples

transformers = pytest.importorskip("transformers")

def tiny_model(block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def reference_scores(hf_model, example):
    """Each ending alone through transformers: (summed, mean) loss of its tokens after the context."""
    context = encode(example["ctx"])
    summed, mean = [], []
    for ending in example["endings"]:
        ending_tokens = encode(" " + ending)
        idx = torch.tensor([context + ending_tokens])
        with torch.no_grad():
            logits = hf_model(idx).logits[0, len(context) - 1: -1]
        losses = F.cross_entropy(logits, torch.tensor(ending_tokens), reduction="none")
        summed.append(losses.sum().item())
        mean.append(losses.mean().item())
    return summed, mean


def test_scores_match_transformers(tmp_path):
    ours = tiny_model()
    keys = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "tie_embeddings": True}
    export_hf(ours.state_dict(), keys, str(tmp_path / "hf"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    expected_acc = expected_acc_norm = expected_acc_per_token = 0
    for example in EXAMPLES:
        summed, mean = reference_scores(hf, example)
        # lm-eval's acc_norm: argmax of loglikelihood / len(choice), the choice's characters
        per_char = [summed[i] / len(example["endings"][i]) for i in range(4)]
        expected_acc += int(min(range(4), key=summed.__getitem__) == example["label"])
        expected_acc_norm += int(min(range(4), key=per_char.__getitem__) == example["label"])
        expected_acc_per_token += int(min(range(4), key=mean.__getitem__) == example["label"])
    scores = evaluate_hellaswag(ours, load_examples(write_examples(tmp_path / "hs.jsonl")), encode, 64, "cpu")
    assert scores["hellaswag_examples"] == 3
    assert scores["hellaswag_acc"] == pytest.approx(expected_acc / 3)
    assert scores["hellaswag_acc_norm"] == pytest.approx(expected_acc_norm / 3)
    assert scores["hellaswag_acc_per_token"] == pytest.approx(expected_acc_per_token / 3)


def test_acc_norm_divides_by_characters_as_lm_eval_and_acc_per_token_by_tokens():
    """Each example labelled with the ending lm-eval's acc_norm would pick (summed loss / len(ending), from
    the transformers-checked per-example losses), on examples where that differs from the lowest mean token
    loss for some: acc_norm is then 1 and acc_per_token is not."""
    model, examples = tiny_model(128), varied_examples(seed=1)
    labelled, disagree = [], 0
    for example in examples:
        summed, mean = ending_losses(model, *render(example, encode, 128))
        per_char = [summed[i].item() / len(example["endings"][i]) for i in range(4)]
        label = min(range(4), key=per_char.__getitem__)
        disagree += int(label != int(mean.argmin()))
        labelled.append(dict(example, label=label))
    assert disagree  # the two normalisations choose differently on this set
    scores = evaluate_hellaswag(model, labelled, encode, 128, "cpu", batch_tokens=512)
    assert scores["hellaswag_acc_norm"] == 1.0 and scores["hellaswag_acc_per_token"] < 1.0


def varied_examples(context_words=(5, 20, 45, 70, 100, 160), seed=0):
    """Examples of many lengths: rows of under 64 tokens, of 64-128, and longer than a 128-token window."""
    words = "the a man woman dog runs jumps into water slowly then picks up ball and throws it far away".split()
    rng = torch.Generator().manual_seed(seed)

    def text(count):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (count,), generator=rng))

    return [{"ctx": text(n), "endings": [text(int(torch.randint(1, 12, (1,), generator=rng))) for _ in range(4)],
             "label": 0} for n in context_words]


def test_batched_scores_equal_the_per_example_ones():
    """Labels set to the per-example reference's choice: the batched scorer must agree on every example, for
    the summed (acc) and the mean (acc_per_token) loss alike, in batches of several lengths with filler rows."""
    model, examples = tiny_model(128), varied_examples()
    reference = [ending_losses(model, *render(example, encode, 128)) for example in examples]  # (summed, mean)
    longest = [len(encode(e["ctx"])) + max(len(encode(" " + x)) for x in e["endings"]) for e in examples]
    assert min(longest) <= 64 < sorted(longest)[len(longest) // 2] <= 128 < max(longest)  # 64, 128, truncated
    for which, key in ((0, "hellaswag_acc"), (1, "hellaswag_acc_per_token")):
        labelled = [dict(e, label=int(losses[which].argmin())) for e, losses in zip(examples, reference)]
        for batch_tokens in (512, 1024):  # 1-4 examples a batch, the last of a length with fewer
            scores = evaluate_hellaswag(model, labelled, encode, 128, "cpu", batch_tokens=batch_tokens)
            assert scores[key] == 1.0 and scores["hellaswag_examples"] == len(examples), batch_tokens


def test_render_masks_only_the_ending():
    tokens, mask = render(EXAMPLES[0], encode, 64)
    context = encode(EXAMPLES[0]["ctx"])
    for i, ending in enumerate(EXAMPLES[0]["endings"]):
        ending_tokens = encode(" " + ending)
        assert tokens[i, : len(context)].tolist() == context
        assert tokens[i][mask[i].bool()].tolist() == ending_tokens


def test_rank_split_covers_every_example_once(tmp_path):
    examples = load_examples(write_examples(tmp_path / "hs.jsonl"))
    model = tiny_model()
    whole = evaluate_hellaswag(model, examples, encode, 64, "cpu")
    parts = [evaluate_hellaswag(model, examples, encode, 64, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert sum(p["hellaswag_examples"] for p in parts) == 3
    correct = sum(p["hellaswag_acc_norm"] * p["hellaswag_examples"] for p in parts)
    assert correct == pytest.approx(whole["hellaswag_acc_norm"] * 3)


def test_unreachable_download_fails_fast_with_advice(tmp_path):
    start = time.time()
    with pytest.raises(HellaSwagError, match="Download hellaswag_val.jsonl by hand"):
        fetch_hellaswag(str(tmp_path / "hs.jsonl"), url="http://127.0.0.1:9/hellaswag_val.jsonl", timeout=5)
    assert time.time() - start < 10


@pytest.mark.slow  # starts a Python process that imports torch: about 4 s each on the 2-core box
def test_eval_script_on_a_checkpoint(tmp_path):
    model = tiny_model()
    torch.save({"model": model.state_dict(), "config": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
                                                        "vocab_size": 50304, "tie_embeddings": True}},
               tmp_path / "ckpt.pt")
    result = run_python(["scripts/eval.py", str(tmp_path / "ckpt.pt"), "--device=cpu",
                         f"--hellaswag_path={write_examples(tmp_path / 'hs.jsonl')}"])
    assert result.returncode == 0, result.stderr
    assert "acc_norm" in result.stdout and "examples 3" in result.stdout


def serve(body):
    """A tiny HTTP server on 127.0.0.1 that answers every GET with body; (server, the paths requested)."""
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requested


@pytest.mark.slow
def test_torchrun_downloads_hellaswag_once_and_every_rank_scores_it(tmp_path):
    """The file absent under 2-process torchrun: one download, no temporary file left, and the scores of
    a single process over all examples (so rank 1 scored its share of the same examples)."""
    model = tiny_model()
    keys = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "vocab_size": 50304, "tie_embeddings": True}
    torch.save({"model": model.state_dict(), "config": keys}, tmp_path / "ckpt.pt")
    write_examples(tmp_path / "source.jsonl")
    body = (tmp_path / "source.jsonl").read_bytes()
    path = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    server, requested = serve(body)
    try:
        result = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/eval.py",
                             str(tmp_path / "ckpt.pt"), "--device=cpu", f"--hellaswag_path={path}",
                             f"--hellaswag_url=http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl"],
                            env={"OMP_NUM_THREADS": "1"})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert requested == ["/hellaswag_val.jsonl"]
    assert path.read_bytes() == body and os.listdir(path.parent) == [path.name]
    expected = evaluate_hellaswag(model, EXAMPLES, encode, 64, "cpu")
    assert (f"acc {expected['hellaswag_acc']:.4f} | acc_norm {expected['hellaswag_acc_norm']:.4f} | acc_per_token "
            f"{expected['hellaswag_acc_per_token']:.4f} | examples 3" in result.stdout), result.stdout


def test_training_logs_hellaswag_at_each_evaluation(token_dir, tmp_path):
    import train
    from tests.conftest import FULL_VOCAB, read_metrics, tiny_args

    out = str(tmp_path / "run")
    train.main(tiny_args(token_dir, out, FULL_VOCAB, "--hellaswag", f"--hellaswag_path={write_examples(tmp_path / 'hs.jsonl')}",
                         "--max_steps=2"))
    scores = [m for m in read_metrics(out) if "hellaswag_acc_norm" in m]
    assert [m["step"] for m in scores] == [0, 2] and all(m["hellaswag_examples"] == 3 for m in scores)


@pytest.mark.slow
def test_hellaswag_leaves_the_compiled_training_graph_static(token_dir, tmp_path, monkeypatch):
    """HellaSwag at step 0, then training with --compile: every graph dynamo makes has static shapes, the
    training forward's included. (HellaSwag's (rows, length) differ from the val batches': through the
    compiled model they would make dynamo mark batch and sequence dynamic, and the training graph compiled
    after them would be dynamic for the whole run.) A recording backend stands in for inductor: it sees the
    graphs, without minutes of C++ compilation."""
    import functools

    import train
    from tests.conftest import FULL_VOCAB, tiny_args

    graphs = []  # (grad enabled: the training forward, any symbolic size among the graph's inputs)

    def recording_backend(graph_module, example_inputs):
        sizes = [size for x in example_inputs for size in (x.shape if isinstance(x, torch.Tensor) else [x])]
        graphs.append((torch.is_grad_enabled(), any(isinstance(size, torch.SymInt) for size in sizes)))
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    torch._dynamo.reset()  # no cached graphs or dynamic sizes from an earlier test in this process
    try:
        train.main(tiny_args(token_dir, str(tmp_path / "run"), FULL_VOCAB, "--compile", "--max_steps=1", "--hellaswag",
                             f"--hellaswag_path={write_examples(tmp_path / 'hs.jsonl')}"))
    finally:
        torch._dynamo.reset()
    assert any(training for training, _ in graphs) and not any(symbolic for _, symbolic in graphs), graphs
