"""Moving models between lmforge and other tools.

hf.py    Hugging Face folders (GPT-2, Llama, Mixtral) to run directories and back
gguf.py  GGUF files for llama.cpp / ollama (gpt2, llama, Mixtral-style llama) and back
"""
