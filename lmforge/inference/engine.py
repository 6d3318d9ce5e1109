"""Generation: sampling, and a batched decoding engine over a static KV cache.

The `Engine` keeps up to `max_batch` sequences ("rows") in one preallocated cache. Prompts that
arrive together are left-padded to one length and prefilled in one forward pass; after that every
decode step feeds one token per row, whatever each row's length. Rows finish on their own (end of
text, a stop string, their token limit) and new ones join between steps, which is what the HTTP
server's dynamic batching is built on. Per step, the only device->host transfer is the sampled ids
(plus log-probabilities when a request asks for them). New text is the UTF-8 decoding of the new
tokens' bytes (`Tokenizer.token_bytes`), a character at a time; ids past the tokenizer's vocabulary
(the model's is rounded up) are never sampled.

    generate / generate_stream / generate_tokens   one prompt (the CLI, the training samples)
    generate_batch                                 many prompts at once
    Engine                                         add(), step(), cancel(): the loop the server drives
"""

from __future__ import annotations

import codecs
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import LmforgeError
from .sampling import SamplingParams, apply_penalties, sample_next_token


def context_limit(model) -> int:
    """Longest sequence (prompt + new tokens) the model was built to attend over."""
    return model.config.block_size


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, (id, log-probability), best first


@dataclass
class Output:
    """What one row produced in one call of Engine.add/step."""

    request_id: object
    text: str  # new text (held back while it could still be the start of a stop string)
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" (end of text or a stop string), "length", "cancelled"; None = running


@dataclass
class Completion:
    """A finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: object = None


class _Row:
    """Host-side state of one sequence in the engine."""

    def __init__(self, req: Request, tokenizer, max_new: int):
        self.req = req
        self.params = req.params
        self.max_new = max_new
        self.tokens: list[int] = []
        self.decoder = _text_decoder(tokenizer) if tokenizer is not None else None
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.rng = random.Random(self.params.seed) if self.params.seed is not None else random.Random()
        self.pending_logprobs: list[TokenLogprob] = []
        self.new_tokens: list[int] = []


class _BytesDecoder:
    """Token ids in, text out: the UTF-8 decoding of the tokens' bytes, holding back an unfinished character.

    Text is exactly what the bytes say (`Tokenizer.token_bytes`), so a completion's text is its tokens'
    joined bytes decoded (invalid sequences become U+FFFD as bytes.decode(errors="replace") does), and a
    SentencePiece-style first token keeps its space after the prompt.
    """

    def __init__(self, tokenizer):
        self.token_bytes = tokenizer.token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def _text_decoder(tokenizer):
    """The bytes decoder when the tokenizer can say each token's bytes, else its own stream decoder."""
    return _BytesDecoder(tokenizer) if hasattr(tokenizer, "token_bytes") else tokenizer.stream_decoder()


