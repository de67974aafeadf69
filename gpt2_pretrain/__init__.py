"""Everything train.py wires together, one concern a module:

    distributed.py   process group setup/teardown, rank helpers, print0
    parallel.py      ddp or fsdp wrapping, gradient sync, global-norm clipping
    muon.py          ShardedMuon: torch.optim.Muon for fsdp's sharded matrices
    guards.py        SIGTERM/SIGINT stop, the non-finite guard and its update skip
    errors.py        the one `error:` line, the device check, the out_dir lock
    atomic.py        the one atomic write and fsync every file goes through
    checkpoint/      checkpointer.py (the run's saves and resume), files.py (reading, listing, checking),
                     sharded.py (fsdp checkpoints with torch.distributed.checkpoint)
    logging.py       the step line, metrics.jsonl, W&B, the run summary
    flops.py         FLOPs per token, device peaks, MFU
    dry_run.py       what a config implies: memory, FLOPs, time (--dry_run)
    hellaswag.py     HellaSwag scoring
    hf_interop.py    Hugging Face GPT-2 folders: export, import, tokenizer files
    fused_loss.py    lm_head + cross-entropy without the full logits (model.py's loss)
    allocator.py     glibc malloc settings that keep a CPU step's big blocks on the heap
"""
