"""BFCL: the Berkeley Function Calling Leaderboard's single-turn categories as a task, checked against
BFCL's possible answers by our own code (docs/method.md section 6: the function-calling data we can reach offline).

Data: the question and possible-answer files shipped in the PyPI package bfcl-eval,
bfcl_eval/data/BFCL_v4_<category>.json and bfcl_eval/data/possible_answer/BFCL_v4_<category>.json
(JSON lines, matched by id). Splits: "train" = live_simple + live_multiple (user-contributed APIs);
"test" = the four V1 categories, which share their tools and so are never split among themselves.
A category name is a split too: examples("simple_python").

The model answers in the xLAM JSON format (function_calling.parse_calls). `check_calls` re-implements
the semantics of BFCL's ast_checker for Python, and tests/test_bfcl_agreement.py measures agreement
with it on the real data:
  - each argument has a list of acceptable values; "" in that list means it may be omitted;
  - required parameters (from the function doc) must be present; no parameter outside both the doc
    and the possible answer; every possible-answer parameter without "" must be present;
  - strings compare after BFCL's normalisation (drop spaces and , . / - _ * ^; lowercase; ' -> ");
    string elements of lists and string values of dicts too; an int is accepted where a float is;
  - a possible answer whose type differs from the doc's type names a variable: the value may then have
    that type and must equal one acceptable value exactly;
  - parallel calls may come in any order.
Deliberate differences from bfcl-eval 2026.3.23: (1) calls are paired by a maximum bipartite matching;
BFCL pairs greedily and rejects a correct answer when one call fits two expected calls and is taken by
the wrong one. (2) ints are accepted inside float arrays, as they are at top level; BFCL rejects [1, 2]
for an array of floats unless the possible answer itself holds ints.

Not here: multi-turn, irrelevance, Java/JavaScript, executable and agentic categories; BFCL's
Python-call answer format (its decoder evaluates model text); renaming "." to "_" in function names
(BFCL does that for APIs that forbid dots; our answers are JSON text, so names keep their dots).
"""
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from r3.tasks import TaskDataError, question_turns, read_jsonl, require_nonempty
from r3.tasks.function_calling import REFLECTION_PROMPT, SOLVED, parse_calls, tool_prompt

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple")
SPLITS = {
    "train": ("live_simple", "live_multiple"),
    "test": ("simple_python", "multiple", "parallel", "parallel_multiple"),
}
# BFCL's PYTHON_TYPE_MAPPING: the doc's type names -> the Python type a JSON value must decode to.
PY_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
            "dict": dict, "any": str}
_NOISE = re.compile(r"[ ,./\-_*^]")  # BFCL's standardize_string drops these characters


@dataclass
class BFCL:
    name: str = "bfcl"
    data_path: str | None = None  # folder with BFCL_v4_<category>.json and possible_answer/; None: bfcl_eval's
    num_examples: int | None = None  # use only the first N examples of a split (None: all)
    oneshot: bool = True  # function_calling's solved example as a user/assistant pair before the question
    reflection_prompt: ClassVar[str] = REFLECTION_PROMPT
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def examples(self, split: str) -> list[dict]:
        """Dicts {id, category, question: [messages], functions: [docs], possible_answer: [calls]}."""
        categories = SPLITS.get(split) or ((split,) if split in CATEGORIES else None)
        if categories is None:
            raise TaskDataError(f"unknown split {split!r} for task {self.name!r}; use one of "
                             f"{list(SPLITS) + list(CATEGORIES)}")
        for c in categories:
            if c not in self._cache:
                self._cache[c] = load_category(bfcl_data_dir(self.data_path), c)
        examples = [ex for c in categories for ex in self._cache[c]][: self.num_examples]
        return require_nonempty(examples, self.name, split, f"check the files of {categories}")

    def prompt(self, example: dict) -> list[dict]:
        # The question is one user message, so that the retry can re-ask exactly it; BFCL's system turns
        # (a few live examples have one) become its opening lines.
        system = [m["content"] for m in example["question"] if m["role"] == "system"]
        question = "\n".join(m["content"] for m in example["question"] if m["role"] != "system")
        text = tool_prompt(example["functions"], question)
        return question_turns("\n".join(system + [text]) if system else text, SOLVED if self.oneshot else None)

    def verify(self, example: dict, text: str) -> bool:
        calls = parse_calls(text)
        if calls is None:
            return False
        try:
            return check_calls(calls, example["functions"], example["possible_answer"])
        except RecursionError:  # a value nested ~1000 deep: compared values recurse
            return False


    def hint(self, example: dict) -> str:
        """A reflection naming the functions to call and their required arguments, without values."""
        calls = [f"{name} with the arguments {', '.join(_required(params)) or 'none'}"
                 for call in example["possible_answer"] for name, params in call.items()]
        return f"My tool call was wrong. The right answer calls {'; then '.join(calls)}."

    def answer(self, example: dict) -> str:
        """A reflection that gives a right answer: each call with the first acceptable value of each
        required argument (BFCL's possible answers list several; "" marks an optional argument)."""
        calls = [{"name": name, "arguments": {k: v[0] for k, v in params.items() if k in _required(params)}}
                 for call in example["possible_answer"] for name, params in call.items()]
        return f"My tool call was wrong. The right answer is {json.dumps(calls)}"


def _required(params: dict) -> list[str]:
    """The parameters of a possible answer that must be present (an acceptable "" makes one optional)."""
    return [k for k, v in params.items() if "" not in v]


