"""Our BFCL checker (r3/tasks/bfcl.py) agrees with bfcl-eval's own `ast_checker` on the real data.

Cases are built from the possible answers of all six categories: the canonical answer (the first
acceptable value of each argument), other acceptable answers, and systematic corruptions (wrong value,
missing argument, extra argument, wrong function name, wrong type, shuffled or dropped parallel calls).
BFCL's checker gets the decoded call structure directly ([{func_name: {arg: value}}]); ours gets the JSON
text a model would write, so our parsing is exercised too. We never use BFCL's decoder, which evaluates
model text.

Disagreements are counted by kind and printed, and each kind is explained below; anything else fails.
"""
import copy
import json
import sys
import types
from collections import Counter

import pytest

pytest.importorskip("bfcl_eval")

from r3.tasks import get_task  # noqa: E402

MODEL = "r3"  # the model name we give BFCL; its config says: keep "." in function names
OMIT = object()


@pytest.fixture(scope="module")
def bfcl_ast_checker():
    """bfcl-eval's ast_checker, imported with ONE module stubbed: constants.model_config imports every
    provider's SDK (openai, anthropic, ...). The checker reads only MODEL_CONFIG_MAPPING[model]
    .underscore_to_dot from it, so the stub holds just that, for our model name."""
    stub = types.ModuleType("bfcl_eval.constants.model_config")
    stub.MODEL_CONFIG_MAPPING = {MODEL: types.SimpleNamespace(underscore_to_dot=False)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "bfcl_eval.constants.model_config", stub)
        from bfcl_eval.constants.enums import Language
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    def check(example, calls) -> bool:
        model_output = [{c["name"]: c["arguments"]} for c in calls]
        return ast_checker(example["functions"], model_output, example["possible_answer"], Language.PYTHON,
                           example["category"], MODEL)["valid"]

    return check


# --- building cases from possible answers -----------------------------------------------------------

def pick(values, which):
    """An acceptable value: the first (OMIT when that is "", i.e. optional) or the last non-"" one."""
    if which == "first":
        return OMIT if not values or values[0] == "" else values[0]
    concrete = [v for v in values if v != ""]
    return concrete[-1] if concrete else OMIT


def concrete_value(item, schema, which):
    """Possible answers of dict arguments hold {key: [acceptable]}; lists of dicts hold a list of those."""
    kind, items = schema.get("type"), schema.get("items", {}).get("type")
    if kind == "dict" and type(item) is dict:
        return {k: v for k, vs in item.items() if (v := pick(vs, which)) is not OMIT}
    if kind == "array" and items == "dict" and type(item) is list:
        return [concrete_value(d, {"type": "dict"}, which) for d in item]
    return item


def build_calls(example, which="first"):
    docs = {f["name"]: f for f in example["functions"]}
    calls = []
    for expected in example["possible_answer"]:
        ((name, accepted),) = expected.items()
        props = docs[name]["parameters"]["properties"]
        args = {}
        for p, values in accepted.items():
            item = pick(values, which)
            if item is not OMIT:
                args[p] = concrete_value(item, props.get(p, {}), which)
        calls.append({"name": name, "arguments": args})
    return calls


def wrong_value(v):
    if type(v) is bool:
        return not v
    if type(v) in (int, float):
        return v + 7
    if type(v) is str:
        return v + " zzz"
    if type(v) is list:
        return v + (v[:1] or ["zzz"])
    if type(v) is dict:
        return {**v, "zzz": 1}
    return "zzz"


def wrong_type(v):
    return json.dumps(v) if type(v) is not str else [v]


def first_arg(calls):
    return next(iter(calls[0]["arguments"]), None)


