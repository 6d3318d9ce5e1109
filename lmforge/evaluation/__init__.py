"""Measuring models.

perplexity.py  loss, perplexity and bits per byte (validation windows, any text)
seq2seq.py     teacher-forced loss, exact match, BLEU and chrF of decoded outputs
plot.py        `lmforge plot`: metrics.jsonl curves of one or several runs
chat.py        held-out chat replies: exact match against the expected reply (`lmforge eval CHAT_RUN --demo`)
harness.py     lm-evaluation-harness adapter (`lmforge eval --tasks`, the harness's `lmforge` model)
"""
