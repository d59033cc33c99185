"""Render a conversation with the tokenizer's own chat template, and find the token span of every turn.

`render_chat(tok, messages)` returns the token ids that `tok.apply_chat_template(messages)` gives,
token for token, plus for each message the half-open token span [start, end) of its content and the
end-of-turn token that closes it (e.g. `<|im_end|>`), nothing of the template around it (role header,
newline after the end-of-turn token). rollout.py turns the span of the reflection turn into the
reflection mask, so the mask comes from the rendered turns, never from searching token ids.

How spans are found: the template is rendered to text once; each message's content is located in that
text left to right (as given, or stripped when the template trims it); the text is tokenized with
character offsets, and the content's characters map to the tokens that overlap them. The token right
after the content must be a special token (the end-of-turn marker); it closes the span.

It does not: support templates that rewrite content beyond trimming (then a clear error says which
turn), or tool-call/multimodal message formats.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Rendered:
    ids: list[int]  # the conversation's token ids, equal to apply_chat_template's
    spans: list[tuple[int, int]]  # per message: [start, end) of its content + end-of-turn token
    text: str  # the rendered template text


def _template_text(tok, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
    """Token ids of the rendered conversation and the token span of every message (see module doc)."""
    text = _template_text(tok, messages, add_generation_prompt)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        a = text.find(content, cursor) if content else -1
        if a < 0 and content.strip():
            content = content.strip()
            a = text.find(content, cursor)
        if a < 0:
            if content.strip():
                raise ValueError(f"message {i} ({m['role']}): its content does not appear in the rendered template")
            a = _header_end(text, cursor, tok)  # empty content: the span is only the end-of-turn token
        b = a + len(content)
        start = next(t for t, (s, e) in enumerate(offsets) if e > a or (a == b and s >= a))
        end = next((t for t in range(start, len(ids)) if offsets[t][0] >= b), len(ids))
        if end >= len(ids) or ids[end] not in special:
            raise ValueError(f"message {i} ({m['role']}): no end-of-turn special token right after its content")
        spans.append((start, end + 1))
        cursor = offsets[end][1]
    return Rendered(ids=list(ids), spans=spans, text=text)


def _header_end(text: str, cursor: int, tok) -> int:
    """For an empty message: the character where its content would start, i.e. just before the next
    end-of-turn marker after `cursor`."""
    eot = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    return text.find(eot, cursor)


def render_prompt(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant header, ready for sampling."""
    return render_chat(tok, messages, add_generation_prompt=True).ids


def end_of_turn_id(tok) -> int:
    """The token that ends an assistant turn (the sampler's stop token): `<|im_end|>` for SmolLM2 and
    Qwen, `<|eot_id|>` for Llama 3; falls back to eos."""
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            return tid
    return tok.eos_token_id
