# GPT-2 124M's shape, tokens and steps with the modern recipe: rotary, QK-norm, relu^2, RMSNorm, untied head,
# zero-init projections, logit soft-cap 15 (--architecture=modern), Muon for the blocks' matrices, and a
# warmup-stable-decay schedule (docs/modern.md). Compare it with configs/gpt2_124m.py, the same data and budget.
# hardware: 8x A100/H100 80GB (one GPU works too: grad accumulation keeps the 2**19-token batch).
# data: python data/prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
# expected: not measured at this size. Measured only on a 4-layer, 128-wide byte-level model on CPU, 150 steps
#   (docs/modern.md): this recipe reached the GPT-2 recipe's (gpt2_124m.py's) final val loss in 0.186 +- 0.007 of
#   its steps (3 seeds, each recipe at its own swept lr); whether 124M on FineWeb-Edu gains as much is open.
# run: torchrun --standalone --nproc_per_node=8 train.py configs/modern_124m.py
architecture = "modern"
optimizer = "muon"
lr_schedule = "wsd"
warmdown_frac = 0.2
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
learning_rate = 6e-4  # with muon: the biases' AdamW lr (the blocks' matrices: matrix_lr, the embeddings: embedding_lr)
min_lr = 6e-5  # every group decays to a tenth of its lr, as in the CPU comparison
matrix_lr = 0.02
eval_interval = 250
eval_iters = 20
compile = True
hellaswag = True
out_dir = "out/modern_124m"
