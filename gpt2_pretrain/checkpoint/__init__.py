"""Checkpoints: checkpointer.py saves and resumes a run, files.py reads, lists and checks checkpoint files,
sharded.py writes and reads fsdp checkpoints with torch.distributed.checkpoint (each rank its shards)."""
