"""Loss on assistant tokens only, for any chat template.

Two ways, in order:
1. TRL's own training template for the model's template (TRL ships `{% generation %}` versions of
   the Phi-3, Llama 3, Qwen, Gemma, ... templates and swaps them in for `assistant_only_loss`).
2. Otherwise a mask derived from the model's own template: render the conversation up to each
   assistant turn (with the generation prompt); the assistant's span starts where that prefix
   ends and runs through its content and the template's end-of-turn token. This needs a template
   whose renderings of a conversation's prefixes are prefixes of the whole rendering; one that is
   not gets a clear error naming `--loss-on all`, never a silent fallback.
"""

from __future__ import annotations

from ..errors import UserError


class TemplateError(UserError, ValueError):
    """The chat template does not allow an assistant-only loss mask."""


def trl_training_template(tok) -> str | None:
    """TRL's training template for this tokenizer's chat template (or the template itself if it
    already marks assistant turns); None when TRL knows no training version of it."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    if has_generation_markers(tok.chat_template):
        return tok.chat_template
    try:
        return get_training_chat_template(tok) or tok.chat_template
    except ValueError:  # TRL: "patching is not supported for this template"
        return None


def _render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tok, messages: list[dict], end_of_turn: str | None) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) of each assistant reply + its end-of-turn token])."""
    full = _render(tok, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tok, messages[:k], add_generation_prompt=True)
        if not full.startswith(prefix):
            raise TemplateError(
                "the chat template renders a conversation's beginning differently from the whole "
                "conversation, so assistant turns cannot be located; train with --loss-on all"
            )
        content = message["content"].strip()  # some templates trim the content
        at = full.find(content, len(prefix))
        if at < 0 or full[len(prefix) : at].strip():
            raise TemplateError(
                "the chat template changes the assistant's text, so its tokens cannot be located; "
                "train with --loss-on all"
            )
        end = at + len(content)
        if end_of_turn and full.startswith(end_of_turn, end):
            end += len(end_of_turn)  # the model must learn to end its turn
        spans.append((len(prefix), end))
    return full, spans


def tokenize_with_mask(tok, messages: list[dict], end_of_turn: str | None) -> dict:
    """{"input_ids", "assistant_masks"} as TRL takes them in a pre-tokenized dataset."""
    full, spans = assistant_char_spans(tok, messages, end_of_turn)
    encoded = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}
