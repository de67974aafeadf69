# GPT-2 XL (1.5B parameters) on FineWeb-Edu 10B, sharded with FSDP2 (--parallel=fsdp).
# hardware: 8x 80 GB GPUs (A100/H100), one node or several. --dry_run counts 48 GiB per GPU at batch_size 16
# under fsdp (weights, gradients and AdamW state 2.9 GiB of it; 23 GiB under ddp), most of it activations;
# 63 GiB with its margin. --activation_checkpointing=selective or full fits larger batches (docs/distributed.md).
# data: python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
# time: not measured here; --dry_run says about 8 h on 8x H100 at 45% MFU (1e20 FLOPs).
# lr: the GPT-3 paper's 1.3B model (2e-4, cosine to 10%). HellaSwag at each evaluation, as for 124M (the val
# set is downloaded once to data/hellaswag); a checkpoint is scored alone with scripts/eval.py.
# run: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_xl_fsdp.py
n_layer = 48
n_head = 25
n_embd = 1600
block_size = 1024
vocab_size = 50304
data_dir = "data/fineweb10B"
parallel = "fsdp"
batch_size = 16
total_batch_size = 2**19
max_steps = 19073
warmup_steps = 715
learning_rate = 2e-4
min_lr = 2e-5
weight_decay = 0.1
eval_interval = 250
eval_iters = 20
compile = True
hellaswag = True
out_dir = "out/gpt2_xl"
