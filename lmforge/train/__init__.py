"""Training: the loop and what it needs.

loop.py         `train()`: start, then step / log / evaluate / checkpoint until the budget is spent; `train_step`
state.py        the run state (step, tokens, clock, budget, data RNG), metrics.jsonl, the stop flag
tasks.py        the `Task` protocol a run trains on: `LMTask` (token shards), `Seq2SeqTask` (pairs)
optim.py        AdamW and Muon parameter groups, the learning-rate schedule
distributed.py  torchrun process groups and `Parallel`: one process, DDP or FSDP2 behind one interface
precision.py    device choice, autocast, FLOPs per token, peak FLOP/s and MFU
checkpoint.py   crash-safe checkpoints: write, verify, keep, resume
bench.py        `lmforge bench`: matmul peak and training throughput against a reference
"""
