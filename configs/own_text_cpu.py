# your own text: a small GPT on a folder of your .txt files (one document per file), on a laptop CPU, offline.
# hardware: 2 CPU cores are enough. data: python data/prepare.py --source my_texts/ --out data/my_texts_tokens
# run: python train.py configs/own_text_cpu.py --data_dir=data/my_texts_tokens   (the README's "Your own text")
# time: the quickstart's model, batch and 200 steps (configs/shakespeare.py: 3 min 6 s on 2 quiet cores).
# expected: data/shakespeare as my_texts, prepared with --val_tokens 1e5 as make data does, is the quickstart
# run (val loss 10.83 -> 5.87 at step 200; its step-0 val loss checked here: 10.8292, see docs/own_text_cpu.md);
# on other text the curve depends on its size and kind, and train.py warns when 200 steps repeat it.
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
data_dir = "data/my_texts_tokens"
batch_size = 16
total_batch_size = 2048
max_steps = 200
warmup_steps = 20
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 50
eval_iters = 10
sample_prompt = ""  # empty: the samples start from a newline
sample_tokens = 48
out_dir = "out/my_texts"
wandb_mode = "disabled"
checkpoint_interval = 50
