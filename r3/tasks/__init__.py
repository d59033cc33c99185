"""Tasks: the interface every task implements, the registry, and the row readers they share.

A task is what the training and sampling scripts need to know about a problem set, and nothing more:

    name: str                                   registry name, e.g. "countdown"
    reflection_prompt: str                      the paper's reflection request for this task (docs/method.md section 5)
    examples(split) -> list[dict]               "train" / "test" (bfcl also takes a category name); each a
                                                JSON-serialisable dict (they go into failures JSONL and back)
    prompt(example) -> list[dict]               chat messages of the first attempt, the question last (the
                                                retry re-asks only that turn; `question_turns` builds them)
    verify(example, text) -> bool               the binary reward; never raises, whatever the text

Optional, for the learnability check (bench/step0_signal.py), which writes reflections itself:

    hint(example) -> str | None                 a reflection that names the fix without the answer
    answer(example) -> str | None               a reflection that spells out a right answer

`get_task(name, **options)` builds one: a registered name, or `module:Class` for a task of one's own
(the module is imported from sys.path, e.g. a my_task.py next to train.py; `Class(**options)`).
Tasks load their data lazily, on the first `examples()` call.
This module does not render chat templates (r3/rollout.py) and does not sample (sample.py).

Errors a user can cause (unknown task, option or split; missing file, malformed line, empty split) raise
`TaskDataError`, an r3.errors.UserError (and a ValueError) whose message names the thing (file and
line) and the fix, so scripts can print it without a traceback.
"""
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Protocol

from r3.errors import UserError


class TaskDataError(UserError, ValueError):
    """A task asked for wrongly, or bad or missing data; the message names the thing and the fix."""


class Task(Protocol):
    name: str
    reflection_prompt: str

    def examples(self, split: str) -> list[dict]: ...

    def prompt(self, example: dict) -> list[dict]: ...

    def verify(self, example: dict, text: str) -> bool: ...


# name -> (module, class, preset options). Presets are only defaults: any option can be overridden
# through get_task(name, **options), so difficulty can be chosen by measurement, not by editing code.
REGISTRY = {
    "countdown": ("countdown", "Countdown", {"n_numbers": (3, 4), "max_number": 99, "max_target": 100}),
    "countdown3": ("countdown", "Countdown", {"n_numbers": 3, "max_number": 99, "max_target": 100}),
    "countdown4": ("countdown", "Countdown", {"n_numbers": 4, "max_number": 99, "max_target": 100}),
    # Chosen by measurement (bench/step0_signal.py, bench/RESULTS.md) as a setting where SmolLM2-135M-Instruct
    # fails often but not always (28% of step-0 groups with reward variance, matched one-shot); it learned
    # nothing in 28 steps. NOTE: its held-out split has only 40 problems.
    "countdown_easy": ("countdown", "Countdown", {"n_numbers": 2, "max_number": 20, "max_target": 40, "ops": "+-"}),
    # countdown_easy's shape with numbers 1-50 and a fifth of the problems held out: 1,988 train and 506
    # held-out problems. Chosen by measurement (bench/step0_signal.py, bench/RESULTS.md): 31% of
    # step-0 groups have reward variance (1-99 gave 12.5%, with 745 held out).
    "countdown2": ("countdown", "Countdown", {"n_numbers": 2, "max_number": 50, "max_target": 100, "ops": "+-",
                                              "test_fraction": 0.2}),
    # 2-number problems (numbers 1-40, targets <= 80, + and -) after a mismatched one-shot, the 3-number sum
    # "4 + 9 + 3": the default model copies the example's shape and appends a third term to many answers, a
    # systematic error it can see in its own attempt. 481 held-out problems; the last 200 training problems
    # are a validation split for choosing settings. Chosen with the learnability check (bench/RESULTS.md).
    "countdown_sum3shot": ("countdown", "Countdown", {"n_numbers": 2, "max_number": 40, "max_target": 80,
                                                      "ops": "+-", "test_fraction": 0.3, "val_examples": 200,
                                                      "oneshot_numbers": 3, "oneshot_ops": "+"}),
    # The main job's default: countdown_easy's numbers (1-20, targets <= 40) after the same mismatched one-shot:
    # a third term appended to many answers, the error R3 visibly fixes at 135M within 28 steps at lr 5e-5
    # (bench/RESULTS.md). 123 held-out problems; the last 100 training problems are its validation split.
    "countdown_easy_sum3shot": ("countdown", "Countdown", {"n_numbers": 2, "max_number": 20, "max_target": 40,
                                                           "ops": "+-", "test_fraction": 0.3, "val_examples": 100,
                                                           "oneshot_numbers": 3, "oneshot_ops": "+"}),
    "xlam": ("function_calling", "XLAM", {}),
    "bfcl": ("bfcl", "BFCL", {}),
}
DEFAULT_TASK = "countdown_easy_sum3shot"  # the main job's: train.py's, sample.py's and bench/arms.py's default


