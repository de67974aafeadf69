"""HellaSwag: pick, for each context, the ending the model finds most likely.

    acc      the ending with the lowest summed token loss
    acc_norm the ending with the lowest mean token loss (the number GPT-2 reproductions report)

Only the ending's tokens are scored, after the context. Examples are split across ranks (example i on
rank i % world_size) and the counts all-reduced. Examples are sorted by length and scored many to a
forward, each batch padded to a multiple of 64 tokens with a fixed number of rows per length, so a
torch.compile'd model sees a handful of shapes. Logits are turned into losses only where an ending is
scored, and the counts stay on the device until the end: no host sync per example.
evaluate_hellaswag_per_example is the plain one-example-a-forward version the batched one must match.
"""

import json
import os
import urllib.request
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


class HellaSwagError(Exception):
    """The val set is missing and cannot be fetched, or is malformed."""


def fetch_hellaswag(path, url=HELLASWAG_URL, timeout=30):
    """The path of the HellaSwag val jsonl, downloading it there first if it is missing (into a temporary file
    of this process's own, renamed into place: a reader never sees half a file)."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise HellaSwagError(f"could not download HellaSwag from {url} ({e}). Download hellaswag_val.jsonl "
                             f"by hand to {path}, or turn it off with --hellaswag=false.") from None
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_hellaswag(path, url=HELLASWAG_URL):
    """The examples on every rank: rank 0 reads the file (downloading it once if missing) and broadcasts
    them, so one download serves the job and no other rank or node needs the file."""
    distributed = dist.is_available() and dist.is_initialized()
    box = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            box = [load_examples(fetch_hellaswag(path, url))]
        except HellaSwagError as e:
            box = [str(e)]  # sent as a message: every rank raises it, none waits for examples
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise HellaSwagError(box[0])
    return box[0]


def load_examples(path):
    examples = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                example = json.loads(line)
                if not {"ctx", "endings", "label"} <= set(example) or len(example["endings"]) != 4:
                    raise HellaSwagError(f"{path} line {number}: expected keys ctx, endings (4) and label.")
                examples.append(example)
    return examples


def render_rows(example, encode, length):
    """The 4 rows of token ids (context + ending, left-truncated to length) and each one's ending length."""
    context = encode(example["ctx"])
    rows, n_endings = [], []
    for ending in example["endings"]:
        ending_tokens = encode(" " + ending)
        row = (context + ending_tokens)[-length:]
        rows.append(row)
        n_endings.append(min(len(ending_tokens), len(row)))
    return rows, n_endings


def fill(tokens, mask, rows, n_endings):
    """Write rows into the top-left of tokens and their endings' places into mask (both (4+, L+))."""
    for i, (row, n_ending) in enumerate(zip(rows, n_endings)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - n_ending: len(row)] = 1


def render(example, encode, length):
    """(tokens, mask) of shape (4, length): context + ending, mask 1 on the ending's tokens, left-truncated."""
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    fill(tokens, mask, *render_rows(example, encode, length))
    return tokens, mask


@torch.no_grad()
def ending_losses(model, tokens, mask):
    """Summed and mean token loss of each ending (rows of tokens, scored where mask is 1)."""
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4, L-1)
    scored = mask[:, 1:].float()
    summed = (losses * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


def reduce_scores(counts):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    total = max(counts[2].item(), 1)
    return {"hellaswag_acc": counts[0].item() / total, "hellaswag_acc_norm": counts[1].item() / total,
            "hellaswag_examples": int(counts[2].item())}


def evaluate_hellaswag_per_example(model, examples, encode, length, device, rank=0, world_size=1,
                                   autocast=nullcontext):
    """The reference: each example alone, padded to `length` (slow: for tests and scripts/bench_hellaswag.py)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct (sum), correct (mean), examples
    was_training = model.training
    model.eval()
    for example in examples[rank::world_size]:
        tokens, mask = render(example, encode, length)
        with autocast():
            summed, mean = ending_losses(model, tokens.to(device), mask.to(device))
        label = int(example["label"])
        counts += torch.tensor([int(summed.argmin()) == label, int(mean.argmin()) == label, 1],
                               dtype=torch.float64, device=device)
    model.train(was_training)
    return reduce_scores(counts)


def batches(examples, encode, length, batch_tokens):
    """(tokens (R, L), flat positions whose next token is scored, their rows, labels, real examples) per
    forward, shortest first.

    L is the longest row of the batch rounded up to 64 (at most `length`); R = 4 * max(1, batch_tokens //
    (4 * L)) rows, the last batch of a length filled with empty rows."""
    rendered = [render_rows(example, encode, length) for example in examples]
    used = [min(length, -(-max(len(row) for row in rows) // 64) * 64) for rows, _ in rendered]
    order = sorted(range(len(examples)), key=used.__getitem__)
    start = 0
    while start < len(order):
        L = used[order[start]]
        per_batch = max(1, batch_tokens // (4 * L))
        chosen = [i for i in order[start: start + per_batch] if used[i] == L]
        start += len(chosen)
        tokens = torch.zeros((4 * per_batch, L), dtype=torch.long)
        mask = torch.zeros((4 * per_batch, L), dtype=torch.bool)
        for k, i in enumerate(chosen):
            fill(tokens[4 * k: 4 * k + 4], mask[4 * k: 4 * k + 4], *rendered[i])
        rows, columns = mask[:, 1:].nonzero().unbind(1)  # position (row, c) predicts the token at c + 1
        labels = torch.full((per_batch,), -1, dtype=torch.long)
        labels[: len(chosen)] = torch.tensor([int(examples[i]["label"]) for i in chosen])
        yield tokens, rows * L + columns, rows, labels, len(chosen)


@torch.no_grad()
def evaluate_hellaswag(model, examples, encode, length, device, rank=0, world_size=1, autocast=nullcontext,
                       batch_tokens=8192):
    """{'hellaswag_acc', 'hellaswag_acc_norm', 'hellaswag_examples'} over all examples, all ranks together.

    batch_tokens bounds a forward's rows * length (its logits are batch_tokens * vocab_size)."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct (sum), correct (mean), examples
    was_training = model.training
    model.eval()
    for tokens, positions, rows, labels, real in batches(examples[rank::world_size], encode, length, batch_tokens):
        tokens, positions, rows, labels = (t.to(device, non_blocking=True) for t in (tokens, positions, rows, labels))
        with autocast():
            logits, _ = model(tokens)  # (R, L, V)
        # the loss of the scored positions only: the same per-token cross-entropy as the full (R, L-1, V) one
        logits = logits.view(-1, logits.size(-1)).index_select(0, positions).float()
        losses = F.cross_entropy(logits, tokens.view(-1).index_select(0, positions + 1), reduction="none")
        summed = torch.zeros(tokens.size(0), dtype=losses.dtype, device=device).index_add_(0, rows, losses)
        scored = torch.zeros(tokens.size(0), dtype=losses.dtype, device=device).index_add_(
            0, rows, torch.ones_like(losses))
        mean = summed / scored.clamp(min=1)  # empty filler rows: 0, never counted below
        correct_sum = (summed.view(-1, 4).argmin(dim=1) == labels).sum()
        correct_mean = (mean.view(-1, 4).argmin(dim=1) == labels).sum()
        counts += torch.stack([correct_sum, correct_mean, torch.tensor(real, device=device)]).double()
    model.train(was_training)
    return reduce_scores(counts)
