"""Training: the loop and what it needs.

loop.py         `train()`: start, then step / log / evaluate / checkpoint until the budget is spent
tasks.py        the `Task` a run trains on: `LMTask` (token shards), `Seq2SeqTask` (pairs)
optim.py        AdamW and Muon parameter groups, the learning-rate schedule
distributed.py  torchrun process groups and the DDP / FSDP2 wrapper
precision.py    device choice, autocast, FLOPs per token, peak FLOP/s and MFU
checkpoint.py   crash-safe checkpoints: write, verify, keep, resume
bench.py        `lmforge bench`: matmul peak and training throughput against a reference
"""
