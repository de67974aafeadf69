# GPT-2 124M on FineWeb-Edu 10B: the build-nanogpt reproduction (GPT-3 paper appendix hyperparameters).
# hardware: 8x A100/H100 80GB (one GPU works too: grad accumulation keeps the 2**19-token batch).
# data: python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
# time: about 1.5-2 hours on 8x A100 per build-nanogpt; expected val loss near 3.0-3.1 after 10B tokens.
# run: torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304
data_dir = "data/fineweb10B"
batch_size = 64
total_batch_size = 2**19
max_steps = 19073
warmup_steps = 715
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 250
eval_iters = 20
compile = True
hellaswag = True
out_dir = "out/gpt2_124m"