def variants(example):
    """(kind, calls) pairs: correct answers and corruptions of the canonical one."""
    base = build_calls(example)
    yield "canonical", base
    yield "alternative", build_calls(example, "last")
    docs = {f["name"]: f for f in example["functions"]}

    def edit(fn):
        calls = copy.deepcopy(base)
        fn(calls)
        return calls

    def upper_strings(calls):
        for c in calls:
            c["arguments"] = {k: v.upper() if type(v) is str else v for k, v in c["arguments"].items()}

    def ints_for_floats(calls):
        for c in calls:
            for k, v in c["arguments"].items():
                if type(v) is float and v.is_integer():
                    c["arguments"][k] = int(v)
                elif type(v) is list:
                    c["arguments"][k] = [int(x) if type(x) is float and x.is_integer() else x for x in v]

    yield "string_case", edit(upper_strings)
    yield "ints_for_floats", edit(ints_for_floats)
    p = first_arg(base)
    if p is not None:
        yield "wrong_value", edit(lambda c: c[0]["arguments"].update({p: wrong_value(c[0]["arguments"][p])}))
        yield "wrong_type", edit(lambda c: c[0]["arguments"].update({p: wrong_type(c[0]["arguments"][p])}))
        yield "missing_arg", edit(lambda c: c[0]["arguments"].pop(p))
    required = [r for r in docs[base[0]["name"]]["parameters"].get("required", []) if r in base[0]["arguments"]]
    if required:
        yield "missing_required", edit(lambda c: c[0]["arguments"].pop(required[-1]))
    yield "extra_arg", edit(lambda c: c[0]["arguments"].update({"zzz_extra": 1}))
    yield "wrong_name", edit(lambda c: c[0].update(name=c[0]["name"] + "_v2"))
    if len(base) > 1:
        yield "shuffled", base[::-1]
        yield "shuffled_rotated", base[1:] + base[:1]
        yield "dropped_call", base[:-1]


def all_examples():
    task = get_task("bfcl")
    return task, task.examples("train") + task.examples("test")


# --- the agreement test -----------------------------------------------------------------------------

def explain(example, calls, kind, ours, theirs, bfcl_check) -> str | None:
    """Why we disagree, if it is one of the known, deliberate differences (module docstring of bfcl.py)."""
    if ours and not theirs and len(calls) > 1:
        # BFCL matches parallel calls greedily: for each expected call it takes the FIRST model call that
        # fits. When one model call fits two expected calls, greedy can take it for the wrong one and
        # reject a correct answer. Seen in parallel_178: expected call 0 accepts company "Microsoft" OR
        # "Apple" on 2022-01-01, so in shuffled orders it grabs the Apple call that expected call 2 needs.
        # We use a maximum bipartite matching; BFCL accepts the same calls once they are in its order.
        if any(bfcl_check(example, list(order)) for order in _orders(calls)):
            return "greedy_parallel_matching"
    if ours and not theirs and kind == "ints_for_floats":
        # BFCL turns an int into a float at top level but not inside arrays: [1, 2] for an array of
        # floats fails its item type check unless the possible answer is written with ints (seen in
        # simple_python_82: numbers [12, 15, ...] vs [[12.0, 15.0, ...]]). We accept it, as at top level.
        return "int_items_in_float_array"
    return None


def _orders(calls):
    from itertools import islice, permutations

    return islice(permutations(calls), 720)  # at most 6! orders; BFCL's largest case has 8 calls


def test_checker_agrees_with_bfcl_ast_checker(bfcl_ast_checker):
    task, examples = all_examples()
    assert {e["category"] for e in examples} == {"simple_python", "multiple", "parallel", "parallel_multiple",
                                                 "live_simple", "live_multiple"}
    counts, disagreements, unexplained, accepted = Counter(), Counter(), [], Counter()
    for example in examples:
        for kind, calls in variants(example):
            ours = task.verify(example, json.dumps(calls))
            theirs = bfcl_ast_checker(example, calls)
            counts[kind] += 1
            accepted[kind] += ours
            if ours != theirs:
                why = explain(example, calls, kind, ours, theirs, bfcl_ast_checker)
                disagreements[(kind, why or "UNEXPLAINED", f"ours={ours}")] += 1
                if why is None:
                    unexplained.append((example["id"], kind, calls))
    total, agree = sum(counts.values()), sum(counts.values()) - sum(disagreements.values())
    print(f"\n{total} cases, agreement {agree / total:.4%}; cases by kind {dict(counts)}")
    print(f"accepted by ours, by kind: {dict(accepted)}")
    for key, n in sorted(disagreements.items()):
        print("disagreement", key, n)
    assert total >= 2000
    assert agree / total >= 0.99
    assert not unexplained, f"{len(unexplained)} unexplained disagreements, first: {unexplained[:3]}"
    # The corruptions must really be wrong and the canonical answers mostly right, or agreement is hollow.
    assert accepted["canonical"] >= 0.95 * counts["canonical"]
    assert accepted["wrong_name"] == 0 and accepted["extra_arg"] == 0
