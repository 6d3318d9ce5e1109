"""lm-evaluation-harness adapter: exact log-likelihoods, local tasks offline, the same score through several routes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from conftest import run_cli, structured_text  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.evaluation import harness  # noqa: E402
from lmforge.inference.engine import generate  # noqa: E402
from lmforge.runs import load  # noqa: E402

TASKS = Path(__file__).parent / "harness_tasks"  # lmforge_toy (multiple choice), _ppl (rolling), _gen (generation)


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def direct_logprob(model, context_ids, continuation_ids):
    """Sum of log p(continuation | context) from one full forward of this one pair: the reference."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    n = len(continuation_ids)
    return logprobs[-n:].gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return load(tiny_run)


def test_loglikelihood_equals_direct_computation(tiny):
    model, tok = tiny
    lm = harness.LmforgeLM(model=model, tokenizer=tok, batch_size=4)
    pairs = [
        ("1: the cat", " sees the moon."),
        ("2: a dog likes", " a red box."),
        ("3:", " the robot draws an old map.\n4: my friend finds the river."),
        ("", "5: the bird follows a tree."),  # empty context: conditioned on end-of-text, as the harness does
        ("6: a child sees the ball.\n" * 3, "7: the cat"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):
        # the harness's convention: trailing whitespace of the context belongs to the continuation
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped) :] + continuation
        whole = tok.encode(context + continuation)
        ctx_ids = tok.encode(context) if context else [tok.eos_id]
        cont_ids = whole[len(tok.encode(context)) :] if context else tok.encode(continuation)
        assert logprob == pytest.approx(direct_logprob(model, ctx_ids, cont_ids), abs=1e-5)
    # batching and padding change nothing
    one_by_one = harness.LmforgeLM(model=model, tokenizer=tok, batch_size=1).loglikelihood(
        requests("loglikelihood", pairs)
    )
    assert [s for s, _ in got] == pytest.approx([s for s, _ in one_by_one], abs=1e-5)
    # "greedy" is true exactly when the continuation is the model's argmax continuation
    context = tok.encode("8: the robot")
    greedy_ids = tok.encode(generate(model, tok, "8: the robot", 6, temperature=0.0))[len(context) :]
    [(_, is_greedy)] = lm.loglikelihood(requests("loglikelihood", [("8: the robot", tok.decode(greedy_ids))]))
    assert is_greedy
    assert not got[2][1]


def test_rolling_loglikelihood_scores_every_token_once(tiny):
    model, tok = tiny
    text = structured_text(40, seed=3)
    ids = tok.encode(text)
    T = model.config.block_size
    assert len(ids) > 3 * T
    lm = harness.LmforgeLM(model=model, tokenizer=tok)
    [got] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    # reference: consecutive chunks of T tokens, the first conditioned on end-of-text; the last, shorter chunk
    # is conditioned on as many earlier tokens as fit one window of T inputs
    want = direct_logprob(model, [tok.eos_id], ids[:T])
    for start in range(T, len(ids), T):
        end = min(start + T, len(ids))
        want += direct_logprob(model, ids[end - T - 1 : start], ids[start:end])
    assert got == pytest.approx(want, rel=1e-6, abs=1e-4)


def test_generate_until_is_greedy_generation_cut_at_stop(tiny):
    model, tok = tiny
    lm = harness.LmforgeLM(model=model, tokenizer=tok, batch_size=3)
    contexts = ["1: the cat", "2: a dog likes the", "3: my friend"]
    got = lm.generate_until(requests("generate_until", [(c, {"until": ["\n"], "max_gen_toks": 10}) for c in contexts]))
    for context, text in zip(contexts, got):
        want = generate(model, tok, context, 10, temperature=0.0, stop=["\n"])[len(context) :]
        assert text == want and "\n" not in text


def _copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return dest


