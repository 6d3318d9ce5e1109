"""Benchmark evaluation with lm-evaluation-harness (`lm-eval`): an adapter for lmforge models, and `run_tasks`.

The harness asks a model three kinds of question; `LmforgeLM` answers each from the model's own
fp32 log-probabilities:

    loglikelihood(context, continuation)   log P(continuation | context), summed over its tokens, and
                                           whether every continuation token is the greedy (argmax) one
    loglikelihood_rolling(text)            log P(text) for texts of any length: windows of the context
                                           size, each predicting only tokens no earlier window scored
                                           (the harness's own window plan), each token once
    generate_until(context, gen_kwargs)    text from lmforge's batched engine, cut at a stop string

Scoring (`score_continuations`): pairs are sorted longest first and batched, right-padded; one
forward per batch; log-softmax in float32; a continuation's log-probability is the sum, over its
tokens t_i, of log p(t_i | everything before it). A pair longer than the context keeps its last
block_size + 1 tokens (the harness's convention). The result is exactly what the model computes:
tests compare it with a direct, one-pair-at-a-time computation.

Chat options (`apply_chat_template`, `fewshot_as_multiturn`, `system_instruction`): the harness hands the
adapter each prompt as a list of messages and sends back the text it gets, as the context of its
requests. `apply_chat_template` renders that text with the run's own chat template (the plain one for a
run without) through `chat.encode_rendered`, the rendering fine-tuning trains on and the server uses,
and remembers the token ids of the rendered prompt up to its last control token. A context that begins
with exactly such a rendering is encoded as those ids followed by the rest as text, so the model sees
the control tokens by id, as in training, while text that did not come from the template (a document
holding "<|user|>") stays text.

Registration: importing this module registers the adapter as `lmforge` in the harness's model
registry, so `lm_eval.simple_evaluate(model="lmforge", model_args="run=RUN", ...)` works; the
package also declares an `lm_eval.models` entry point for harness versions that discover plugins;
and `python -m lmforge.evaluation.harness ARGS` runs the harness's own command line with the
adapter registered (`--model lmforge --model_args run=RUN`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.chat import ChatTemplateError, encode_rendered, load_chat_template, special_tokens
from ..errors import LmforgeError

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LmforgeError("benchmark evaluation needs lm-eval: pip install 'lmforge[eval]'") from None


# --- scoring ----------------------------------------------------------------------------------------


@torch.no_grad()
def score_continuations(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | preceding tokens), all greedy?) for each (context ids, continuation ids).

    Contexts must be non-empty and continuations non-empty. The last block_size + 1 tokens of each
    pair are used (input = all but the last token). Returns natural-log probabilities, float32 math.
    """
    limit = model.config.block_size
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows, n_cont = [], []
        for i in idx:
            context, continuation = pairs[i]
            if not context or not continuation:
                raise ValueError("score_continuations needs a non-empty context and continuation")
            tokens = (context + continuation)[-(limit + 1) :]
            rows.append(tokens[:-1])  # inputs; position p predicts tokens[p + 1]
            n_cont.append(min(len(continuation), len(tokens) - 1))
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # (B, T) right-padded
        logprobs = F.log_softmax(model(x).float(), dim=-1)  # (B, T, vocab)
        for row, (i, r, n) in enumerate(zip(idx, rows, n_cont)):
            continuation = torch.tensor(pairs[i][1][-n:], device=device)
            lp = logprobs[row, len(r) - n : len(r)]  # (n, vocab): the predictions of the continuation tokens
            total = lp.gather(-1, continuation[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == continuation).all())
            results[i] = (total, greedy)
    return results


