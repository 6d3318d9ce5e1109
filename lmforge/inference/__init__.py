"""Inference: turning a trained model into text.

sampling.py   `SamplingParams`, next-token sampling (temperature, top-k/p, min-p), repetition penalties
engine.py     the batched decoding `Engine` over a static KV cache; `generate`, `generate_stream`, `generate_batch`
beam.py       encoder-decoder decoding: greedy, beam search, `translate`
quantize.py   CPU inference weights: oneDNN-packed fp32, bf16, int8
server.py     the OpenAI-compatible HTTP server: the decode thread, request queue, routes
openai_api.py the OpenAI wire format: request bodies -> SamplingParams, outputs -> choices, chunks, logprobs
"""
