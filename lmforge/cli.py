"""The `lmforge` command: one sub-command per verb. Parsing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
from pathlib import Path

from .errors import LmforgeError

# The choices of lmforge.inference.quantize.QUANTIZE, not imported from there: that loads torch.
QUANTIZE = ("none", "bf16", "int8", "int8-dynamic")
BUDGET_KEYS = ("max_steps", "max_tokens", "max_time")
GGUF_DTYPES = ("f32", "f16", "q8_0")  # lmforge.interop.gguf.DTYPES
DATA_HELP = (
    "file, directory or glob of text ('stdlib' = the Python standard library), or a Hugging Face dataset: "
    "hf:NAME[:CONFIG][:SPLIT] (streamed from the Hub) or hf:FOLDER[:SPLIT] (written by save_to_disk)"
)
TEXT_FIELD_HELP = "the .jsonl field, .parquet column or dataset column holding the text (default: text)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge", description="Build, train and run transformer language models from scratch."
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    toksub = tok.add_subparsers(dest="tok_verb", metavar="ACTION")
    tt = toksub.add_parser("train", help="learn BPE merges from text")
    tt.add_argument("data", help=DATA_HELP)
    tt.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--special", action="append", default=[], help="extra special token (repeatable)")
    tt.add_argument(
        "--split-digits", action="store_true", help="every digit a token of its own (numbers spelt digit by digit)"
    )
    tt.add_argument("--out", default="tokenizer.json")

    pr = sub.add_parser("prepare", help="tokenise text into train/val shards")
    pr.add_argument("data", help=DATA_HELP)
    pr.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    pr.add_argument("--tokenizer", required=True, help="tokenizer.json")
    pr.add_argument("--out", required=True, help="output directory for the shards")
    pr.add_argument("--val-fraction", type=float, default=0.01)
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    pr.add_argument(
        "--allow-special",
        action="store_true",
        help='read special-token text in documents ("<|endoftext|>") as control tokens (default: as plain text)',
    )

    tr = sub.add_parser(
        "train",
        help="train a model (no arguments: the tiny preset on the Python standard library)",
        epilog="Any config field can be set as --key value or --section.key=value, e.g. --n_layer 6 --train.lr=1e-3.",
    )
    tr.add_argument(
        "data",
        nargs="?",
        help="text (file, directory, glob, hf:DATASET; column: --text-field) or a directory of prepared shards; "
        "default: the Python standard library. "
        'With --task seq2seq: a .jsonl ({"source": ..., "target": ...} per line) or .tsv file of pairs',
    )
    tr.add_argument(
        "--task",
        choices=("lm", "seq2seq"),
        default=None,
        help="lm: decoder-only language model (default); seq2seq: encoder–decoder on pairs",
    )
    tr.add_argument(
        "--demo",
        metavar="NAME",
        help="seq2seq on a built-in demo task instead of DATA (implies --task seq2seq): "
        "numbers, spell, dates, reverse, sort",
    )
    tr.add_argument("--config", help="TOML (or JSON) file with [model] and [train] tables")
    tr.add_argument(
        "--preset",
        default=None,
        help="named preset (see 'lmforge presets'); default tiny, or seq2seq-tiny for --task seq2seq",
    )
    tr.add_argument("--out", help="run directory (default runs/PRESET, or the next free runs/PRESET-N)")
    tr.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    tr.add_argument("--stop-after-steps", type=int, metavar="N", help="stop at step N as if interrupted (resume later)")
    tr.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameters, per-rank memory, tokens per step and checkpoint sizes; build, read, write nothing",
    )
    tr.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --dry-run: size the run for N processes without launching them (default: torchrun's, or 1)",
    )

    ft = sub.add_parser(
        "finetune",
        help="chat fine-tuning: train a run on conversations into a new run (assistant-only loss, packed)",
        epilog="Any train config field can be set as --key value, e.g. --max-steps 500 --lr 3e-4 --train-on all "
        "--pack false. Defaults: lr 1e-3, batch 16 rows, 2 minutes.",
    )
    ft.add_argument("run", help="the run to start from (an lmforge run, or one imported with convert --from-hf)")
    ft.add_argument(
        "--data", help='conversations: .jsonl ({"messages": [{"role", "content"}, ...]} per line) or .parquet'
    )
    ft.add_argument("--demo", metavar="NAME", help="a built-in generated chat task instead of --data: colors, skills")
    ft.add_argument(
        "--chat-template", metavar="FILE", help="Jinja chat template (default: the run's own, or lmforge's)"
    )
    ft.add_argument(
        "--chat-token",
        action="append",
        metavar="TEXT",
        help="with --chat-template: a marker of the template to make a special token (repeatable; default: the "
        "<|name|>, <name>, [NAME]-shaped text it writes around the messages)",
    )
    ft.add_argument("--config", help="TOML (or JSON) file with a [train] table")
    ft.add_argument("--out", help="the new run directory (default RUN-chat, or the next free RUN-chat-N)")
    ft.add_argument("--stop-after-steps", type=int, metavar="N", help="stop at step N as if interrupted (resume later)")

    ge = sub.add_parser(
        "generate", help="generate text from a trained run (continue a prompt, or map sources to outputs for seq2seq)"
    )
    ge.add_argument("run")
    ge.add_argument("--prompt", help="text to continue; omit for an interactive prompt loop")
    ge.add_argument("--chat", action="store_true", help="an interactive chat in the run's chat template, with history")
    ge.add_argument("--system", help="with --chat: a system message to start the conversation")
    ge.add_argument(
        "--source", help="seq2seq: the input to transform; omit (and --source-file) for an interactive loop"
    )
    ge.add_argument("--source-file", help="seq2seq: a file of inputs, one per line (one output line each)")
    ge.add_argument("--beam-size", type=int, default=4, help="seq2seq: beam search width (1 = greedy)")
    ge.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="seq2seq: hypotheses are ranked by log-probability / length ** this",
    )
    ge.add_argument("--max-new-tokens", type=int, default=None, help="default 200; seq2seq: the model's max_len")
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--top-p", type=float, default=None)
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument(
        "--greedy", action="store_true", help="always take the most likely token (temperature 0; seq2seq: beam size 1)"
    )
    ge.add_argument(
        "--min-p", type=float, default=None, help="drop tokens less likely than MIN_P x the most likely one"
    )
    ge.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already in the prompt or output"
    )
    ge.add_argument("--frequency-penalty", type=float, default=0.0)
    ge.add_argument("--presence-penalty", type=float, default=0.0)
    ge.add_argument(
        "--stop", action="append", default=[], help="stop before this string (repeatable; \\n and \\t are understood)"
    )
    ge.add_argument("--device", default="cpu")
    ge.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="CPU decode weights: fp32 (none), bf16, int8 (weight-only), int8-dynamic",
    )
    ge.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (slow to start; instead of --quantize)"
    )

    se = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API")
    se.add_argument("run")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY, else none)"
    )
    se.add_argument(
        "--model-name", default=None, help="name clients use in 'model' (default: the run directory's name)"
    )
    se.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most")
    se.add_argument("--device", default="cpu")
    se.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="CPU decode weights: fp32 (none), bf16, int8 (weight-only), int8-dynamic",
    )
    se.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (slow to start; instead of --quantize)"
    )

    ev = sub.add_parser(
        "eval",
        help="loss, perplexity, bits per byte and next-token accuracy on some text, or benchmark tasks with "
        "lm-evaluation-harness "
        "(seq2seq: loss, exact match, BLEU, chrF on pairs)",
    )
    ev.add_argument("run")
    ev.add_argument("--data", help="text file, directory, glob or hf:DATASET; seq2seq: a .jsonl or .tsv file of pairs")
    ev.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    ev.add_argument(
        "--tasks", help="lm-evaluation-harness task names, comma-separated (needs lmforge[eval]); results in RUN/eval/"
    )
    ev.add_argument("--limit", type=float, default=None, help="--tasks: at most N documents per task (< 1: a share)")
    ev.add_argument("--num-fewshot", type=int, default=None, help="--tasks: examples in each prompt")
    ev.add_argument("--include-path", default=None, help="--tasks: a folder of your own task YAML files")
    ev.add_argument("--batch-size", type=int, default=16, help="--tasks: sequences scored together")
    ev.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="--tasks: prompts as conversations in the run's chat template (few-shot examples as earlier turns)",
    )
    ev.add_argument(
        "--fewshot-as-multiturn",
        choices=("true", "false"),
        default=None,
        help="--tasks with --apply-chat-template: few-shot examples as earlier turns (default true) or one message",
    )
    ev.add_argument("--system-instruction", default=None, help="--tasks: a system message opening every prompt")
    ev.add_argument(
        "--demo",
        metavar="NAME",
        help="the held-out test split of a built-in demo task (seq2seq runs; chat runs: colors, skills)",
    )
    ev.add_argument("--beam-size", type=int, default=4, help="seq2seq: beam search width (1 = greedy)")
    ev.add_argument("--length-penalty", type=float, default=1.0)
    ev.add_argument("--max-tokens", type=int, default=1_000_000, help="evaluate on at most this many tokens")
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--quantize", choices=QUANTIZE, default=None, help="evaluate the weights as --quantize would serve them"
    )

    sub.add_parser("presets", help="list the named model presets")

    pl = sub.add_parser("plot", help="PNG plots of loss, learning rate, tokens/s and MFU for one or more runs")
    pl.add_argument("runs", nargs="+", help="run directories (several = compared on one plot)")
    pl.add_argument("--out", help="output folder (default RUN/plots for one run, plots/ for several)")

    be = sub.add_parser("bench", help="measure this machine: matmul peak, training throughput vs a reference")
    besub = be.add_subparsers(dest="bench_verb", metavar="WHAT")
    besub.add_parser("matmul", help="peak matmul FLOP/s (fp32, bf16); stored and used for MFU")
    bt = besub.add_parser(
        "train", help="steady-state training tokens/s and MFU, lmforge vs the textbook GPT-2 in benchmarks/"
    )
    bt.add_argument("--preset", default="tiny")
    bt.add_argument("--steps", type=int, default=10)
    bt.add_argument("--rounds", type=int, default=3)
    bt.add_argument("--batch-size", type=int)
    bt.add_argument("--seq-len", type=int)
    bt.add_argument("--compile", action="store_true")
    bt.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="lmforge's precision (default auto)",
    )
    bt.add_argument(
        "--ref-precision",
        default="fp32",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="the reference's (default fp32)",
    )
    bt.add_argument("--device", default="auto")

    cv = sub.add_parser("convert", help="convert between lmforge runs and Hugging Face folders or GGUF files")
    direction = cv.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT-2, Llama or Mixtral folder to import")
    direction.add_argument("--to-hf", metavar="RUN", help="lmforge run directory to export as a Hugging Face folder")
    direction.add_argument("--to-gguf", metavar="RUN", help="lmforge run directory to export as one GGUF file")
    direction.add_argument("--from-gguf", metavar="FILE", help="llama or gpt2 GGUF file to import")
    direction.add_argument(
        "--consolidate",
        metavar="RUN",
        help="write RUN/model.safetensors from RUN's latest checkpoint (a sharded FSDP run's, in one process)",
    )
    cv.add_argument("--out", help="run directory (--from-*), Hugging Face folder (--to-hf) or .gguf file (--to-gguf)")
    cv.add_argument(
        "--dtype",
        choices=GGUF_DTYPES,
        default=None,
        help="--to-gguf: f32, f16 (default; 1-D tensors stay f32) or q8_0 (8-bit blocks, gguf's own quantiser)",
    )
    p.verbs = sub.choices  # verb -> its parser, for "did you mean"
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        if argv and argv[0] in _OWN_OPTIONS and not {"-h", "--help"} & set(argv):
            args, extra = _split_args(parser, argv)
        else:
            args, extra = _parse(parser, argv), []
        if args.verb is None:
            parser.print_help()
            return 2
        return _dispatch(args, extra) or 0
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a path the user gave cannot be read or written: one line, unless it is a bug of ours
        if e.errno not in _USER_ERRNOS or os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"error: {_os_error_line(e)}", file=sys.stderr)
        return 1


# OS errors that come from the user's files, disk or network settings rather than from a bug in lmforge
# (by name: not every platform defines every code).
_USER_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EACCES",
        "EPERM",
        "ENOENT",
        "ENOTDIR",
        "EISDIR",
        "EEXIST",
        "ENOTEMPTY",
        "ENOSPC",
        "EDQUOT",
        "EFBIG",
        "EROFS",
        "ENAMETOOLONG",
        "ELOOP",
        "EIO",
        "EADDRINUSE",
        "EADDRNOTAVAIL",
    )
    if hasattr(errno, name)
}


def _os_error_line(e: OSError) -> str:
    """'Permission denied: runs/x/config.json' (+ a hint for a full disk or a read-only place)."""
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename is not None else ""
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    hint = {
        errno.ENOSPC: " (the disk is full: free some space, then resume)",
        getattr(errno, "EDQUOT", -1): " (disk quota exceeded)",
        errno.EROFS: " (a read-only file system: choose another --out)",
        errno.EADDRINUSE: " (another process listens there: choose another --port)",
    }.get(e.errno, "")
    return f"{what}{where}{hint}"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unknown option gets "did you mean" among the options of its verb."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        verb = parser.verbs.get(getattr(args, "verb", None) or "", parser)
        options = _option_strings(verb)
        flag = next((u for u in unknown if u.startswith("-")), unknown[0]).split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        verb.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every --option of a parser and of its sub-commands (`tokenizer train`)."""
    out = []
    for action in parser._actions:
        out += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _option_strings(sub)
    return out


