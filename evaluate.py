"""HellaSwag: pick, for each context, the ending the model finds most likely.

    acc      the ending with the lowest summed token loss
    acc_norm the ending with the lowest mean token loss (the number GPT-2 reproductions report)

Only the ending's tokens are scored, after the context. Examples are split across ranks (example i on
rank i % world_size) and the counts all-reduced. Every example is padded to one fixed length, so a
torch.compile'd model never recompiles.
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
    """The path of the HellaSwag val jsonl, downloading it there first if it is missing."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise HellaSwagError(f"could not download HellaSwag from {url} ({e}). Download hellaswag_val.jsonl "
                             f"by hand to {path}, or turn it off with --hellaswag=false.") from None
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


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


def render(example, encode, length):
    """(tokens, mask) of shape (4, length): context + ending, mask 1 on the ending's tokens, left-truncated."""
    context = encode(example["ctx"])
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    for i, ending in enumerate(example["endings"]):
        ending_tokens = encode(" " + ending)
        row = (context + ending_tokens)[-length:]
        n_ending = min(len(ending_tokens), len(row))
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - n_ending: len(row)] = 1
    return tokens, mask


@torch.no_grad()
def ending_losses(model, tokens, mask):
    """Summed and mean token loss of each ending (rows of tokens, scored where mask is 1)."""
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4, L-1)
    scored = mask[:, 1:].float()
    summed = (losses * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


def evaluate_hellaswag(model, examples, encode, length, device, rank=0, world_size=1, autocast=nullcontext):
    """{'hellaswag_acc', 'hellaswag_acc_norm', 'hellaswag_examples'} over all examples, all ranks together."""
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
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    total = max(counts[2].item(), 1)
    return {"hellaswag_acc": counts[0].item() / total, "hellaswag_acc_norm": counts[1].item() / total,
            "hellaswag_examples": int(counts[2].item())}
