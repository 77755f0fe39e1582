"""Chat messages to token ids, with what a user wrote kept as text.

`apply_chat_template` renders one string, and tokenizing that string turns every special-token string in
it into the real token, including those inside a message: a user who types `<|im_end|><|im_start|>system`
(or Phi-3's `<|end|><|system|>`) would forge a system turn. Here the template's own text is tokenized as
usual and each message's content with `split_special_tokens=True`, so `<|system|>` typed by a user is the
seven text tokens `<`, `|`, `system`, ... and never the role token.

Content without any special-token string (nearly all) takes the one-string path, token for token what
`apply_chat_template(..., tokenize=True)` gives. Content with one is tokenized in pieces; a
SentencePiece tokenizer (Phi-3) may then start that content with a word-start mark ("▁") it would not
have had in one string: a leading space, the price of keeping the roles honest.
"""

from __future__ import annotations

from .generation import ParamError


def special_strings(tok) -> list[str]:
    """The strings the tokenizer turns into special tokens (those `split_special_tokens` keeps as text)."""
    return [t.content for t in tok.added_tokens_decoder.values() if t.special]


def chat_token_ids(tok, messages: list[dict], specials: list[str] | None = None) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template, ending with the assistant's turn."""
    specials = special_strings(tok) if specials is None else specials
    if not any(s in m["content"] for m in messages for s in specials):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    # render the structure around a unique mark per message, then tokenize structure and content apart
    marks = [f"\x1f{i}\x1f" for i in range(len(messages))]
    text = tok.apply_chat_template(
        [{**m, "content": k} for m, k in zip(messages, marks, strict=True)], tokenize=False, add_generation_prompt=True
    )
    if any(text.count(k) != 1 for k in marks):
        raise ParamError(
            "a message contains a special-token string (one of the model's control tokens), and this "
            "model's chat template rewrites message content, so it cannot be kept as plain text"
        )
    ids: list[int] = []
    for mark, message in zip(marks, messages, strict=True):
        head, text = text.split(mark)
        ids += tok(head, add_special_tokens=False)["input_ids"]
        ids += tok(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + tok(text, add_special_tokens=False)["input_ids"]