_OWN_OPTIONS = {
    "train": (
        "--config",
        "--preset",
        "--out",
        "--resume",
        "--stop-after-steps",
        "--task",
        "--demo",
        "--dry-run",
        "--world-size",
    ),
    "finetune": ("--data", "--demo", "--chat-template", "--chat-token", "--config", "--out", "--stop-after-steps"),
}


_FLAGS = ("--dry-run",)  # own options without a value


def _split_args(parser, argv):
    """Separate a verb's own options and its positional argument from the free-form --key value config overrides.

    (argparse cannot do this itself: it would take an override's value for the DATA positional.)
    """
    own, extra, positional = [], [], []
    i = 1
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in _OWN_OPTIONS[argv[0]]:
            take = 1 if "=" in a or name in _FLAGS else 2
            own += argv[i : i + take]
            i += take
        elif a.startswith("--"):
            take = 1 if "=" in a else 2
            extra += argv[i : i + take]
            i += take
        else:
            positional.append(a)
            i += 1
    if len(positional) > 1:
        what = "DATA path" if argv[0] == "train" else "RUN"
        raise LmforgeError(f"{argv[0]} takes one {what}, got {len(positional)}: {' '.join(positional)}")
    return parser.parse_args([argv[0], *own, *positional]), extra


def _dispatch(args, extra):
    if args.verb == "tokenizer":
        return _tokenizer(args)
    if args.verb == "prepare":
        return _prepare(args)
    if args.verb == "train":
        return _train(args, extra)
    if args.verb == "finetune":
        return _finetune(args, extra)
    if args.verb == "generate":
        return _generate(args)
    if args.verb == "eval":
        return _eval(args)
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "presets":
        return _presets()
    if args.verb == "convert":
        return _convert(args)
    if args.verb == "plot":
        return _plot(args)
    if args.verb == "bench":
        return _bench(args)


