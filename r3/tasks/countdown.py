"""Countdown: reach a target with the given numbers and + - * /, each used once (docs/method.md section 6).

Data comes from a seeded generator of solvable problems (the public Countdown-Tasks-3to4 set is itself
generated, so a generator with a seed is a faithful substitute) or from rows `{target, nums}` of a
JSONL/JSON/parquet file such as that set. Train and test are assigned by a hash of the problem, so they
can never share one. The one-shot example has the problem's count of numbers and only the task's
operators (ONESHOTS), and is never a problem of the data. The verifier reads the answer with `ast` and
evaluates it with exact fractions.

What it does not do: call eval() on model text, give partial credit, ask for chain of thought or
<answer> tags (the paper's prompts were one-shot without chain of thought, docs/method.md section 3).
"""
import ast
import operator
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

from r3.tasks import TaskDataError, question_turns, read_rows, require_nonempty, split_of

REFLECTION_PROMPT = (
    "You tried solving the problem and got the wrong answer. Reflect on what went wrong and write a short "
    "explanation that will help you do better next time."
)
QUESTION = (
    "Using the numbers {nums}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Return only the equation."
)
# The worked example of the one-shot prompt, one per (count of numbers, operators): it has as many numbers as
# the problem it follows and uses only the operators the task builds targets with. A 3-number sum shown
# before 2-number problems made the default model append its last term ("a + b + 3") to 30 of 35 wrong
# answers. Hand-picked for the presets' shapes; any other shape gets a generated one
# (oneshot_example). Examples are removed from the data by id, so one never shows a test answer.
# NOTE: the 2-number +/- example is a sum. After "9 - 4" the default model's greedy answers used a number
# not given (often the target) in 28 of 69 failures; after "4 + 9" every answer is "a + b" with the given
# numbers, so it fails exactly the difference problems, and what GRPO must teach is when to subtract.
ONESHOTS = {  # (count, ops): (nums, target, solution)
    (2, "+-*/"): ([4, 9], 36, "9 * 4"),
    (3, "+-*/"): ([4, 9, 3], 39, "(9 + 4) * 3"),
    (4, "+-*/"): ([4, 9, 3, 7], 32, "(9 + 4) * 3 - 7"),
    (2, "+-"): ([4, 9], 13, "4 + 9"),
    (3, "+-"): ([4, 9, 3], 8, "9 - 4 + 3"),
    (4, "+-"): ([4, 9, 3, 7], 9, "9 + 7 - 4 - 3"),
    (2, "+"): ([4, 9], 13, "4 + 9"),
    (3, "+"): ([4, 9, 3], 16, "4 + 9 + 3"),
    (4, "+"): ([4, 9, 3, 7], 23, "4 + 9 + 3 + 7"),
}
ONESHOT_SEED = 14  # seed of the generated example for shapes not in ONESHOTS (numbers 1-9, targets <= 50)

MAX_TEXT_CHARS = 20_000  # a no-CoT answer is a few dozen characters; longer text is rejected unread
MAX_EQUATION_CHARS = 1_000  # the extracted candidate; bounds the cost of ast.parse before it runs
MAX_MAGNITUDE = 10**12  # cap on |numerator| and denominator of every intermediate value
STALL = 2_000  # the generator stops after this many draws in a row that give no new problem

