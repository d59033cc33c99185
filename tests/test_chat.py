"""r3.rollout.render_chat renders conversations exactly as the chat template does and finds each turn's span.

Proves, on the real default model's template (SmolLM2, which also inserts a default system prompt):
the ids equal `apply_chat_template` token for token, and the tokens of every message's span decode to
exactly that message's content plus its end-of-turn token, for reflect-retry shaped conversations with
awkward content (leading newlines, trailing spaces, markup, unicode, an empty turn).
"""
import pytest

from r3.rollout import end_of_turn_id, render_chat, render_prompt

CONVERSATIONS = [
    [{"role": "user", "content": "Using the numbers [3, 5, 7], create an equation that equals 22."},
     {"role": "assistant", "content": "3 * 5 + 7"},
     {"role": "user", "content": "You tried solving the problem and got the wrong answer. Reflect on what went wrong."},
     {"role": "assistant", "content": "I multiplied first; 3*5+7 is 22, so check the numbers.\n\n"},
     {"role": "user", "content": "Using the numbers [3, 5, 7], create an equation that equals 22."},
     {"role": "assistant", "content": "(3 + 7) * 5 - 28"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Call the tool: [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}]"},
     {"role": "assistant", "content": "\n```json\n[{\"name\": \"get_weather\"}]\n```  "},
     {"role": "user", "content": "Reflect."},
     {"role": "assistant", "content": ""}],
]


def _reference_ids(tok, messages, add_generation_prompt=False):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True)
    return list(out["input_ids"])


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["countdown", "tools"])
def test_render_equals_apply_chat_template(default_tok, conv):
    assert render_chat(default_tok, conv).ids == _reference_ids(default_tok, conv)
    assert render_prompt(default_tok, conv[:3]) == _reference_ids(default_tok, conv[:3], add_generation_prompt=True)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["countdown", "tools"])
def test_each_span_decodes_to_content_plus_end_of_turn(default_tok, conv):
    r = render_chat(default_tok, conv)
    eot = default_tok.decode([end_of_turn_id(default_tok)])
    assert eot == "<|im_end|>"
    for m, (s, e) in zip(conv, r.spans):
        got = default_tok.decode(r.ids[s:e])
        assert got == m["content"] + eot, f"{m['role']}: {got!r} != {m['content'] + eot!r}"
        assert r.ids[e - 1] == end_of_turn_id(default_tok)


def test_spans_are_ordered_and_disjoint(default_tok):
    r = render_chat(default_tok, CONVERSATIONS[0])
    ends = [0] + [e for _, e in r.spans]
    assert all(s >= prev for (s, _), prev in zip(r.spans, ends))