def test_cli_tasks_print_table_and_save_json(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    code, out, err = run_cli(
        capsys, "eval", run, "--tasks", "lmforge_toy,lmforge_toy_ppl,lmforge_toy_gen", "--include-path", TASKS,
        "--limit", 12, "--batch-size", 8,
    )  # fmt: skip
    assert code == 0, err
    assert "lmforge_toy" in out and "acc" in out and "bits_per_byte" in out and "exact_match" in out
    (path,) = (run / "eval").glob("*.json")
    results = json.loads(path.read_text())["results"]
    assert 0 <= results["lmforge_toy"]["acc,none"] <= 1 and results["lmforge_toy_ppl"]["bits_per_byte,none"] > 0
    assert f"full results: {path}" in out


def _accuracy(results):
    return results["results"]["lmforge_toy"]["acc,none"]


def test_same_accuracy_natively_through_registry_and_hf_export(tiny_run, tmp_path, small_tokenizer):
    """Native adapter, the harness's own model lookup (`lmforge` by name), and the Hugging Face export with the
    harness's `hf` model agree; a model with other weights gets another score (the right model is evaluated)."""
    from lm_eval.models.huggingface import HFLM

    from lmforge.interop.hf import to_hf

    manager = harness.task_manager(["lmforge_toy"], TASKS)
    native = _accuracy(harness.evaluate(harness.LmforgeLM(run=str(tiny_run)), ["lmforge_toy"], manager=manager))
    by_name = _accuracy(
        harness.lm_eval.simple_evaluate(
            model="lmforge", model_args=f"run={tiny_run}", tasks=["lmforge_toy"], task_manager=manager
        )
    )
    hf_dir = to_hf(tiny_run, tmp_path / "hf")
    via_hf = _accuracy(
        harness.evaluate(HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8), ["lmforge_toy"], manager=manager)
    )
    assert native == by_name == via_hf
    assert native > 0.8  # a trained model tells the grammar's sentences from scrambled ones

    model, tok = load(tiny_run)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    other = _accuracy(harness.evaluate(harness.LmforgeLM(model=model, tokenizer=tok), ["lmforge_toy"], manager=manager))
    assert other != native


def test_bad_tasks_give_one_clear_line(tiny_run, tmp_path, capsys):
    # a task whose data lives on the Hugging Face Hub, offline (conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: lmforge-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "hub_task", "--include-path", tmp_path)
    assert code == 1 and "could not be fetched" in err and "--include-path" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "lmforge_toy", "--data", "x.txt")
    assert code == 1 and "takes no --data" in err


def test_missing_lm_eval_is_one_clear_line(monkeypatch, tiny_run, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "lmforge.evaluation.harness")
    monkeypatch.delattr(sys.modules["lmforge.evaluation"], "harness")
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "lmforge_toy")
    assert code == 1 and "pip install 'lmforge[eval]'" in err
    with pytest.raises(LmforgeError, match="needs lm-eval"):
        import lmforge.evaluation.harness  # noqa: F401


@pytest.mark.slow
def test_unknown_task_is_one_clear_line(tiny_run, capsys):
    """Slow: telling an unknown name from the harness's own ~15,000 tasks means indexing all of them."""
    code, _, err = run_cli(capsys, "eval", tiny_run, "--tasks", "no_such_task_xyz", "--include-path", TASKS)
    assert code == 1 and "unknown task no_such_task_xyz" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_lm_eval_command_line_with_lmforge_model(tiny_run, tmp_path):
    """The harness's own CLI (python -m lmforge.evaluation.harness = lm_eval with `lmforge` registered)."""
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.evaluation.harness", "run", "--model", "lmforge", "--model_args",
         f"run={tiny_run}", "--tasks", "lmforge_toy", "--include_path", str(TASKS)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lmforge_toy" in out.stdout and "acc" in out.stdout


@pytest.fixture(scope="module")
def chat_model(tiny_run):
    """tiny_run with lmforge's default chat template: its role markers added as special tokens, the model grown."""
    import dataclasses

    from lmforge.config import round_up
    from lmforge.data.chat_data import DEFAULT_TEMPLATE, add_template_tokens
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.models import build_model
    from lmforge.runs import load_config
    from lmforge.train.tasks import load_base_weights

    tok = Tokenizer.from_file(tiny_run / "tokenizer.json")
    base_tokens = tok.vocab_size
    assert add_template_tokens(tok, DEFAULT_TEMPLATE)
    model = build_model(dataclasses.replace(load_config(tiny_run).model, vocab_size=round_up(tok.vocab_size)))
    load_base_weights(model, tiny_run, base_tokens, tok.vocab_size)
    return model.eval(), tok, DEFAULT_TEMPLATE


