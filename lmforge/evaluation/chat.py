"""Held-out chat accuracy: does a fine-tuned run give the expected reply?

    evaluate_chats(model, tok, template, conversations)   greedy replies to each conversation's last user turn,
                                                          scored by exact match against the conversation's reply

Each conversation ends with the assistant's reply; the model is given everything before it, rendered
and encoded as the server and `generate --chat` do (`inference.chat_session.replies`), and its greedy
reply counts as right when it equals the expected one (surrounding whitespace ignored). Beside the
score, the share that always giving the commonest expected reply would reach: the floor to beat.
"""

from __future__ import annotations

from collections import Counter

from ..errors import LmforgeError
from ..inference.chat_session import replies


def evaluate_chats(
    model, tokenizer, template: str | None, conversations: list[list[dict]], max_new_tokens: int = 32
) -> dict:
    """{"conversations": n, "exact": share of replies exactly right, "majority": the commonest reply's share,
    "commonest": that reply, "replies": [(expected, got), ...]} over conversations ending with the assistant's turn.

    Raises LmforgeError when there is none."""
    convs = [c for c in conversations if c and c[-1]["role"] == "assistant"]
    if not convs:
        raise LmforgeError("no held-out conversation ends with an assistant reply to compare with")
    expected = [c[-1]["content"].strip() for c in convs]
    got = replies(model, tokenizer, template, [c[:-1] for c in convs], max_new_tokens)
    commonest, count = Counter(expected).most_common(1)[0]
    right = sum(g.strip() == e for g, e in zip(got, expected))
    return {
        "conversations": len(convs),
        "exact": right / len(convs),
        "majority": count / len(convs),
        "commonest": commonest,
        "replies": list(zip(expected, got)),
    }