# Spellings of the operators that models write, mapped to the ASCII ones. "x" is NOT accepted as a
# multiplication sign: it is a letter, and words around the equation would turn into operators.
_SYMBOLS = {"×": "*", "\\times": "*", "\\cdot": "*", "·": "*", "÷": "/", "\\div": "/", "−": "-", "–": "-"}
_LATEX_DELIMS = re.compile(r"\\[()\[\]]")  # \( \) \[ \] around inline maths
_RUN = re.compile(r"[0-9+\-*/(). \t]+")  # maximal runs of characters an equation may contain
_OPERATOR = re.compile(r"[+\-*/]")
_DIGIT = re.compile(r"[0-9]")
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div)
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass
class Countdown:
    name: str = "countdown"
    n_numbers: int | tuple | list = (3, 4)  # numbers per problem; a tuple: drawn uniformly per problem
    max_number: int = 99  # generated numbers are drawn from 1..max_number, repeats allowed (as in 3to4)
    max_target: int = 100  # generated targets are integers in 1..max_target
    seed: int = 0  # generator seed
    num_examples: int | None = 20_000  # pool size before the split (file: first N; None: all / 20,000)
    test_fraction: float = 0.1  # share of the pool held out as test, chosen by hash of the problem
    data_path: str | None = None  # JSONL/JSON/parquet rows with `target` and `nums`; None: generate
    oneshot: bool = True  # a worked example of the problem's shape as a user/assistant pair before the question
    ops: str = "+-*/"  # operators the generator builds targets with (the verifier always accepts all four)
    val_examples: int = 0  # the last N training problems held back as split "val" (for choosing settings)
    oneshot_numbers: int = 0  # numbers in the one-shot example (0: as many as the problem; else a mismatched one)
    oneshot_ops: str = ""  # operators of the one-shot example ("": the task's ops)
    reflection_prompt: ClassVar[str] = REFLECTION_PROMPT
    _pool: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if min(self._sizes()) < 2 or self.max_number < 1 or self.max_target < 1:
            raise TaskDataError(f"task {self.name!r}: n_numbers must be >= 2 and max_number, max_target >= 1; "
                                f"got {self.n_numbers}, {self.max_number}, {self.max_target}")
        if not self.ops or set(self.ops) - set("+-*/"):
            raise TaskDataError(f"task {self.name!r}: ops must be a non-empty subset of '+-*/', got {self.ops!r}")
        if self.val_examples < 0:
            raise TaskDataError(f"task {self.name!r}: val_examples must be >= 0, got {self.val_examples}")
        if not 0 <= self.test_fraction < 1:
            raise TaskDataError(f"task {self.name!r}: test_fraction must be in [0, 1), got {self.test_fraction}")
        self._oneshots()  # a shape with no example fails here, before any model loads

    def examples(self, split: str) -> list[dict]:
        """'train', 'val' or 'test' problems: dicts {id, nums, target} (+ `solution` when generated). 'val'
        is the last `val_examples` of the training problems, which 'train' then leaves out."""
        if split not in ("train", "val", "test"):
            raise TaskDataError(f"unknown split {split!r} for task {self.name!r}; use 'train', 'val' or 'test'")
        if self._pool is None:
            self._pool = {"train": [], "test": []}
            shown = {shot["id"] for shot in self._oneshots()}  # an example shown is never a problem of the data
            for ex in self._load():
                if ex["id"] not in shown:
                    self._pool[split_of(ex["id"], self.test_fraction)].append(ex)
            cut = len(self._pool["train"]) - self.val_examples
            self._pool["train"], self._pool["val"] = self._pool["train"][:cut], self._pool["train"][cut:]
        hint = (f"raise num_examples (now {self.num_examples}), test_fraction (now {self.test_fraction}) or "
                f"val_examples (now {self.val_examples})")
        return list(require_nonempty(self._pool[split], self.name, split, hint))

    def prompt(self, example: dict) -> list[dict]:
        """The question as the last user turn; with `oneshot`, one solved example as a user/assistant pair
        before it (a chat-format example is what makes a small model answer with a bare equation). The
        retry re-asks only the last turn. The example has as many numbers as `example` (oneshot_example)."""
        question = QUESTION.format(nums=list(example["nums"]), target=example["target"])
        if not self.oneshot:
            return question_turns(question)
        shot = oneshot_example(self.oneshot_numbers or len(example["nums"]), self.oneshot_ops or self.ops)
        return question_turns(question, (QUESTION.format(nums=shot["nums"], target=shot["target"]), shot["solution"]))

    def verify(self, example: dict, text: str) -> bool:
        return verify_equation(text, example["nums"], example["target"])

    def hint(self, example: dict) -> str | None:
        """A reflection naming the fix (the numbers, each once, and the reference solution's operations)
        without the equation; None without a reference solution (problems read from a file)."""
        if "solution" not in example:
            return None
        names = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}
        used = " and ".join(names[op] for op in "+-*/" if op in example["solution"])
        return (f"My equation was wrong. A right one uses only the numbers {list(example['nums'])}, each exactly "
                f"once, combined with {used}.")

    def answer(self, example: dict) -> str | None:
        return f"My equation was wrong. The right equation is {example['solution']}." if "solution" in example else None

    def _sizes(self) -> list[int]:
        return [self.n_numbers] if isinstance(self.n_numbers, int) else list(self.n_numbers)

    def _oneshots(self) -> list[dict]:
        if not self.oneshot:
            return []
        return [oneshot_example(self.oneshot_numbers or k, self.oneshot_ops or self.ops) for k in self._sizes()]

    def _load(self) -> list[dict]:
        if self.data_path is not None:
            return load_problems(self.data_path, self._sizes(), self.num_examples)
        return generate(self.num_examples or 20_000, self._sizes(), self.max_number, self.max_target, self.seed,
                        self.ops)