def _data_spec(s: str | None):
    return None if s in (None, "stdlib") else s


def _tokenizer(args):
    from .data.corpus import Corpus, SkipCounter
    from .data.tokenizer import Tokenizer, vocab_shortfall

    if args.tok_verb != "train":
        raise LmforgeError("usage: lmforge tokenizer train DATA --vocab-size N --out tokenizer.json")
    corpus = Corpus(_data_spec(args.data), args.text_field)  # fails early on a missing path
    skipped = SkipCounter()
    tok = Tokenizer.train(corpus.texts(skipped), args.vocab_size, args.special, args.split_digits)
    if tok.vocab_size <= 256 + 1 + len(args.special):
        raise LmforgeError(f"no usable text in {args.data}")
    if skipped.files:
        print(f"warning: skipped {skipped.files} file(s) that are binary or not valid UTF-8", file=sys.stderr)
    if note := vocab_shortfall(tok, args.vocab_size):
        print(f"warning: {note}", file=sys.stderr)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens -> {args.out}")


def _prepare(args):
    from .data.prepare import prepare
    from .data.tokenizer import Tokenizer
    from .io import atomic_path

    tok = Tokenizer.from_file(args.tokenizer)
    if not 0 < args.val_fraction < 0.5:
        raise LmforgeError("--val-fraction must be in (0, 0.5)")
    stats = prepare(
        _data_spec(args.data),
        tok,
        args.out,
        args.val_fraction,
        args.shard_tokens,
        progress=sys.stderr.isatty(),
        allow_special=args.allow_special,
        text_field=args.text_field,
    )
    with atomic_path(Path(args.out) / "tokenizer.json") as tmp:
        tok.hf.save(str(tmp))
    print(
        f"prepared {stats.documents} documents ({stats.bytes / 1e6:.1f} MB): {stats.train_tokens:,} train tokens, "
        f"{stats.val_tokens:,} val tokens -> {args.out}"
    )


