"""Countdown (r3/tasks/countdown.py): the verifier's truth table, agreement with an independent evaluator
on random expression trees, safety on hostile text, solvable generated problems, disjoint seeded splits,
the JSONL/parquet loader and its error messages, and the registry's presets and options.

The reference for the verifier is the value of an expression tree computed while the tree is built
(exact fractions), never a parse of the rendered text.
"""
import json
import re
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r3.tasks import REGISTRY, TaskDataError, get_task
from r3.tasks.countdown import REFLECTION_PROMPT, generate, oneshot_example, verify_equation

NUMS, TARGET = [4, 9, 3], 39
FAST = 0.05  # seconds: every verify call, whatever the text

TRUTH_TABLE = [
    # (text, nums, target, accepted, why)
    ("(9 + 4) * 3", NUMS, TARGET, True, "correct"),
    ("3*(4+9)", NUMS, TARGET, True, "correct, other order, no spaces"),
    ("9 * 4 + 3", NUMS, TARGET, True, "another correct solution"),
    ("(9 + 4) + 3", NUMS, TARGET, False, "wrong value"),
    ("(9 + 4) * 3 + 3 - 3", NUMS, TARGET, False, "a number reused"),
    ("(9 + 4) * 3", [4, 9, 3, 1], TARGET, False, "a given number missing"),
    ("(10 + 3) * 3", NUMS, TARGET, False, "a number that was not given"),
    ("(9 + 4) * 3 + 0", NUMS, TARGET, False, "an extra zero"),
    ("((9 + 4) * 3", NUMS, TARGET, False, "unbalanced parentheses"),
    ("(9 + 4)) * 3", NUMS, TARGET, False, "unbalanced parentheses"),
    ("2 + 5 / (5 - 5)", [5, 5, 2], 2, False, "division by zero"),
    ("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24, True, "real division: non-integer intermediates"),
    ("(1 / 3) * 3 + 5", [1, 3, 3, 5], 6, True, "1/3 is kept exact"),
    ("**(9 + 4) * 3**", NUMS, TARGET, True, "markdown bold"),
    ("(9 + 4) * 3 *", NUMS, TARGET, False, "a dangling operator"),
    ("**Answer:** (9 + 4) * 3", NUMS, TARGET, True, "markdown bold label"),
    ("9 / 4 * 3", NUMS, 7, False, "27/4 is not 7 (no integer division)"),
    ("3 ** 2 * 1", [3, 2, 1], 9, False, "exponent"),
    ("9 // 4 + 3", NUMS, 5, False, "floor division"),
    ("9 % 4 + 3", NUMS, 4, False, "modulo"),
    ("-4 + 9 * 3", NUMS, 23, False, "unary minus"),
    ("+4 + 9 * 3", NUMS, 31, False, "unary plus"),
    ("(9.0 + 4) * 3", NUMS, TARGET, False, "float literal"),
    ("abs(9 + 4) * 3", NUMS, TARGET, False, "a call"),
    ("max(9, 4) * 3 + 12", NUMS, TARGET, False, "a call with a tuple"),
    ("(9 + 4) * 3 * True", NUMS, TARGET, False, "a name (bool)"),
    ("9, 4, 3", NUMS, TARGET, False, "a tuple"),
    ("The answer is (9 + 4) * 3, as required.", NUMS, TARGET, True, "text around the equation"),
    ("```\n(9 + 4) * 3\n```", NUMS, TARGET, True, "code fence"),
    ("```python\n(9 + 4) * 3\n```", NUMS, TARGET, True, "code fence with a language"),
    ("`(9 + 4) * 3`", NUMS, TARGET, True, "inline code"),
    ("(9 + 4) * 3 = 39", NUMS, TARGET, True, "trailing = target"),
    ("(9 + 4) * 3 = 40", NUMS, TARGET, True, "trailing = anything is dropped"),
    ("39 = (9 + 4) * 3", NUMS, TARGET, True, "leading target ="),
    ("Equation: (9 + 4) * 3", NUMS, TARGET, True, "Equation: prefix"),
    ("**Answer:** (9 + 4) * 3.", NUMS, TARGET, True, "markdown prefix, trailing period"),
    ("\\((9 + 4) \\times 3\\)", NUMS, TARGET, True, "LaTeX times and delimiters"),
    ("(9 + 4) × 3", NUMS, TARGET, True, "unicode times"),
    ("(9 + 4) x 3", NUMS, TARGET, False, "letter x is not multiplication"),
    ("(9 + 4) * 3\nso the answer is 13 * 3", NUMS, TARGET, False, "the LAST equation counts"),
    ("9 + 4 = 13\n13 * 3 = 39\n(9 + 4) * 3", NUMS, TARGET, True, "steps, then the equation"),
    ("", NUMS, TARGET, False, "empty"),
    ("39", NUMS, TARGET, False, "just the target"),
    ("(9 + 4) * 3" + " " * 30_000, NUMS, TARGET, False, "over-long text is rejected unread"),
]


@pytest.mark.parametrize("text,nums,target,accepted,why", TRUTH_TABLE, ids=[row[-1] for row in TRUTH_TABLE])
def test_verifier_truth_table(text, nums, target, accepted, why):
    assert verify_equation(text, nums, target) is accepted, why


def timed_verify(text, nums=NUMS, target=TARGET) -> bool:
    start = time.perf_counter()
    result = verify_equation(text, nums, target)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST, f"{elapsed * 1e3:.1f} ms on {text[:60]!r}..."
    return result


HOSTILE = {  # name: (text, accepted)
    "pow-tower": ("9**9**9", False),
    "pow-tower4": ("9 ** 9 ** 9 ** 9", False),
    "10k-parens": ("(" * 10_000 + "9" + ")" * 10_000, False),
    "4k-parens": ("(" * 4_000 + "9" + ")" * 4_000, False),
    "300-parens": ("(" * 300 + "(9+4)*3" + ")" * 300, False),  # deeper than Python's parser allows
    "150-parens-valid": ("(" * 150 + "(9+4)*3" + ")" * 150, True),
    "400-terms": ("1+" * 400 + "1", False),
    "5k-digit-literal": ("9" * 5_000 + "+4*3", False),
    "1MB-letters": ("x" * 1_000_000, False),
    "1MB-equations": ("(9 + 4) * 3 " * 90_000, False),
    "19k-newlines-valid": ("\n" * 19_000 + "(9+4)*3", True),
    "dashes": ("-" * 19_999, False),
    "huge-intermediate": ("(9 * 4 * 3)", False),
}


@pytest.mark.parametrize("text,accepted", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_handled_fast(text, accepted):
    assert timed_verify(text) is accepted


def test_intermediates_beyond_the_magnitude_cap_are_rejected():
    big = 10**6
    assert verify_equation(f"{big} * {big} / {big}", [big, big, big], big)  # 10**12: at the cap
    assert not verify_equation(f"{big} * {big} * 10 / {big} / 10", [big, big, 10, big, 10], big)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/() .=xX\n`:abc×÷\\")) | st.characters(),
               max_size=300))
def test_random_text_never_raises_and_is_fast(text):
    assert timed_verify(text) in (True, False)


@st.composite
def expression_trees(draw):
    """(text, value, nums): a random tree over 1-5 numbers, rendered with random spacing; value is the
    exact value computed on the tree (None after a division by zero) - the independent reference."""
    def build(depth):
        if depth == 0 or draw(st.booleans()):
            n = draw(st.integers(1, 30))
            return str(n), Fraction(n), [n]
        op = draw(st.sampled_from("+-*/"))
        (lt, lv, ln), (rt, rv, rn) = build(depth - 1), build(depth - 1)
        value = None
        if lv is not None and rv is not None and not (op == "/" and rv == 0):
            value = {"+": lambda: lv + rv, "-": lambda: lv - rv, "*": lambda: lv * rv, "/": lambda: lv / rv}[op]()
        space = draw(st.sampled_from(["", " ", "  "]))
        return f"({lt}{space}{op}{space}{rt})", value, ln + rn

    text, value, nums = build(draw(st.integers(1, 3)))
    return text, value, nums


@settings(max_examples=300, deadline=None)
@given(expression_trees(), st.integers(-5, 5), st.randoms(use_true_random=False))
def test_random_expression_trees_agree_with_exact_evaluation(tree, offset, rnd):
    text, value, nums = tree
    rnd.shuffle(nums)  # the order of the given numbers must not matter
    target = int(value) + offset if value is not None and value.denominator == 1 else 7
    # The paper's rule on the reference value; a lone number has no operator, so it is no equation.
    expected = value is not None and abs(value - target) < 1e-5 and len(nums) > 1
    assert timed_verify(text, nums, target) is expected, (text, value, target)


def test_unary_minus_is_rejected_even_when_the_value_is_right():
    assert verify_equation("9 * 3 - 4", [9, 3, 4], 23)
    assert not verify_equation("-4 + 9 * 3", [9, 3, 4], 23)


# --- generated problems and splits ------------------------------------------------------------------

def test_generated_problems_are_solvable_by_their_own_solution():
    task = get_task("countdown", num_examples=2_000, seed=3)
    for ex in task.examples("train") + task.examples("test"):
        assert task.verify(ex, ex["solution"]), ex
        assert 3 <= len(ex["nums"]) <= 4 and all(1 <= n <= 99 for n in ex["nums"]) and 1 <= ex["target"] <= 100


@pytest.mark.parametrize("name,sizes,max_number,max_target", [
    ("countdown3", {3}, 99, 100), ("countdown4", {4}, 99, 100), ("countdown_easy", {2}, 20, 40),
    ("countdown2", {2}, 50, 100), ("countdown_sum3shot", {2}, 40, 80), ("countdown_easy_sum3shot", {2}, 20, 40),
])
def test_presets_respect_their_difficulty(name, sizes, max_number, max_target):
    examples = get_task(name, num_examples=300).examples("train")
    assert {len(e["nums"]) for e in examples} == sizes
    assert max(n for e in examples for n in e["nums"]) <= max_number
    assert max(e["target"] for e in examples) <= max_target


def test_generator_uses_only_the_allowed_operators():
    examples = get_task("countdown_easy", num_examples=300).examples("train")
    assert not any(set(e["solution"]) & set("*/") for e in examples)
    assert any("-" in e["solution"] for e in examples) and any("+" in e["solution"] for e in examples)
    with pytest.raises(TaskDataError, match="ops must be a non-empty subset"):
        get_task("countdown", ops="+^")


def test_options_override_presets():
    examples = get_task("countdown_easy", n_numbers=4, max_number=5, max_target=10, num_examples=100).examples("train")
    assert {len(e["nums"]) for e in examples} == {4} and max(e["target"] for e in examples) <= 10


def test_splits_are_disjoint_and_deterministic_by_seed():
    a, b, c = (get_task("countdown", num_examples=3_000, seed=s) for s in (0, 0, 1))
    key = lambda e: (tuple(sorted(e["nums"])), e["target"])  # noqa: E731
    train, test = {key(e) for e in a.examples("train")}, {key(e) for e in a.examples("test")}
    assert train.isdisjoint(test) and 0.05 < len(test) / (len(train) + len(test)) < 0.15
    assert a.examples("train") == b.examples("train") and a.examples("test") == b.examples("test")
    assert a.examples("train") != c.examples("train")
    # The split follows the problem, not the seed: no seed can put a test problem into training.
    assert test.isdisjoint({key(e) for e in c.examples("train")})


def test_countdown2_holds_out_at_least_400_problems_none_of_them_in_train():
    """countdown_easy holds out 40 problems, too few to tell runs apart; countdown2 holds out >= 400."""
    task = get_task("countdown2")
    key = lambda e: (tuple(sorted(e["nums"])), e["target"])  # noqa: E731
    train, test = [key(e) for e in task.examples("train")], [key(e) for e in task.examples("test")]
    assert len(set(test)) == len(test) >= 400, len(test)
    assert set(train).isdisjoint(test)


def test_examples_survive_a_json_round_trip():
    ex = get_task("countdown", num_examples=50).examples("train")[0]
    assert json.loads(json.dumps(ex)) == ex


def test_prompt_is_the_paper_question_with_an_optional_worked_example():
    ex = {"nums": [1, 2, 3], "target": 6}
    plain = get_task("countdown", oneshot=False).prompt(ex)
    assert plain == [{"role": "user", "content": "Using the numbers [1, 2, 3], create an equation that equals 6. "
                      "You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
                      "once. Return only the equation."}]
    shot = get_task("countdown").prompt(ex)
    assert [m["role"] for m in shot] == ["user", "assistant", "user"] and shot[-1] == plain[0]
    assert shot[1]["content"] == "(9 + 4) * 3" and shot[0]["content"].startswith("Using the numbers [4, 9, 3]")
    assert get_task("countdown", ops="+").prompt(ex)[1]["content"] == "4 + 9 + 3"
    assert get_task("countdown").reflection_prompt == REFLECTION_PROMPT and "wrong answer" in REFLECTION_PROMPT


SHOWN = re.compile(r"^Using the numbers \[([0-9, ]+)\], create an equation that equals ([0-9]+)\. ")
# presets whose one-shot example matches each problem's shape (countdown_sum3shot mismatches it on purpose)
COUNTDOWN_PRESETS = [name for name, (module, _, opts) in REGISTRY.items()
                     if module == "countdown" and not opts.get("oneshot_numbers")]


def shown_example(task, example) -> tuple[list[int], int, str]:
    """(nums, target, solution) of the worked example in the prompt, read back from the rendered turns."""
    question, answer, last = task.prompt(example)
    assert (question["role"], answer["role"], last["role"]) == ("user", "assistant", "user")
    nums, target = SHOWN.match(question["content"]).groups()
    return [int(n) for n in nums.split(",")], int(target), answer["content"]


@pytest.mark.parametrize("options", [{}, {"n_numbers": (2, 3, 4, 5)}, {"ops": "+"}, {"ops": "-*"}, {"ops": "/"}],
                         ids=["preset", "sizes-2-to-5", "ops+", "ops-*", "ops/"])
@pytest.mark.parametrize("name", COUNTDOWN_PRESETS)
def test_oneshot_example_matches_each_problem_and_verifies(name, options):
    """A 3-number sum shown before 2-number problems made the model append its last term."""
    task = get_task(name, num_examples=200, **options)
    ops = task.ops
    seen_sizes = set()
    for ex in task.examples("train")[:60] + task.examples("test")[:20]:
        nums, target, solution = shown_example(task, ex)
        assert len(nums) == len(ex["nums"]), (ex, nums)
        assert set(re.findall(r"[+\-*/]", solution)) <= set(ops), (solution, ops)
        assert verify_equation(solution, nums, target), (nums, target, solution)
        assert (sorted(nums), target) != (sorted(ex["nums"]), ex["target"]), "the example shows the answer"
        seen_sizes.add(len(nums))
    assert seen_sizes == {len(e["nums"]) for e in task.examples("train")}, "every size met its own example"


def test_oneshot_example_is_never_a_problem_of_the_data(tmp_path):
    # A space small enough to be generated whole holds the 2-number +/- example ([4, 9] -> 13): the
    # generator draws it, and the task drops it from both splits.
    small = {"max_number": 9, "max_target": 20, "num_examples": 1_000}
    shown = oneshot_example(2, "+-")
    drawn = {e["id"] for e in generate(1_000, [2], 9, 20, 0, "+-")}
    assert shown["id"] in drawn
    task = get_task("countdown_easy", **small)
    pool = task.examples("train") + task.examples("test")
    assert shown["id"] not in {e["id"] for e in pool} and len(pool) == len(drawn) - 1
    # Rows of a file are data too: a row equal to the example is dropped, the others are kept.
    path = tmp_path / "rows.jsonl"
    rows = [{"target": shown["target"], "nums": shown["nums"][::-1]}, {"target": 7, "nums": [3, 4]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = get_task("countdown_easy", data_path=str(path), test_fraction=0.0).examples("train")
    assert [(e["nums"], e["target"]) for e in loaded] == [([3, 4], 7)]


def test_a_shape_with_no_oneshot_example_fails_when_the_task_is_built():
    # Ten numbers 1-9 whose product is <= 50 are (almost) all ones: the generator gives up.
    with pytest.raises(TaskDataError, match=r"no one-shot example with 10 numbers and operators '\*'"):
        get_task("countdown", n_numbers=10, ops="*")
    assert get_task("countdown", n_numbers=10, ops="*", oneshot=False, num_examples=5).prompt(
        {"nums": [1] * 10, "target": 1})[0]["role"] == "user"


# --- loading files and errors -----------------------------------------------------------------------

ROWS = [{"target": 39, "nums": [4, 9, 3]}, {"target": 24, "nums": [8, 3, 8, 3]}, {"target": 10, "nums": [5, 2, 1]}]


def test_loader_reads_jsonl_and_parquet_alike(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    loaded = []
    # oneshot=False: ROWS[0] is the 3-number one-shot example, which a task showing it drops from its data
    # (test_oneshot_example_is_never_a_problem_of_the_data); here every row must come back as written.
    for path in (tmp_path / "p.jsonl", tmp_path / "p.parquet"):
        task = get_task("countdown", data_path=str(path), test_fraction=0.0, oneshot=False)
        loaded.append(task.examples("train"))
    assert loaded[0] == loaded[1]
    assert [(e["nums"], e["target"]) for e in loaded[0]] == [(r["nums"], r["target"]) for r in ROWS]
    three = get_task("countdown3", data_path=str(tmp_path / "p.parquet"), test_fraction=0.0,
                     oneshot=False).examples("train")
    assert [e["target"] for e in three] == [39, 10]  # countdown3 keeps the 3-number rows of a 3-to-4 file


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"target": 5, "nums": [1, 2' + "\n")
    with pytest.raises(TaskDataError, match=rf"{path.name}:2: malformed JSON line"):
        get_task("countdown", data_path=str(path)).examples("train")


def test_bad_row_and_missing_file_errors_name_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"target": "39", "nums": [4, 9, 3]}) + "\n")
    with pytest.raises(TaskDataError, match=r"rows.jsonl: row 1 needs an integer `target`"):
        get_task("countdown", data_path=str(path)).examples("train")
    with pytest.raises(TaskDataError, match=r"data file not found: .*nowhere.jsonl"):
        get_task("countdown", data_path=str(tmp_path / "nowhere.jsonl")).examples("train")


def test_empty_split_is_a_clear_error():
    with pytest.raises(TaskDataError, match=r"split 'test' of task 'countdown' is empty"):
        get_task("countdown", num_examples=3, test_fraction=0.0).examples("test")
    with pytest.raises(TaskDataError, match="unknown split 'dev'"):
        get_task("countdown").examples("dev")


def test_registry_names_known_tasks_and_options():
    with pytest.raises(TaskDataError, match=r"unknown task 'countdwn'; known tasks: .*countdown_easy"):
        get_task("countdwn")
    with pytest.raises(TaskDataError, match=r"unknown option\(s\) \['n_nums'\] for task 'countdown'"):
        get_task("countdown", n_nums=3)
    with pytest.raises(TaskDataError, match=r"n_numbers must be >= 2"):
        get_task("countdown", n_numbers=(1, 3))
    with pytest.raises(TaskDataError, match=r"test_fraction must be in \[0, 1\)"):
        get_task("countdown", test_fraction=1.5)
    assert get_task("countdown4").name == "countdown4"


def test_val_split_is_the_end_of_train_and_train_leaves_it_out():
    plain, held = get_task("countdown2"), get_task("countdown2", val_examples=200)
    train, val, test = (held.examples(s) for s in ("train", "val", "test"))
    assert len(val) == 200 and train + val == plain.examples("train") and test == plain.examples("test")
    ids = [{e["id"] for e in x} for x in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    with pytest.raises(TaskDataError, match="val_examples"):
        get_task("countdown2", val_examples=-1)


def test_sum3shot_shows_the_three_number_sum_before_two_number_problems():
    task = get_task("countdown_sum3shot")
    ex = task.examples("train")[0]
    shot_question, shot_answer, question = task.prompt(ex)
    assert len(ex["nums"]) == 2 and shot_answer["content"] == "4 + 9 + 3" and "[4, 9, 3]" in shot_question["content"]
    assert "equals 16" in shot_question["content"] and question["content"].endswith("Return only the equation.")
    assert len(task.examples("test")) >= 400 and len(task.examples("val")) == 200


def test_hint_names_the_operations_and_the_answer_spells_a_verified_equation():
    task = get_task("countdown_sum3shot")
    for ex in task.examples("train")[:50]:
        hint, answer = task.hint(ex), task.answer(ex)
        assert ex["solution"] not in hint and str(ex["nums"]) in hint
        assert ("subtraction" in hint) == ("-" in ex["solution"]) and ("addition" in hint) == ("+" in ex["solution"])
        assert verify_equation(answer.rsplit("is ", 1)[1].rstrip("."), ex["nums"], ex["target"])
    assert task.hint({"nums": [1, 2], "target": 3}) is None and task.answer({"nums": [1, 2], "target": 3}) is None


def test_the_main_jobs_preset_is_countdown_easy_after_the_three_number_sum():
    """countdown_easy_sum3shot = countdown_easy's problems and the mismatched one-shot, with enough training
    problems for the main job's 128 queries and disjoint val / test splits."""
    task, easy = get_task("countdown_easy_sum3shot"), get_task("countdown_easy", oneshot_numbers=3, oneshot_ops="+")
    train, val, test = (task.examples(s) for s in ("train", "val", "test"))
    assert len(train) >= 128 and len(val) == 100 and len(test) >= 120
    ids = [{e["id"] for e in split} for split in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert task.prompt(test[0]) == easy.prompt(test[0]) and task.prompt(test[0])[1]["content"] == "4 + 9 + 3"
