"""HellaSwag: pick, for each context, the ending the model finds most likely.

    acc            the ending with the lowest summed token loss
    acc_norm       the lowest summed loss per character of the ending: lm-evaluation-harness's acc_norm
                   (its loglikelihood / len(choice), the ending's text without the space before it)
    acc_per_token  the lowest mean token loss: what build-nanogpt and GPT-2 reproductions call acc_norm

Only the ending's tokens are scored, after the context. Examples are split across ranks (example i on
rank i % world_size) and the counts all-reduced. Every rank runs the same number of forwards (a sharded
model's forward is a collective, the weight all-gather): a rank with fewer batches runs empty ones that
count nothing. Examples are sorted by length and scored many to a forward, each batch padded to a
multiple of 64 tokens. Scoring runs compiled code eagerly (blocks compiled in place under fsdp) and
train.py passes the uncompiled model: these varied shapes would make torch.compile mark batch and
sequence dynamic, in the training graph too. Logits are turned into losses
only where an ending is scored, and the counts stay on the device until the end: no host sync per batch.
evaluate_hellaswag_per_example is the plain one-example-a-forward version the batched one must match.
"""

import json
import os
import urllib.request
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt2_pretrain.atomic import atomic_write
from gpt2_pretrain.compiling import eagerly

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


class HellaSwagError(Exception):
    """The val set is missing and cannot be fetched, or is malformed."""


def fetch_hellaswag(path, url=HELLASWAG_URL, timeout=30):
    """The path of the HellaSwag val jsonl, downloading it there first if it is missing (written atomically:
    a reader never sees half a file)."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise HellaSwagError(f"could not download HellaSwag from {url} ({e}). Download hellaswag_val.jsonl "
                             f"by hand to {path}, or turn it off with --hellaswag=false.") from None
    atomic_write(path, lambda f: f.write(data))
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
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    example = json.loads(line)
                except ValueError as e:  # not JSON, or not UTF-8
                    raise HellaSwagError(f"{path} line {number} is not JSON ({e}): give the official "
                                         f"hellaswag_val.jsonl, one JSON example a line.") from None
                if not isinstance(example, dict) or not {"ctx", "endings", "label"} <= set(example) or \
                        len(example["endings"]) != 4:
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


def ending_chars(example):
    """The character length of each ending, lm-eval's normaliser (len of the choice, without the delimiter)."""
    return [len(ending) for ending in example["endings"]]


