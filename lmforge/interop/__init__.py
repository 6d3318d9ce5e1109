"""Moving models between lmforge and other tools.

hf.py  Hugging Face folders (GPT-2, Llama, Mixtral) to run directories and back
"""