class Engine:
    """Batched decoding: up to max_batch rows in one static KV cache; rows join and leave between steps.

    Active rows always occupy cache rows 0..n-1 (a finished row's place is taken by the last one),
    so a step runs on a contiguous slice of the cache whatever the batch size.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        max_batch: int = 8,
        max_len: int | None = None,
        eos_id: int | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.limit = context_limit(model)
        self.max_len = min(max_len or self.limit, self.limit)
        self.max_batch = max_batch
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        self.cache = model.new_cache(max_batch, self.max_len)
        self.device = self.cache.k[0].device
        self.vocab = model.config.vocab_size
        # ids past the tokenizer's vocabulary (the model's is rounded up to a multiple of 64) are never text
        self.n_tokens = min(self.vocab, tokenizer.vocab_size) if tokenizer is not None else self.vocab
        self.rows: list[_Row] = []
        self._padding_ids = torch.arange(self.n_tokens, self.vocab, device=self.device)
        self.next_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)  # the token each row feeds next
        # per-row sampling settings, on the device, in the rows' order
        self._settings = {
            name: torch.zeros(max_batch, device=self.device, dtype=torch.long if name == "top_k" else torch.float32)
            for name in (
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition_penalty",
                "frequency_penalty",
                "presence_penalty",
            )
        }
        self._counts: torch.Tensor | None = (
            None  # (max_batch, vocab) occurrences in each row's output, once any row has penalties
        )
        self._seen: torch.Tensor | None = None  # (max_batch, vocab) tokens in each row's prompt or output
        # torch.compile'd decode step: fixed shapes (every cache row, the whole cache length), compiled on first use
        self._compiled = None
        self._view = None  # (n, next_ids[:n], cache.rows(0, n)) of the last decode step
        if compile:
            self.cache.static = True
            if self.device.type == "cpu":
                import torch._inductor.config as inductor_config

                # weights become constants, prepacked for oneDNN (what lmforge.inference.quantize does by hand)
                inductor_config.freezing = True
            self._compiled = torch.compile(model, dynamic=False)

    # --- admission ------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def room(self, prompt_len: int) -> int:
        """How many new tokens a prompt of this length can get (position limit and cache size)."""
        by_pos = self.limit - prompt_len
        return by_pos if self.cache.ring else min(by_pos, self.max_len - prompt_len)

    def fits_together(self, reqs: list[Request]) -> bool:
        """Whether these requests can be prefilled as one left-padded group without cutting anyone short."""
        if self.cache.ring:
            return True
        width = max(len(r.prompt_ids) for r in reqs)
        return all(width + min(r.params.max_new_tokens, self.room(len(r.prompt_ids))) <= self.max_len for r in reqs)

    @torch.inference_mode()
    def add(self, reqs: list[Request]) -> list[Output]:
        """Prefill requests as one left-padded batch into free rows; return each one's first token."""
        if not reqs:
            return []
        if len(reqs) > self.free:
            raise LmforgeError(f"{len(reqs)} requests but only {self.free} free rows")
        rows = []
        for r in reqs:
            r.params.validate()
            if not r.prompt_ids:
                raise LmforgeError("empty prompt")
            if any(not 0 <= i < self.vocab for i in r.prompt_ids):
                raise LmforgeError(f"prompt token ids must be in [0, {self.vocab})")
            room = self.room(len(r.prompt_ids))
            if room < 1:
                raise LmforgeError(
                    f"prompt of {len(r.prompt_ids)} tokens leaves no room in the context window ({self.limit})"
                )
            rows.append(_Row(r, self.tokenizer, min(r.params.max_new_tokens, room)))
        width = max(len(r.prompt_ids) for r in reqs)
        if not self.cache.ring and any(width + row.max_new > self.max_len for row in rows):
            raise LmforgeError("requests do not fit the cache together; add them separately")
        lo, hi = len(self.rows), len(self.rows) + len(rows)
        self.rows.extend(rows)
        self._set_settings(lo, rows)
        pad = self.eos_id if self.eos_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=self.device)
        view = self.cache.rows(lo, hi)
        view.lengths.zero_()
        view.start.copy_(torch.tensor([width - len(r.prompt_ids) for r in reqs]))
        try:
            logits = self.model(ids, view, last_only=True)[:, -1]
        except BaseException:
            del self.rows[lo:]
            raise
        return self._sample_and_emit(logits, lo, hi)

    def _set_settings(self, lo: int, rows: list[_Row]):
        hi = lo + len(rows)
        for name, t in self._settings.items():
            vals = [getattr(r.params, name) for r in rows]
            vals = [{"top_k": 0, "top_p": 1.0, "min_p": 0.0}.get(name, 0) if v is None else v for v in vals]
            t[lo:hi] = torch.tensor(vals, dtype=t.dtype)
        if any(r.params.penalised for r in rows) and self._counts is None:
            self._counts = torch.zeros(self.max_batch, self.vocab, device=self.device)
            self._seen = torch.zeros(self.max_batch, self.vocab, dtype=torch.bool, device=self.device)
        if self._counts is not None:
            self._counts[lo:hi] = 0
            self._seen[lo:hi] = False
            for i, r in enumerate(rows):
                self._seen[lo + i, torch.tensor(r.req.prompt_ids, device=self.device)] = True

    # --- decoding -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One decode step for every active row."""
        n = len(self.rows)
        if n == 0:
            return []
        if self._compiled is not None:  # every row, so shapes never change; idle rows restart at 0 and never fill up
            self.cache.lengths[n:] = 0
            self.cache.start[n:] = 0
            logits = self._compiled(self.next_ids, self.cache)[:n, -1]
        else:
            if self._view is None or self._view[0] != n:  # rows 0..n-1, kept while their number holds
                self._view = (n, self.next_ids[:n], self.cache.rows(0, n))
            _, ids, cache = self._view
            logits = self.model(ids, cache)[:, -1]
        return self._sample_and_emit(logits, 0, n)

    def _sample_and_emit(self, logits: torch.Tensor, lo: int, hi: int) -> list[Output]:
        rows = self.rows[lo:hi]
        if self.n_tokens < self.vocab:  # never sample (or list in logprobs) an id the tokenizer cannot decode
            logits = logits.float().index_fill(-1, self._padding_ids, float("-inf"))
        raw = logits
        penalised = self._counts is not None and any(r.params.penalised for r in rows)
        greedy = all(r.params.temperature == 0 for r in rows)
        s = {name: t[lo:hi] for name, t in self._settings.items()} if penalised or not greedy else {}
        if penalised:
            logits = apply_penalties(
                logits,
                self._counts[lo:hi],
                self._seen[lo:hi],
                s["repetition_penalty"],
                s["frequency_penalty"],
                s["presence_penalty"],
            )
        if greedy:
            ids = logits.argmax(-1)
        else:
            uniform = torch.tensor([r.rng.random() for r in rows])
            ids = sample_next_token(
                logits,
                s["temperature"],
                s["top_k"] if any(r.params.top_k for r in rows) else None,
                s["top_p"] if any(r.params.top_p not in (None, 1) for r in rows) else None,
                min_p=s["min_p"] if any(r.params.min_p for r in rows) else None,
                uniform=uniform,
            )
        self.next_ids[lo:hi, 0] = ids
        if self._counts is not None:
            self._counts[lo:hi].scatter_add_(1, ids[:, None], torch.ones_like(ids[:, None], dtype=self._counts.dtype))
            self._seen[lo:hi].scatter_(1, ids[:, None], True)
        want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        lp_host = None
        if want:
            lp = torch.log_softmax(raw.float(), dim=-1)
            chosen = lp.gather(-1, ids[:, None])[:, 0]
            top = lp.topk(max(1, max(want)), dim=-1)
            lp_host = (chosen.tolist(), top.values.tolist(), top.indices.tolist())
        host_ids = ids.tolist()  # the one device->host transfer of the step
        for i, (row, tok) in enumerate(zip(rows, host_ids)):
            lp_entry = None
            if lp_host is not None and row.params.logprobs is not None:
                n_top = row.params.logprobs
                lp_entry = TokenLogprob(tok, lp_host[0][i], list(zip(lp_host[2][i][:n_top], lp_host[1][i][:n_top])))
            self._accept(row, tok, lp_entry)
        outputs = [self._output(r) for r in rows]
        self._drop_finished()
        return outputs

    def _accept(self, row: _Row, tok: int, lp_entry: TokenLogprob | None):
        p = row.params
        if tok == self.eos_id and not p.ignore_eos:
            self._finish(row, "stop")
            return
        row.tokens.append(tok)
        row.new_tokens.append(tok)
        if lp_entry is not None:
            row.pending_logprobs.append(lp_entry)
        if row.decoder is not None:
            before = len(row.text)
            row.text += row.decoder.push(tok)
            if p.stop and self._cut_at_stop(row, before):
                self._finish(row, "stop", flush=False)
                return
        if len(row.tokens) >= row.max_new:
            self._finish(row, "length")

    def _cut_at_stop(self, row: _Row, before: int) -> bool:
        longest = max(len(s) for s in row.params.stop)
        lo = max(0, before - longest + 1)
        hits = [i for i in (row.text.find(s, lo) for s in row.params.stop) if i >= 0]
        if hits:
            row.text = row.text[: min(hits)]
            row.sent = min(row.sent, len(row.text))
            return True
        return False

    def _finish(self, row: _Row, reason: str, flush: bool = True):
        if flush and row.decoder is not None:
            before = len(row.text)
            row.text += row.decoder.flush()
            if row.params.stop and self._cut_at_stop(row, before):
                reason = "stop"
        row.finish_reason = reason

    def _output(self, row: _Row) -> Output:
        end = len(row.text) if row.finish_reason else len(row.text) - _stop_prefix_len(row.text, row.params.stop)
        out = Output(
            row.req.request_id, row.text[row.sent : end], row.new_tokens, row.pending_logprobs, row.finish_reason
        )
        row.sent = max(row.sent, end)
        row.new_tokens, row.pending_logprobs = [], []
        return out

    def cancel(self, request_id) -> bool:
        """Stop a running request now; its row is free for the next one."""
        found = False
        for row in self.rows:
            if row.req.request_id == request_id and row.finish_reason is None:
                row.finish_reason = "cancelled"
                found = True
        self._drop_finished()
        return found

    def _drop_finished(self):
        """Free the rows of finished sequences, moving the last active row into each gap."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].finish_reason is None:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self.cache.move_row(last, i)
                self.next_ids[i] = self.next_ids[last]
                for t in self._settings.values():
                    t[i] = t[last]
                if self._counts is not None:
                    self._counts[i] = self._counts[last]
                    self._seen[i] = self._seen[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()

    # --- driving it -----------------------------------------------------------------------------

    def run(self, reqs: Iterable[Request]) -> Iterator[Output]:
        """Generate for all requests, admitting them in order as rows free up; yields every Output."""
        queue = list(reqs)
        while queue or self.rows:
            group = []
            while queue and len(group) < self.free and self.fits_together(group + [queue[0]]):
                group.append(queue.pop(0))
            if group:
                yield from self.add(group)
            elif not self.rows:
                raise RuntimeError("engine has no free rows and nothing running")
            yield from self.step()


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], n_top: int = 0) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before it (None for the first, which has no context),
    with the n_top most likely tokens at each position: one forward pass, log-softmax in float32.
    ids: at most the model's context (block_size) tokens."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    lp = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # (T-1, vocab): position t predicts ids[t + 1]
    target = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(-1, target[:, None])[:, 0].tolist()
    top = lp.topk(max(1, n_top), dim=-1) if len(ids) > 1 else None
    out: list[TokenLogprob | None] = [None]
    for t in range(len(ids) - 1):
        pairs = list(zip(top.indices[t, :n_top].tolist(), top.values[t, :n_top].tolist())) if n_top else []
        out.append(TokenLogprob(ids[t + 1], chosen[t], pairs))
    return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is the beginning of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _params(max_new_tokens, temperature, top_k, top_p, seed, **extra) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **extra
    ).validate()


def generate_batch(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    params: SamplingParams | list[SamplingParams] | None = None,
    max_batch: int = 64,
    compile: bool = False,
) -> list[Completion]:
    """Complete many prompts (texts or token id lists) together; one Completion per prompt, in order.

    A Completion's text is the new text only (not the prompt), as generate_stream yields it.
    """
    if not prompts:
        return []
    params = params if params is not None else SamplingParams()
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise LmforgeError(f"{len(prompts)} prompts but {len(plist)} sampling settings")
    ids = [p if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
    ids = [p if p else [tokenizer.eos_id] for p in ids]
    limit = context_limit(model)
    for p in ids:
        if len(p) >= limit:
            raise LmforgeError(f"prompt of {len(p)} tokens does not fit the context window ({limit})")
    reqs = [Request(p, sp, i) for i, (p, sp) in enumerate(zip(ids, plist))]
    batch = min(max_batch, len(reqs))
    width = max(len(p) for p in ids)
    engine = Engine(
        model,
        tokenizer,
        max_batch=batch,
        max_len=min(limit, width + max(sp.max_new_tokens for sp in plist)),
        compile=compile,
    )
    results = [Completion("", [], "", len(p)) for p in ids]
    for out in engine.run(reqs):
        c = results[out.request_id]
        c.text += out.text
        c.token_ids += out.token_ids
        c.logprobs += out.logprobs
        if out.finish_reason:
            c.finish_reason = out.finish_reason
    return results


def generate_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    **extra,
) -> Iterator[int]:
    """Yield new token ids one at a time (stops at eos_id, which is not yielded)."""
    if not prompt_ids:
        raise LmforgeError("empty prompt")
    limit = context_limit(model)
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    if max_new_tokens <= 0:
        return
    engine = Engine(model, None, max_batch=1, max_len=len(prompt_ids) + max_new_tokens, eos_id=eos_id)
    for out in engine.run(
        [Request(list(prompt_ids), _params(max_new_tokens, temperature, top_k, top_p, seed, **extra))]
    ):
        yield from out.token_ids


def truncate_prompt(ids: list[int], model, max_new_tokens: int, warn: bool = True) -> list[int]:
    """Keep the end of a prompt that would not fit the context window with room for new tokens."""
    limit = context_limit(model)
    room = max(1, limit - max(1, min(max_new_tokens, limit // 2)))
    if len(ids) > room:
        if warn:
            print(
                f"warning: prompt of {len(ids)} tokens is longer than the context allows; "
                f"keeping its last {room} tokens",
                file=sys.stderr,
            )
        ids = ids[-room:]
    return ids


def generate_stream(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    warn: bool = True,
    compile: bool = False,
    **extra,
) -> Iterator[str]:
    """Yield the new text (not the prompt) in pieces as it is generated, never splitting a character.

    compile: torch.compile the decode step (the cache then spans the whole context, so every
    prompt reuses one compiled step). extra: the other SamplingParams fields (min_p,
    repetition_penalty, frequency_penalty, presence_penalty, stop, ignore_eos).
    """
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a fresh document
    ids = truncate_prompt(ids, model, max_new_tokens, warn)
    params = _params(min(max_new_tokens, context_limit(model) - len(ids)), temperature, top_k, top_p, seed, **extra)
    engine = Engine(
        model, tokenizer, max_batch=1, max_len=None if compile else len(ids) + params.max_new_tokens, compile=compile
    )
    for out in engine.run([Request(ids, params)]):
        if out.text:
            yield out.text


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    **extra,
) -> str:
    """The prompt followed by its generated continuation, as text (prompt + completion).

    Unlike generate_stream and generate_batch, which give only the new text, the result starts
    with the prompt, so it reads as the whole passage (kept so since the first release).
    """
    return prompt + "".join(
        generate_stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, **extra)
    )
