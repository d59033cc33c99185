"""Function calling, APIGen / xLAM format: answer a query with a JSON list of tool calls (docs/method.md section 6).

Records are `{query, tools, answers}`; `tools` and `answers` may be JSON strings (as in xLAM-60k) or
lists. The model sees the tools as JSON (after one solved example, `oneshot`) and must answer
`[{"name": ..., "arguments": {...}}, ...]`.
The verifier compares the calls with the answers as an unordered multiset, values exactly equal after
JSON parsing. This module also holds what bfcl.py shares: reading calls out of model text, and the prompt.

What it does not do: execute tools, accept Python-call syntax (`f(x=1)`: that needs a parser of model
code, which BFCL does with eval-like machinery), or give partial credit for some correct calls.
"""
import json
import re
from collections import Counter
from itertools import islice
from dataclasses import dataclass, field
from typing import ClassVar

from r3.tasks import TaskDataError, question_turns, read_rows, require_nonempty, split_of

REFLECTION_PROMPT = (
    "You tried performing the task, but failed in generating the correct tool call. Reflect on what went "
    "wrong and write a short explanation that will help you do better next time."
)
ANSWER_FORMAT = (
    "Answer with only a JSON list of the tool calls that answer the question, in this format:\n"
    '[{"name": "tool_name", "arguments": {"argument_name": "value"}}]'
)

# The one-shot example: a question over two made-up tools answered with one call, shown as a user/assistant
# turn pair before the real question. Without it SmolLM2-135M-Instruct echoes the tool docs instead of
# calling them (0 of 200 on BFCL simple_python; bench/RESULTS.md).
ONESHOT_TOOLS = [
    {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "dict", "properties": {
         "city": {"type": "string", "description": "The city's name."},
         "unit": {"type": "string", "description": "celsius or fahrenheit."}}, "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount of money.",
     "parameters": {"type": "dict", "properties": {
         "amount": {"type": "float", "description": "The amount."},
         "to": {"type": "string", "description": "Target currency code."}}, "required": ["amount", "to"]}},
]
ONESHOT_QUESTION = "What is the weather in Paris in celsius?"
ONESHOT_ANSWER = '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'

MAX_TEXT_CHARS = 20_000  # longer answers are rejected unread (BFCL's longest answer is ~1.3k chars)
MAX_STARTS = 32  # how many top-level "[" / "{" positions parse_calls tries before giving up
_FENCE = re.compile(r"```[A-Za-z]*")
_BRACKET = re.compile(r"[\[\]{}]")


@dataclass
class XLAM:
    name: str = "xlam"
    data_path: str | None = None  # xLAM/APIGen records: a JSON list, JSON lines, or parquet (required)
    test_fraction: float = 0.2  # held out by hash of the query (the paper held out 12k of 60k)
    num_examples: int | None = None  # use only the first N records (None: all)
    oneshot: bool = True  # one solved example (ONESHOT_*) as a user/assistant turn pair before the question
    reflection_prompt: ClassVar[str] = REFLECTION_PROMPT
    _pool: dict | None = field(default=None, init=False, repr=False)

    def examples(self, split: str) -> list[dict]:
        """'train' or 'test' records as dicts {id, query, tools: list, answers: list}."""
        if split not in ("train", "test"):
            raise TaskDataError(f"unknown split {split!r} for task {self.name!r}; use 'train' or 'test'")
        if self.data_path is None:
            raise TaskDataError(f"task {self.name!r} needs data: pass data_path=<xLAM/APIGen .json/.jsonl file>")
        if self._pool is None:
            self._pool = {"train": [], "test": []}
            for ex in load_xlam(self.data_path, self.num_examples):
                self._pool[split_of(ex["query"], self.test_fraction)].append(ex)
        hint = f"check {self.data_path} or test_fraction (now {self.test_fraction})"
        return list(require_nonempty(self._pool[split], self.name, split, hint))

    def prompt(self, example: dict) -> list[dict]:
        return question_turns(tool_prompt(example["tools"], example["query"]), SOLVED if self.oneshot else None)

    def verify(self, example: dict, text: str) -> bool:
        calls = parse_calls(text)
        return calls is not None and same_calls(calls, example["answers"])