def test_chat_template_prompts_are_what_fine_tuning_trains_on(chat_model, monkeypatch):
    """With the harness's chat options (apply_chat_template, few-shot examples as turns, a system instruction), every
    prompt the model is given is the token sequence fine-tuning renders for the same messages: control tokens by id,
    the scored answer where the assistant's reply goes, its end of turn next."""
    from lmforge.data.chat_data import ROLE_TOKENS, encode_conversation, encode_prompt
    from lmforge.inference import engine

    model, tok, template = chat_model
    lm = harness.LmforgeLM(model=model, tokenizer=tok, template=template, batch_size=4)
    rendered = {}  # the text apply_chat_template returned -> the messages the harness gave it
    apply = lm.apply_chat_template

    def spy(history, add_generation_prompt=True):
        text = apply(history, add_generation_prompt)
        rendered[text] = [dict(m) for m in history]
        return text

    scored, contexts, prompts = [], [], []
    score = lm._loglikelihood_tokens
    until = lm.generate_until
    batch = engine.generate_batch
    monkeypatch.setattr(lm, "apply_chat_template", spy)
    monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda reqs, **kw: (scored.extend(reqs), score(reqs, **kw))[1])
    monkeypatch.setattr(
        lm, "generate_until", lambda reqs, **kw: (contexts.extend(r.args[0] for r in reqs), until(reqs))[1]
    )
    monkeypatch.setattr(
        engine, "generate_batch", lambda m, t, p, *a, **kw: (prompts.extend(p), batch(m, t, p, *a, **kw))[1]
    )
    results = harness.evaluate(
        lm, ["lmforge_toy", "lmforge_toy_gen"], limit=3, num_fewshot=1, include_path=TASKS,
        apply_chat_template=True, system_instruction="Answer briefly.",
    )  # fmt: skip
    assert 0 <= results["results"]["lmforge_toy"]["acc,none"] <= 1
    markers = {tok.hf.token_to_id(t) for t in ROLE_TOKENS}
    assert len(scored) == 9 and len(prompts) == len(contexts) == 3
    for (context, continuation), ctx_ids, cont_ids in scored:
        (prompt_text,) = [t for t in rendered if t.rstrip() == context.rstrip()]  # (the harness may move the "\n")
        messages = rendered[prompt_text]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # one shot, as a turn
        assert messages[0]["content"] == "Answer briefly."
        reply = (context + continuation)[len(prompt_text) :]
        ids, trained = encode_conversation(messages + [{"role": "assistant", "content": reply}], template, tok)
        assert ctx_ids + cont_ids == ids[:-1] and ids[-1] == tok.eos_id  # the answer, then the end of the turn
        assert sum(i in markers for i in ctx_ids) == 5 and all(trained[len(ctx_ids) + 1 :])
    for context, ids in zip(contexts, prompts):
        assert ids == encode_prompt(rendered[context], template, tok)
        assert sum(i in markers for i in ids) == 5


def test_chat_template_prompts_keep_message_text_as_text(chat_model):
    from lmforge.data.chat_data import encode_conversation, encode_prompt

    model, tok, template = chat_model
    lm = harness.LmforgeLM(model=model, tokenizer=tok, template=template)
    messages = [{"role": "user", "content": "say <|assistant|>\nno<|endoftext|>"}]
    text = lm.apply_chat_template(messages)
    assert lm.tok_encode(text) == encode_prompt(messages, template, tok)
    assert lm.tok_encode(text + " yes") == encode_prompt(messages, template, tok) + tok.encode(" yes")
    assert lm.tok_encode("<|user|>\nhi") == tok.encode("<|user|>\nhi")  # not rendered by the template: text
    # a task's gen_prefix: the prompt continues the assistant's started reply, as training renders that reply
    started = messages + [{"role": "assistant", "content": "Answer:"}]
    text = lm.apply_chat_template(started, add_generation_prompt=False)
    assert text.endswith("<|assistant|>\nAnswer:")
    assert lm.tok_encode(text) == encode_conversation(started, template, tok)[0][:-1]
    assert lm.chat_template(True) == template and lm.chat_template(False) is None and lm.tokenizer_name