def rolling_windows(tokens: list[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together score every token of `tokens` once (the harness's plan)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(tokens, prefix_token=prefix_id, max_seq_len=max_len, context_len=1)
    return [make_disjoint_window(w) for w in windows]


# --- the adapter ------------------------------------------------------------------------------------


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """lm-evaluation-harness model for an lmforge run (`run=DIR`) or an already loaded (model, tokenizer).

    model_args: run, device (default cpu), batch_size (default 16), max_gen_toks (default 256). A loaded model
    takes its chat template as `template` (Jinja source; None: the plain one); a run uses its own.
    """

    def __init__(
        self,
        run: str | None = None,
        model=None,
        tokenizer=None,
        device: str = "cpu",
        batch_size: int | str = 16,
        max_gen_toks: int | str = 256,
        template: str | None = None,
        **unused,
    ):
        super().__init__()
        if model is None:
            if run is None:
                raise LmforgeError("the lmforge harness model needs run=RUN_DIR")
            from ..runs import load

            model, tokenizer = load(run, device=device)
            template = load_chat_template(run)
        if not hasattr(model.config, "block_size"):
            raise LmforgeError("benchmark tasks need a decoder-only language model, not a seq2seq run")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.run = str(run) if run is not None else None
        self.template = template
        self._rendered: dict[str, list[int]] = {}  # rendered chat prompt up to its last control token -> its ids
        specials = special_tokens(tokenizer)
        self._control = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) or "(?!)")

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    # --- chat -------------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and template for the harness's request cache: the run's name and a template hash."""
        digest = hashlib.sha256((self.template or "lmforge-plain").encode()).hexdigest()[:12]
        return f"lmforge-{Path(self.run).name if self.run else 'model'}-{digest}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's chat template (Jinja source; "" for the plain template of a run without one), None if off."""
        return (self.template or "") if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The harness's messages as prompt text, rendered with the run's template (see the module docstring).

        add_generation_prompt False (a task's `gen_prefix`): the last message is the start of the assistant's
        reply, and the prompt ends where its text ends, for the model to continue it. Raises LmforgeError when
        the template refuses the messages."""
        messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        enc = encode_rendered(messages, self.template, self.tok, add_generation_prompt)
        end = len(enc.text)
        if not add_generation_prompt:  # continue the final message: cut after its text
            last = [b for _, b, k in enc.spans or [] if k == len(messages) - 1]
            if messages[-1]["role"] != "assistant" or not last:
                raise ChatTemplateError("chat template: cannot continue the final message (it must be the assistant's)")
            end = last[-1]
        text = enc.text[:end]
        head = None  # (tokens, characters) up to the template's last control token before `end`
        for k, (token_id, start) in enumerate(zip(enc.ids, enc.starts)):
            m = self._control.match(text, start)
            if m is not None and self.tok.hf.token_to_id(m.group()) == token_id:
                head = (k + 1, m.end())
        if head is not None:  # remembered for tok_encode; what follows it is text
            self._rendered[text[: head[1]]] = enc.ids[: head[0]]
        return text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text is text (lmforge adds no special tokens), except the start of a context that apply_chat_template
        rendered: that part gets the ids the template's rendering has (control tokens by id)."""
        if self._rendered:
            for m in reversed(list(self._control.finditer(string))):  # where a remembered rendering could end
                head = self._rendered.get(string[: m.end()])
                if head is not None:
                    return head + self.tok.encode(string[m.end() :])
        return self.tok.encode(string)

    def tok_decode(self, tokens: Iterable[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_request, pairs = [], []
        for (text,) in (r.args for r in requests):
            windows = rolling_windows(self.tok.encode(text), self.eot_token_id, self.max_length)
            per_request.append(len(windows))
            pairs += windows
        scores = score_continuations(self.model, pairs, self.batch_size)
        out, i = [], 0
        for r, n in zip(requests, per_request):
            total = sum(s for s, _ in scores[i : i + n])
            i += n
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..inference.engine import generate_batch
        from ..inference.sampling import SamplingParams

        prompts, params = [], []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=[s for s in until if s]))
        completions = generate_batch(self.model, self.tok, prompts, params, max_batch=self.batch_size)
        out = []
        for r, c in zip(requests, completions):
            self.cache_hook.add_partial("generate_until", r.args, c.text)
            out.append(c.text)
        return out

    def get_model_info(self) -> dict:
        return {"model_run": self.run, "model_params": sum(p.numel() for p in self.model.parameters())}


# --- running tasks ----------------------------------------------------------------------------------


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """A TaskManager that knows `tasks`: the --include-path folder alone when it holds all of them (indexing the
    harness's own ~15,000 task files takes tens of seconds), else everything. Unknown names: LmforgeError."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise LmforgeError(f"--include-path {include_path} is not a directory")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LmforgeError(
            f"unknown task {', '.join(unknown)} (not among lm-eval's tasks"
            + (f" or those in {include_path})" if include_path else "; a local task needs --include-path DIR)")
        )
    return manager


_NETWORK_MODULES = ("datasets", "huggingface_hub", "requests", "urllib3", "fsspec", "aiohttp")


def _is_network_error(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, ConnectionError) or type(e).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        e = e.__cause__ or e.__context__
    return False


def evaluate(
    lm,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    seed: int = 1234,
    manager=None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
) -> dict:
    """Run harness tasks on an lm-eval model (an LmforgeLM, or any model the harness has: pass its LM object).

    limit: at most this many documents per task (a fraction: that share). apply_chat_template: prompts as
    conversations in the model's chat template; fewshot_as_multiturn (None: as apply_chat_template): few-shot
    examples as earlier user/assistant turns rather than one user message; system_instruction: a system message
    to open every prompt. Returns the harness's results dict. Raises LmforgeError for an unknown task, or a task
    whose dataset cannot be fetched (offline): the message says where the data must come from."""
    manager = manager or task_manager(tasks, include_path)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the harness's notes on task defaults, not results
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=False,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn,
            system_instruction=system_instruction,
        )
    except Exception as e:
        if _is_network_error(e):
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmforgeError(
                f"task {', '.join(tasks)} needs a dataset that could not be fetched ({reason[:200]}); run once with "
                "network access (the harness caches it) or write a local task (YAML + JSONL) and pass --include-path"
            ) from None
        raise


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def save_results(run_dir: str | Path, tasks: list[str], results: dict) -> Path:
    """Write the full results JSON into RUN/eval/ (one file per evaluation); returns its path."""
    from lm_eval.utils import handle_non_serializable

    from ..io import write_text_atomic
    from ..runs import EVAL_DIR

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "_".join(t.replace("/", "-") for t in tasks)[:80]
    path = Path(run_dir) / EVAL_DIR / f"{stamp}_{name}.json"
    write_text_atomic(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return path


def run_tasks(
    run_dir: str | Path,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    **chat_options,
) -> tuple[dict, Path]:
    """`lmforge eval RUN --tasks ...`: evaluate the run, save the results JSON in RUN/eval/; (results, path).

    chat_options: apply_chat_template, fewshot_as_multiturn, system_instruction, as `evaluate` takes them."""
    manager = task_manager(tasks, include_path)  # a bad task name fails before the model loads
    lm = LmforgeLM(run=str(run_dir), device=device, batch_size=batch_size)
    results = evaluate(lm, tasks, limit, num_fewshot, include_path, manager=manager, **chat_options)
    return results, save_results(run_dir, tasks, results)


def main(argv: list[str] | None = None) -> None:
    """The harness's own command line with the `lmforge` model registered: python -m lmforge.evaluation.harness ..."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