def _train(args, extra):
    from . import config as C

    if args.demo and args.task == "lm":
        raise LmforgeError("--demo is a seq2seq task: use it with --task seq2seq (or alone)")
    family = "seq2seq" if args.task == "seq2seq" or args.demo else "decoder"
    overrides = C.parse_overrides(extra, family, cli_options=_OWN_OPTIONS["train"])
    if args.world_size is not None and not args.dry_run:
        raise LmforgeError("--world-size goes with --dry-run (to launch N processes: torchrun --nproc_per_node N)")
    if args.resume:
        if args.data or args.demo or args.task or args.config or args.preset or overrides:
            raise LmforgeError(
                "--resume continues a run as it was configured; "
                "it takes no data, task, demo, preset, config or overrides"
            )
        if args.dry_run:
            from .runs import load_config
            from .train.sizing import dry_run

            dry_run(load_config(args.resume), world_size=args.world_size, resume=Path(args.resume))
            return 0
        from .train.loop import train  # torch: only once the arguments are known to be usable

        result = train(None, args.resume, resume=True, stop_after_steps=args.stop_after_steps)
        return _train_exit(result, args)
    if family == "seq2seq":
        from .data.pairs import demo

        if args.demo and args.data:
            raise LmforgeError("give DATA or --demo, not both")
        if not args.demo and args.data is None:
            raise LmforgeError("--task seq2seq needs DATA (a .jsonl or .tsv file of pairs) or --demo NAME")
        data = demo(args.demo) if args.demo else args.data
    else:
        data = _data_spec(args.data)
    name = args.preset or ("tiny" if family == "decoder" else "seq2seq-tiny")
    cfg = C.preset(name, family)
    budget_given = {k for sec in overrides.values() for k in sec if k in BUDGET_KEYS}
    if args.config:
        file_cfg = C.load_file(args.config)
        budget_given |= {k for k in file_cfg.get("train", {}) if k in BUDGET_KEYS}
        cfg = C.merge(cfg, _clear_budget(cfg, budget_given, file_cfg))
    cfg = C.merge(cfg, _clear_budget(cfg, budget_given, overrides))
    cfg.validate()  # sizes no machine can hold end here, before torch is even imported
    if args.dry_run:
        from .train.sizing import dry_run

        dry_run(cfg, data=data, world_size=args.world_size)
        return 0
    run_name = Path(args.config).stem if args.config else name  # runs/small-llama for --config small-llama.toml
    out = Path(args.out) if args.out else _free_run_dir(Path("runs") / run_name)
    from .train.loop import train  # torch: only once the arguments are known to be usable

    result = train(cfg, out, data=data, stop_after_steps=args.stop_after_steps)
    return _train_exit(result, args)


