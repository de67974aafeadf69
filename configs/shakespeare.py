# quickstart: a small GPT on the bundled Shakespeare corpus, on a laptop CPU.
# hardware: 2 CPU cores are enough. data: make data (tokenizes data/shakespeare into data/shakespeare_tokens).
# run: make train   (or: python train.py configs/shakespeare.py)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
data_dir = "data/shakespeare_tokens"
batch_size = 16
total_batch_size = 2048
max_steps = 200
warmup_steps = 20
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 50
eval_iters = 10
sample_prompt = "ROMEO:"
sample_tokens = 48
out_dir = "out/shakespeare"
wandb_mode = "disabled"
checkpoint_interval = 50