def load_xlam(path, limit: int | None = None) -> list[dict]:
    """Records {query, tools, answers} with tools/answers decoded from JSON strings when they are strings."""
    examples = []
    for i, row in enumerate(read_rows(path)[:limit], start=1):
        try:
            tools, answers = _as_list(row.get("tools")), _as_list(row.get("answers"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise TaskDataError(f"{path}: record {i}: `tools`/`answers` is not valid JSON ({e})") from None
        if not isinstance(row.get("query"), str) or tools is None or answers is None:
            raise TaskDataError(f"{path}: record {i} needs a string `query` and lists `tools` and `answers`")
        if not all(_is_call(a) for a in answers):
            raise TaskDataError(f"{path}: record {i}: each answer must be {{\"name\": str, \"arguments\": dict}}")
        examples.append({"id": f"xlam-{row.get('id', i)}", "query": row["query"], "tools": tools,
                         "answers": answers})
    return examples


def _as_list(value):
    value = json.loads(value) if isinstance(value, str) else value
    return value if isinstance(value, list) else None


def tool_prompt(tools: list, question: str) -> str:
    """The first-attempt prompt: the tools as JSON (one per line), the question, the answer format."""
    tool_lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return f"You have access to the following tools:\n{tool_lines}\n\nQuestion: {question}\n\n{ANSWER_FORMAT}"


SOLVED = (tool_prompt(ONESHOT_TOOLS, ONESHOT_QUESTION), ONESHOT_ANSWER)  # the one-shot pair for question_turns


# --- reading calls out of model text ----------------------------------------------------------------

def parse_calls(text: str) -> list[dict] | None:
    """The list of calls `[{"name": str, "arguments": dict}, ...]` in the model's text, or None.

    Forgiving on the wrapping, strict on the content: code fences are dropped, and the first JSON value
    that starts at a top-level "[" or "{" (not inside another bracket) and has the shape of a call list
    is taken, so prose before and after is fine. A single call object counts as a one-call list (small
    models often drop the brackets around one call; the content is the same). A call has exactly the
    keys "name" and "arguments". A list with anything else in it is no answer, and neither is a call
    inside an unclosed list (a truncated answer). Never raises: over-long or too-deep text gives None.
    NOTE: brackets are counted without regard to JSON strings, so prose with an unclosed "[" before
    the answer hides the answer.
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return None
    text = _FENCE.sub(" ", text)
    decoder = json.JSONDecoder()
    for start in islice(_top_level_starts(text), MAX_STARTS):
        try:
            value = decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; "[" * 10**4 recurses
            continue
        calls = [value] if isinstance(value, dict) else value
        if isinstance(calls, list) and calls and all(_is_call(c) for c in calls):
            return calls
    return None


def _top_level_starts(text: str):
    """Positions of the "[" and "{" that open at bracket depth 0."""
    depth = 0
    for match in _BRACKET.finditer(text):
        if match.group() in "[{":
            if depth == 0:
                yield match.start()
            depth += 1
        else:
            depth = max(depth - 1, 0)


def _is_call(c) -> bool:
    return (isinstance(c, dict) and c.keys() == {"name", "arguments"} and isinstance(c["name"], str)
            and isinstance(c["arguments"], dict))


def same_calls(calls: list[dict], answers: list[dict]) -> bool:
    """Equal as multisets of calls, with values compared exactly after JSON parsing.

    Numbers compare by value (5 == 5.0, as JSON does not tell them apart), but booleans are not numbers
    (true != 1) and strings are compared verbatim (no case or space folding; that is BFCL's rule, bfcl.py).
    """
    try:
        return Counter(map(_canonical, calls)) == Counter(map(_canonical, answers))
    except RecursionError:  # arguments nested ~1000 deep: JSON parsed them, but they answer nothing
        return False


def _canonical(value) -> str:
    return json.dumps(_normalise_numbers(value), sort_keys=True)


def _normalise_numbers(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise_numbers(v) for v in value]
    return value