def get_task(name: str, **options) -> Task:
    """Build the task registered as `name` (options override its preset, see each class's fields), or,
    for `name` = "module:Class", import `module` from sys.path and return `Class(**options)`."""
    if ":" in name:
        return _task_from_module(name, options)
    if name not in REGISTRY:
        raise TaskDataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(REGISTRY))} "
                            "(or module:Class for a task of your own)")
    module_name, class_name, preset = REGISTRY[name]
    # Imported here, not at the top: the task modules import TaskDataError from this package.
    cls = getattr(importlib.import_module(f"r3.tasks.{module_name}"), class_name)
    allowed = [p for p in inspect.signature(cls).parameters if p != "name"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TaskDataError(f"unknown option(s) {unknown} for task {name!r}; valid options: {allowed}")
    return cls(name=name, **{**preset, **options})


def _task_from_module(spec: str, options: dict) -> Task:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name.split(".")[0] and e.name != module_name:
            raise  # the module exists but its own import failed: show that traceback
        raise TaskDataError(f"--task={spec}: no module {module_name!r} on sys.path (put {module_name}.py next to "
                            "the script, or add its folder to PYTHONPATH)") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskDataError(f"--task={spec}: module {module_name!r} has no {class_name!r}")
    try:
        task = cls(**options)
    except TypeError as e:
        raise TaskDataError(f"--task={spec}: cannot build {class_name}(**{options}): {e}") from None
    missing = [a for a in ("name", "reflection_prompt", "examples", "prompt", "verify") if not hasattr(task, a)]
    if missing:
        raise TaskDataError(f"--task={spec}: {class_name} lacks {missing} of the Task protocol (r3/tasks/__init__.py)")
    return task


def question_turns(question: str, solved: tuple[str, str] | None = None) -> list[dict]:
    """A task's prompt messages: the question as the last user turn, which the retry re-asks alone; with
    `solved` = (question, answer), that worked example before it as a user/assistant pair (one-shot)."""
    turns = [{"role": "user", "content": question}]
    if solved is None:
        return turns
    return [{"role": "user", "content": solved[0]}, {"role": "assistant", "content": solved[1]}] + turns


def read_rows(path) -> list[dict]:
    """Rows of a .jsonl, .json (one list of objects, or JSON lines) or .parquet file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return _check_objects(rows, path)
    return read_jsonl(path, text)


def read_jsonl(path, text: str | None = None) -> list[dict]:
    """One JSON object per non-blank line; a bad line raises TaskDataError naming file and line number."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise TaskDataError(f"data file not found: {path}")
        text = path.read_text(encoding="utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise TaskDataError(f"{path}:{lineno}: malformed JSON line ({e}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskDataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own hierarchy for corrupt files
        raise TaskDataError(f"{path}: not a readable parquet file ({e})") from None


def _check_objects(rows, path: Path) -> list[dict]:
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}: item {i} is a {type(row).__name__}, expected an object")
    return rows


def split_of(key: str, test_fraction: float) -> str:
    """'test' or 'train' from a stable hash of the problem's identity, never from its position.

    The same problem therefore lands in the same split whatever the seed, file order or pool size:
    train and test cannot share a problem, and a test problem stays a test problem across runs.
    """
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def require_nonempty(examples: list[dict], task: str, split: str, hint: str) -> list[dict]:
    if not examples:
        raise TaskDataError(f"split {split!r} of task {task!r} is empty; {hint}")
    return examples


def parse_options(text: str) -> dict:
    """"n_numbers=2,max_number=10" (the scripts' --task_options flag) -> {"n_numbers": 2, "max_number": 10}.
    Values are read as JSON where they parse (numbers, true/false, [lists]) and as strings otherwise."""
    options = {}
    for item in filter(None, (s.strip() for s in _split_top_level(text))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TaskDataError(f"task option {item!r} is not key=value (e.g. --task_options=n_numbers=3,max_number=20)")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so "n_numbers=[2,3],seed=1" keeps its list."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def task_from_flags(name: str, data_path: str = "", options: str = "") -> Task:
    """What train.py and sample.py do with --task, --task_data and --task_options."""
    opts = parse_options(options)
    if data_path:
        opts["data_path"] = data_path
    return get_task(name, **opts)