# --- data -------------------------------------------------------------------------------------------

def problem_id(nums, target: int) -> str:
    """Identity of a problem: the multiset of numbers and the target (the order of `nums` does not count)."""
    return f"countdown-{sorted(nums)}-{target}".replace(" ", "")


def generate(n: int, sizes: list[int], max_number: int, max_target: int, seed: int, ops: str = "+-*/") -> list[dict]:
    """Up to `n` distinct solvable problems: random numbers, a random expression over all of them, and
    its value as the target when that is a positive integer <= max_target (the expression is `solution`)."""
    rng = random.Random(seed)
    seen, problems, misses = set(), [], 0
    # A small space (few numbers, small targets) may hold fewer than n problems: stop once new ones
    # have become rare (STALL draws in a row without one) instead of drawing forever.
    while len(problems) < n and misses < STALL:
        misses += 1
        nums = [rng.randint(1, max_number) for _ in range(rng.choice(sizes))]
        text, value = random_expression(nums, rng, ops)
        if value is None or value.denominator != 1 or not 1 <= value <= max_target:
            continue
        pid = problem_id(nums, int(value))
        if pid not in seen:
            seen.add(pid)
            problems.append({"id": pid, "nums": nums, "target": int(value), "solution": text})
            misses = 0
    return problems


def oneshot_example(size: int, ops: str) -> dict:
    """The worked example shown before a problem of `size` numbers: {id, nums, target, solution}, with
    only the operators in `ops`. From ONESHOTS when it has the shape, else the first problem the generator
    draws with ONESHOT_SEED (numbers 1-9); a shape the generator cannot fill is a TaskDataError."""
    ops = "".join(op for op in "+-*/" if op in ops)  # one key per set of operators, whatever the order
    if (size, ops) in ONESHOTS:
        nums, target, solution = ONESHOTS[size, ops]
        return {"id": problem_id(nums, target), "nums": list(nums), "target": target, "solution": solution}
    drawn = generate(1, [size], 9, 50, ONESHOT_SEED, ops)
    if not drawn:
        raise TaskDataError(f"no one-shot example with {size} numbers and operators {ops!r} (numbers 1-9, "
                            f"targets <= 50); use other ops or oneshot=false")
    return drawn[0]


def random_expression(nums: list[int], rng: random.Random, ops: str = "+-*/") -> tuple[str, Fraction | None]:
    """A random binary tree over a shuffled copy of `nums` with random + - * /; (text, exact value).
    The value is None after a division by zero or past MAX_MAGNITUDE. Inner nodes are parenthesised."""
    order = list(nums)
    rng.shuffle(order)

    def build(leaves):
        if len(leaves) == 1:
            return str(leaves[0]), Fraction(leaves[0])
        k = rng.randint(1, len(leaves) - 1)
        (lt, lv), (rt, rv) = build(leaves[:k]), build(leaves[k:])
        op = rng.choice(ops)
        if lv is None or rv is None or (op == "/" and rv == 0):
            return "", None
        value = _OPS[op](lv, rv)
        if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
            return "", None  # the verifier would reject it (huge max_number only)
        wrap = lambda t: t if t.isdigit() else f"({t})"  # noqa: E731
        return f"{wrap(lt)} {op} {wrap(rt)}", value

    return build(order)


