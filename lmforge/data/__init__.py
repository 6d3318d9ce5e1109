"""Where text comes from and how it becomes tokens.

corpus.py     DATA -> documents (`Corpus`): files, directories, globs, JSONL, Parquet, the default corpus, hf: datasets
hf_dataset.py Hugging Face datasets: save_to_disk folders, Hub streams (retried after network errors)
tokenizer.py  byte-level BPE (Hugging Face `tokenizers`), streaming decode that never splits a character
shards.py     the llm.c shard format and `TokenData`, the random-window batch loader
prepare.py    corpus -> tokenizer + train/val shards (`prepare`, and `ensure_data` with its cache)
pairs.py      (source, target) pairs for seq2seq: files, built-in demos, tokenising, batches
chat.py       chat templates: the run's Jinja template or the plain one, messages -> prompt text
"""