def _finetune(args, extra):
    from . import config as C
    from .runs import load_config

    if (args.data is None) == (args.demo is None):
        raise LmforgeError("finetune needs --data CHATS (.jsonl or .parquet) or --demo NAME")
    overrides = C.parse_overrides(extra, cli_options=_OWN_OPTIONS["finetune"])
    C.check_finetune_overrides(overrides)
    cfg = C.finetune_config(load_config(args.run))
    budget_given = {k for sec in overrides.values() for k in sec if k in BUDGET_KEYS}
    if args.config:
        file_cfg = C.load_file(args.config)
        C.check_finetune_overrides(file_cfg)
        budget_given |= {k for k in file_cfg.get("train", {}) if k in BUDGET_KEYS}
        cfg = C.merge(cfg, _clear_budget(cfg, budget_given, file_cfg))
    cfg = C.merge(cfg, _clear_budget(cfg, budget_given, overrides))
    template = None
    if args.chat_token and not args.chat_template:
        raise LmforgeError("--chat-token names markers of a --chat-template FILE")
    if args.chat_token and not all(args.chat_token):
        raise LmforgeError("--chat-token needs the marker's text")
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"cannot read chat template {args.chat_template}: {e}") from None
    from .data.chat_data import ChatSource, chat_demo
    from .train.loop import train  # torch: only once the arguments are known to be usable

    if args.demo:
        chat_demo(args.demo, "val")  # an unknown name fails here, before the model loads
    source = ChatSource(Path(args.run), Path(args.data) if args.data else None, args.demo, template, args.chat_token)
    out = Path(args.out) if args.out else _free_run_dir(Path(f"{Path(args.run).resolve()}-chat"))
    result = train(cfg, out, data=source, stop_after_steps=args.stop_after_steps)
    return _train_exit(result, args)