def bfcl_data_dir(data_dir=None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    spec = importlib.util.find_spec("bfcl_eval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError("the BFCL data ships in the PyPI package bfcl-eval, which is not installed: "
                            "pip install --no-deps bfcl-eval")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_category(data_dir: Path, category: str) -> list[dict]:
    """One category's examples: questions joined with their possible answers by id."""
    q_path = data_dir / f"BFCL_v4_{category}.json"
    a_path = data_dir / "possible_answer" / f"BFCL_v4_{category}.json"
    answers = {a.get("id"): a.get("ground_truth") for a in read_jsonl(a_path)}
    examples = []
    for q in read_jsonl(q_path):
        if not isinstance(answers.get(q.get("id")), list) or not q.get("question") or "function" not in q:
            raise TaskDataError(f"{q_path}: entry {q.get('id')!r} lacks question/function, or {a_path} has "
                                f"no ground_truth for it")
        examples.append({"id": q["id"], "category": category, "question": q["question"][0],
                         "functions": q["function"], "possible_answer": answers[q["id"]]})
    return examples


# --- BFCL's possible-answer semantics ---------------------------------------------------------------

def check_calls(calls: list[dict], functions: list[dict], possible_answer: list[dict]) -> bool:
    """True iff each expected call gets its own model call that matches it (order free)."""
    if len(calls) != len(possible_answer):
        return False
    docs = {f["name"]: f for f in functions}
    fits = [[call_matches(call, expected, docs) for call in calls] for expected in possible_answer]
    return _perfect_matching(fits)


def _perfect_matching(fits: list[list[bool]]) -> bool:
    """Kuhn's augmenting paths: can every row i own a distinct column j with fits[i][j]? (n <= ~8)"""
    owner = {}  # column (model call) -> row (expected call)

    def augment(i, seen):
        for j, ok in enumerate(fits[i]):
            if ok and j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(fits)))


def call_matches(call: dict, expected: dict, docs: dict) -> bool:
    """One model call {name, arguments} against one possible answer {name: {param: [acceptable]}}."""
    ((name, accepted),) = expected.items()
    doc = docs.get(name)
    if doc is None or call["name"] != name:
        return False
    props, args = doc["parameters"].get("properties", {}), call["arguments"]
    if any(p not in args for p in doc["parameters"].get("required", [])):
        return False
    for param, value in args.items():
        if param not in props or param not in accepted or not value_matches(value, accepted[param], props[param]):
            return False
    return all(p in args or "" in values for p, values in accepted.items())


def value_matches(value, accepted: list, schema: dict) -> bool:
    """One argument value against its acceptable values, typed by its doc `schema` (BFCL's rules)."""
    expected = PY_TYPES.get(schema.get("type"))
    item_type = PY_TYPES.get(schema.get("items", {}).get("type")) if expected is list else None
    if expected is None:  # a type name BFCL does not know either: no type rule, plain membership
        return value in accepted
    if expected is float and type(value) is int:
        value = float(value)
    answer_type = next((type(a) for a in accepted if a != ""), None)
    if type(value) is expected:
        if item_type is not None and not _items_typed(value, accepted, item_type):
            return False
        is_variable = answer_type not in (None, expected)
    elif type(value) is answer_type:
        is_variable = True
    else:
        return False
    if is_variable:  # BFCL: a variable name (or None) compares exactly, without normalisation
        return value in accepted
    if expected is dict:
        return any(isinstance(a, dict) and _dict_matches(value, a) for a in accepted)
    if expected is list and item_type is dict:
        return any(_dicts_match(value, a) for a in accepted)
    if expected is str:
        return standardize(value) in [standardize(a) for a in accepted if type(a) is str]
    if expected is list:
        # NOTE: "" turns into [] here, so an empty list is accepted for an omittable list (as in BFCL).
        return _standardize_list(value) in [_standardize_list(a) for a in accepted if a == "" or type(a) is list]
    return value in accepted  # int, float, bool: Python equality, as BFCL


def standardize(s: str) -> str:
    """BFCL's string normalisation: "April 1, 2024" == "april 1 2024" == "April-1-2024"."""
    return _NOISE.sub("", s).lower().replace("'", '"')


def _standardize_list(values) -> list:
    return [standardize(v) if type(v) is str else v for v in values]  # top level only, as BFCL


def _items_typed(value: list, accepted: list, item_type: type) -> bool:
    """BFCL's one-level check of list items: some acceptable value is not a list (e.g. ""), or every
    item has the doc's item type or the type of that acceptable list's items. Ints pass as floats."""
    for a in accepted:
        if type(a) is not list:
            return True
        a_type = next((type(x) for x in a if x != ""), None)
        if all(type(x) in (item_type, a_type) or (item_type is float and type(x) is int) for x in value):
            return True
    return False


def _dict_matches(value: dict, expected: dict) -> bool:
    """A dict argument against one acceptable dict {key: [acceptable values]}; string values normalised."""
    for key, v in value.items():
        if key not in expected:
            return False
        if (standardize(v) if type(v) is str else v) not in [standardize(a) if type(a) is str else a for a in expected[key]]:
            return False
    return all(key in value or "" in values for key, values in expected.items())


def _dicts_match(value: list, expected) -> bool:
    """A list of dicts against one acceptable list of dicts, position by position ("" matches [])."""
    expected = [] if expected == "" else expected
    if type(expected) is not list or len(value) != len(expected):
        return False
    return all(type(v) is dict and type(e) is dict and _dict_matches(v, e) for v, e in zip(value, expected))