@torch.no_grad()
def ending_losses(model, tokens, mask):
    """Summed and mean token loss of each ending (rows of tokens, scored where mask is 1)."""
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4, L-1)
    scored = mask[:, 1:].float()
    summed = (losses * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


def distributed():
    return dist.is_available() and dist.is_initialized()


def reduce_scores(counts):
    if distributed():
        dist.all_reduce(counts)
    correct_sum, correct_per_char, correct_mean, examples = counts.tolist()
    total = max(examples, 1)
    return {"hellaswag_acc": correct_sum / total, "hellaswag_acc_norm": correct_per_char / total,
            "hellaswag_acc_per_token": correct_mean / total, "hellaswag_examples": int(examples)}


def most_over_ranks(number, device):
    """The largest of every rank's number (the number itself in one process)."""
    if not distributed():
        return number
    box = torch.tensor([number], dtype=torch.long, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def evaluate_hellaswag_per_example(model, examples, encode, length, device, rank=0, world_size=1,
                                   autocast=nullcontext):
    """The reference: each example alone, padded to `length` (slow: for tests and scripts/bench_hellaswag.py)."""
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct (sum, per char, mean), examples
    was_training = model.training
    model.eval()
    for example in examples[rank::world_size]:
        tokens, mask = render(example, encode, length)
        with autocast():
            summed, mean = ending_losses(model, tokens.to(device), mask.to(device))
        label = int(example["label"])
        per_char = summed / torch.tensor(ending_chars(example), dtype=summed.dtype, device=device)
        counts += torch.tensor([int(summed.argmin()) == label, int(per_char.argmin()) == label,
                                int(mean.argmin()) == label, 1], dtype=torch.float64, device=device)
    model.train(was_training)
    return reduce_scores(counts)


def batches(examples, encode, length, batch_tokens):
    """(tokens (R, L), flat positions whose next token is scored, their rows, each row's ending length in
    characters (R,), labels (R / 4,)) per forward, shortest first.

    L is the longest row of the batch rounded up to 64 (at most `length`); R = 4 * the batch's examples, at
    most 4 * max(1, batch_tokens // (4 * L))."""
    rendered = [render_rows(example, encode, length) for example in examples]
    used = [min(length, -(-max(len(row) for row in rows) // 64) * 64) for rows, _ in rendered]
    order = sorted(range(len(examples)), key=used.__getitem__)
    start = 0
    while start < len(order):
        L = used[order[start]]
        per_batch = max(1, batch_tokens // (4 * L))
        chosen = [i for i in order[start: start + per_batch] if used[i] == L]
        start += len(chosen)
        tokens = torch.zeros((4 * len(chosen), L), dtype=torch.long)
        mask = torch.zeros((4 * len(chosen), L), dtype=torch.bool)
        for k, i in enumerate(chosen):
            fill(tokens[4 * k: 4 * k + 4], mask[4 * k: 4 * k + 4], *rendered[i])
        rows, columns = mask[:, 1:].nonzero().unbind(1)  # position (row, c) predicts the token at c + 1
        labels = torch.tensor([int(examples[i]["label"]) for i in chosen])
        chars = torch.tensor([n for i in chosen for n in ending_chars(examples[i])], dtype=torch.float64)
        yield tokens, rows * L + columns, rows, chars, labels


@eagerly
@torch.no_grad()
def evaluate_hellaswag(model, examples, encode, length, device, rank=0, world_size=1, autocast=nullcontext,
                       batch_tokens=8192):
    """{'hellaswag_acc', 'hellaswag_acc_norm', 'hellaswag_acc_per_token', 'hellaswag_examples'} over all
    examples, all ranks together.

    batch_tokens bounds a forward's rows * length (its logits are batch_tokens * vocab_size)."""
    plan = list(batches(examples[rank::world_size], encode, length, batch_tokens))
    forwards = most_over_ranks(len(plan), device)  # the one host sync before the end
    correct = torch.zeros(3, dtype=torch.float64, device=device)  # correct (sum, per char, mean)
    was_training = model.training
    model.eval()
    for tokens, positions, rows, chars, labels in plan:
        tokens, positions, rows, chars, labels = (t.to(device, non_blocking=True)
                                                  for t in (tokens, positions, rows, chars, labels))
        with autocast():
            logits, _ = model(tokens)  # (R, L, V)
        # the loss of the scored positions only: the same per-token cross-entropy as the full (R, L-1, V) one
        logits = logits.view(-1, logits.size(-1)).index_select(0, positions).float()
        losses = F.cross_entropy(logits, tokens.view(-1).index_select(0, positions + 1), reduction="none")
        summed = torch.zeros(tokens.size(0), dtype=losses.dtype, device=device).index_add_(0, rows, losses)
        scored = torch.zeros(tokens.size(0), dtype=losses.dtype, device=device).index_add_(
            0, rows, torch.ones_like(losses))
        mean = summed / scored.clamp(min=1)  # a row whose only ending token is its first: none scored
        correct_sum = (summed.view(-1, 4).argmin(dim=1) == labels).sum()
        correct_per_char = ((summed.double() / chars).view(-1, 4).argmin(dim=1) == labels).sum()
        correct_mean = (mean.view(-1, 4).argmin(dim=1) == labels).sum()
        correct += torch.stack([correct_sum, correct_per_char, correct_mean]).double()
    for _ in range(forwards - len(plan)):  # the other ranks' collectives, on a one-token row that counts nothing
        with autocast():
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)
    examples_here = sum(len(labels) for *_, labels in plan)
    return reduce_scores(torch.cat([correct, torch.tensor([examples_here], dtype=torch.float64, device=device)]))