def _train_exit(result, args) -> int:
    """130 when a signal stopped the run, 0 when it finished or stopped where --stop-after-steps asked."""
    if result.interrupted and (args.stop_after_steps is None or result.step < args.stop_after_steps):
        return 130
    return 0


def _clear_budget(cfg, budget_given: set, d: dict) -> dict:
    """A budget the user sets replaces the preset's: budget keys not given are cleared."""
    if not budget_given:
        return d
    d = {k: dict(v) for k, v in d.items()}
    train = d.setdefault("train", {})
    for k in BUDGET_KEYS:
        if k not in budget_given:
            train[k] = None
    return d


def _free_run_dir(base: Path) -> Path:
    from .runs import WEIGHTS

    if not (base / WEIGHTS).exists():
        return base
    n = 2
    while (base.parent / f"{base.name}-{n}" / WEIGHTS).exists():
        n += 1
    return base.parent / f"{base.name}-{n}"


def _generate(args):
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise LmforgeError("--max-new-tokens must be at least 1")
    if args.compile and args.quantize != "none":
        raise LmforgeError("--compile and --quantize are alternatives; choose one")
    import torch

    from .inference.engine import generate_stream
    from .inference.quantize import pack_for_inference
    from .inference.sampling import SamplingParams
    from .runs import load

    max_new_tokens = 200 if args.max_new_tokens is None else args.max_new_tokens
    temperature = 0.0 if args.greedy else args.temperature
    extra = dict(
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        stop=[x.replace("\\n", "\n").replace("\\t", "\t") for x in args.stop],
    )
    SamplingParams(max_new_tokens, temperature, args.top_k, args.top_p, **extra).validate()  # fail before loading
    model, tok = load(args.run, device=args.device)
    if _is_seq2seq(model):
        return _generate_seq2seq(args, model, tok)
    if args.source is not None or args.source_file is not None:
        raise LmforgeError(f"{args.run} is a language model: give --prompt (--source is for seq2seq runs)")
    if not args.compile:
        pack_for_inference(model, args.quantize)
    torch.manual_seed(args.seed if args.seed is not None else torch.seed() % (2**31))

    def run_one(prompt: str):
        sys.stdout.write(prompt)
        try:
            for piece in generate_stream(
                model,
                tok,
                prompt,
                max_new_tokens,
                temperature,
                args.top_k,
                args.top_p,
                args.seed,
                compile=args.compile,
                **extra,
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
        finally:  # the output ends with a newline even when Ctrl-C stops it
            sys.stdout.write("\n")
            sys.stdout.flush()

    if args.chat:
        return _chat(args, model, tok, SamplingParams(max_new_tokens, temperature, args.top_k, args.top_p, **extra))
    if args.prompt is not None:
        run_one(args.prompt)
        return
    _interactive("prompt", lambda prompt: run_one(prompt.replace("\\n", "\n")))


def _chat(args, model, tok, params):
    from .data.chat import load_chat_template
    from .inference.chat_session import ChatSession

    if args.prompt is not None or args.compile:
        raise LmforgeError("--chat is interactive: it takes no --prompt (and no --compile)")
    template = load_chat_template(args.run)
    if template is None:
        print("note: this run has no chat template; using the plain one (User: / Assistant:)", file=sys.stderr)
    session = ChatSession(model, tok, template, params, system=args.system)

    def reply(text: str):
        for piece in session.say(text.replace("\\n", "\n")):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    _interactive("message", reply)


def _interactive(what: str, handle) -> None:
    """Pass each line typed on stdin to handle, until end of input or Ctrl-C."""
    print(f"interactive mode: type a {what} and press Enter (Ctrl-D or Ctrl-C to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        handle(line)


def _is_seq2seq(model) -> bool:
    from .config import Seq2SeqConfig

    return isinstance(model.config, Seq2SeqConfig)


def _generate_seq2seq(args, model, tok):
    from .data.pairs import read_sources
    from .inference.beam import translate

    if args.prompt is not None:
        raise LmforgeError(
            f"{args.run} is a seq2seq model: give --source or --source-file (--prompt is for language models)"
        )
    if args.source is not None and args.source_file is not None:
        raise LmforgeError("give --source or --source-file, not both")

    beam_size = 1 if args.greedy else args.beam_size

    def run(sources):
        for out in translate(model, tok, sources, beam_size, args.length_penalty, args.max_new_tokens):
            print(out, flush=True)

    if args.source is not None or args.source_file is not None:
        return run([args.source] if args.source is not None else read_sources(args.source_file))
    _interactive("source", lambda source: run([source]))


def _eval(args):
    from .evaluation.perplexity import evaluate_text
    from .runs import load

    if args.tasks is not None:
        return _eval_tasks(args)
    if args.limit is not None or args.num_fewshot is not None or args.include_path is not None:
        raise LmforgeError("--limit, --num-fewshot and --include-path go with --tasks")
    if args.apply_chat_template or args.fewshot_as_multiturn or args.system_instruction is not None:
        raise LmforgeError("--apply-chat-template, --fewshot-as-multiturn and --system-instruction go with --tasks")

    model, tok = load(args.run, device=args.device)
    if _is_seq2seq(model):
        return _eval_seq2seq(args, model, tok)
    if args.demo is not None:
        return _eval_chat_demo(args, model, tok)
    if args.data is None:
        raise LmforgeError("eval needs --data")
    if args.quantize is not None:
        from .inference.quantize import pack_for_inference

        pack_for_inference(model, args.quantize)
    res = evaluate_text(model, tok, _data_spec(args.data), max_tokens=args.max_tokens, text_field=args.text_field)
    print(
        f"tokens {res['tokens']:,} | loss {res['loss']:.4f} | perplexity {res['perplexity']:.2f} "
        f"| bits/byte {res['bits_per_byte']:.4f} | top-1 {100 * res['acc']:.1f}% | top-5 {100 * res['top5']:.1f}%"
    )
    if "moe_routing" in res:
        from .models.moe import routing_table

        print("\n".join(routing_table(res["moe_routing"], model.config.moe_capacity_factor)))


def _eval_tasks(args):
    if args.data is not None or args.demo is not None or args.quantize is not None:
        raise LmforgeError("--tasks runs benchmark tasks: it takes no --data, --demo or --quantize")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise LmforgeError("--tasks needs at least one task name")
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0) or (args.num_fewshot or 0) < 0:
        raise LmforgeError("--batch-size and --limit must be positive, --num-fewshot >= 0")
    if args.fewshot_as_multiturn == "true" and not args.apply_chat_template:
        raise LmforgeError("--fewshot-as-multiturn true needs --apply-chat-template (turns are chat turns)")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    from .evaluation import harness

    results, path = harness.run_tasks(
        args.run,
        tasks,
        limit,
        args.num_fewshot,
        args.include_path,
        args.batch_size,
        args.device,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=None if args.fewshot_as_multiturn is None else args.fewshot_as_multiturn == "true",
        system_instruction=args.system_instruction,
    )
    print(harness.results_table(results))
    print(f"full results: {path}")


def _plot(args):
    from .evaluation.plot import plot_runs

    out = args.out or (Path(args.runs[0]) / "plots" if len(args.runs) == 1 else Path("plots"))
    files = plot_runs(args.runs, out)
    print(f"wrote {len(files)} plots to {out}")


def _bench(args):
    if args.bench_verb not in ("matmul", "train"):
        raise LmforgeError("usage: lmforge bench {matmul,train} ...")
    from .train import bench

    if args.bench_verb == "matmul":
        bench.bench_matmul()
    elif args.bench_verb == "train":
        bench.bench_train(
            args.preset,
            steps=args.steps,
            rounds=args.rounds,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            compile=args.compile,
            precision=args.precision,
            ref_precision=args.ref_precision,
            device=args.device,
        )


def _convert(args):
    from .interop import gguf, hf

    if args.dtype is not None and not args.to_gguf:
        raise LmforgeError("--dtype is for --to-gguf")
    if args.consolidate:
        from .train.checkpoint import consolidate

        consolidate(args.consolidate)
        return
    if not args.out:
        raise LmforgeError("convert needs --out (the run directory, Hugging Face folder or .gguf file to write)")
    if args.from_hf:
        out = hf.from_hf(args.from_hf, args.out)
        print(f"converted {args.from_hf} -> lmforge run {out}")
    elif args.to_hf:
        out = hf.to_hf(args.to_hf, args.out)
        print(f"converted {args.to_hf} -> Hugging Face folder {out}")
    elif args.to_gguf:
        out = gguf.to_gguf(args.to_gguf, args.out, args.dtype or "f16")
        print(f"converted {args.to_gguf} -> GGUF file {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype or 'f16'})")
    else:
        out = gguf.from_gguf(args.from_gguf, args.out)
        print(f"converted {args.from_gguf} -> lmforge run {out}")


def _eval_chat_demo(args, model, tok):
    from .data.chat import load_chat_template
    from .data.chat_data import chat_demo
    from .evaluation.chat import evaluate_chats

    if args.data is not None:
        raise LmforgeError("eval takes --data or --demo, not both")
    template = load_chat_template(args.run)
    if template is None:
        raise LmforgeError(
            f"{args.run} is a language model without a chat template: --demo is for seq2seq runs and chat runs "
            "(lmforge finetune)"
        )
    res = evaluate_chats(model, tok, template, chat_demo(args.demo, "test"))
    print(
        f"held-out conversations {res['conversations']:,} | replies exactly right {100 * res['exact']:.1f}% (greedy) "
        f"| always answering {res['commonest']!r}: {100 * res['majority']:.1f}%"
    )


def _eval_seq2seq(args, model, tok):
    from .data.pairs import demo, read_pairs
    from .evaluation.seq2seq import evaluate_pairs

    if (args.data is None) == (args.demo is None):
        raise LmforgeError("eval of a seq2seq run needs --data PAIRS (.jsonl or .tsv) or --demo NAME")
    pairs = demo(args.demo).pairs("test") if args.demo else read_pairs(args.data)
    res = evaluate_pairs(model, tok, pairs, args.beam_size, args.length_penalty)
    print(
        f"pairs {res['pairs']:,} | loss {res['loss']:.4f} | exact match {100 * res['exact_match']:.2f}% | "
        f"BLEU {res['bleu']:.2f} | chrF {res['chrf']:.2f}"
    )


def _serve(args):
    import os

    if not 0 < args.port < 65536:
        raise LmforgeError("--port must be between 1 and 65535")
    if args.max_batch < 1:
        raise LmforgeError("--max-batch must be at least 1")
    if args.compile and args.quantize != "none":
        raise LmforgeError("--compile and --quantize are alternatives; choose one")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    from .inference.server import serve  # torch and the HTTP stack: only once the arguments are known to be usable

    serve(
        args.run,
        host=args.host,
        port=args.port,
        api_key=api_key,
        model_name=args.model_name,
        max_batch=args.max_batch,
        device=args.device,
        quantize=args.quantize,
        compile=args.compile,
    )


def _presets():
    import torch

    from .config import PRESETS, SEQ2SEQ_PRESETS, preset
    from .models import build_model

    print(f"{'name':<16} {'params':>10} {'active':>10}  description")
    for family, table in (("decoder", PRESETS), ("seq2seq", SEQ2SEQ_PRESETS)):
        for name, (desc, _, _) in table.items():
            cfg = preset(name, family).model
            with torch.device("meta"):
                model = build_model(cfg)
            active = model.num_active_params() if hasattr(model, "num_active_params") else model.num_params()
            print(f"{name:<16} {model.num_params() / 1e6:>9.1f}M {active / 1e6:>9.1f}M  {desc}")


if __name__ == "__main__":
    sys.exit(main())