def load_problems(path, sizes: list[int], limit: int | None) -> list[dict]:
    """Distinct problems from rows with integer `target` and a list of integers `nums`; rows whose
    number count is not in `sizes` are skipped (so countdown3/countdown4 can share one 3-to-4 file)."""
    seen, problems = set(), []
    for i, row in enumerate(read_rows(path), start=1):
        nums, target = row.get("nums"), row.get("target")
        if not (_is_int(target) and isinstance(nums, list) and nums and all(_is_int(n) for n in nums)):
            raise TaskDataError(f"{path}: row {i} needs an integer `target` and a list of integers `nums`, "
                                f"got target={target!r} nums={nums!r}")
        pid = problem_id(nums, target)
        if len(nums) in sizes and pid not in seen:
            seen.add(pid)
            problems.append({"id": pid, "nums": list(nums), "target": target})
        if limit is not None and len(problems) == limit:
            break
    return problems


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- verifier ---------------------------------------------------------------------------------------

def extract_equation(text: str) -> str | None:
    """The answer's equation, read forgivingly: the last line that holds one, and in it the last run of
    equation characters (digits, + - * /, parentheses, spaces) that has a digit and an operator.

    So code fences, "Equation:" / "Answer:" prefixes, markdown and surrounding words fall away, and a
    trailing "= 16" (or "= anything") is dropped because "=" ends a run and "16" alone has no operator.
    × · \\times \\cdot ÷ \\div − are read as * / -; a trailing period and markdown emphasis (**...**) are
    dropped. An equation that touches a letter (a call such as "abs(9 + 4) * 3") gives None.
    NOTE: "abs (9 + 4) * 3", with a space, passes as "(9 + 4) * 3": words are not told apart from names.
    """
    for symbol, ascii_op in _SYMBOLS.items():
        text = text.replace(symbol, ascii_op)
    text = _LATEX_DELIMS.sub(" ", text)
    for line in reversed(text.splitlines()):
        found = None
        for match in _RUN.finditer(line):
            raw = match.group()
            run = raw.strip(" \t").rstrip(".")
            if run.startswith("*"):  # markdown emphasis, not a product: "**(9 + 4) * 3**", "**Answer:** 9 + 4"
                run = run.strip("* \t").rstrip(".")
            run = run.strip(" \t")
            if _DIGIT.search(run) and _OPERATOR.search(run):
                start = match.start() + raw.find(run)
                found = run, start, start + len(run)
        if found is not None:
            # An equation glued to a word is part of something else: "abs(9 + 4) * 3", "max(3, 4) + 1".
            run, start, end = found
            neighbours = line[max(start - 1, 0): start] + line[end: end + 1]
            return None if any(c.isalpha() or c == "_" for c in neighbours) else run
    return None


def verify_equation(text: str, nums: list[int], target: int) -> bool:
    """True iff the answer's equation uses exactly the given numbers (as a multiset) with + - * / and
    parentheses, and its exact value is within 1e-5 of `target`. Never raises; never evaluates Python.

    Real division: intermediates need not be integers, so (1 / 3) * 3 counts as 1 (docs/method.md section 6).
    NOTE: unary minus (and unary plus) is rejected. The given numbers are positive, and the paper's
    verifier admits only digits, operators, parentheses and spaces, so "-3 + 5" would need a negative
    literal that was never given; "5 - 3" says the same thing legally.
    """
    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
        return False
    candidate = extract_equation(text)
    if candidate is None or len(candidate) > MAX_EQUATION_CHARS:
        return False
    try:
        tree = ast.parse(candidate, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # 10k parentheses: SyntaxError/RecursionError
        return False
    literals = []
    for node in ast.walk(tree):  # iterative: safe on deep trees
        if isinstance(node, ast.Constant) and type(node.value) is int:  # bool/float/str constants fail
            literals.append(node.value)
        elif not isinstance(node, _ALLOWED_NODES):  # **, %, //, unary ops, names, calls, tuples, ...
            return False
    if sorted(literals) != sorted(nums):
        return False
    value = _evaluate(tree.body)  # safe to recurse now: the tree has only len(nums) leaves
    return value is not None and abs(value - target) < 1e-5


def _evaluate(node) -> Fraction | None:
    """Exact value of a checked tree; None on division by zero or an intermediate over MAX_MAGNITUDE."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
        return None
    value = _OPS[_AST_OPS[type(node.op)]](left, right)
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        return None
    return value
