"""Every file the repository's own text cites is in the repository, so a fork can follow each citation.

Proves, over the docstrings and comments of every *.py file and the whole of every *.md file that git
tracks (or would track: new files that .gitignore admits):
- each cited repository path exists: any token ending in `.md` (a document), and any path whose first
  folder is one of the repository's top-level folders (`r3/grpo.py`, `bench/RESULTS.md`, `.ci/setup`).
  A path with a folder is read from the repository root; a bare name (`RESULTS.md`) must be the name of
  some file in the repository. Not checked: URLs, paths in other projects (`trl/trainer/utils.py`: its
  first folder is not ours), bare script names (`my_task.py`, the README's example), outputs (`*.jsonl`),
  templates (`tests/test_<module>.py`), and strings in code (a string may be a key that looks like a path);
- each "<file>.md section N" names a heading numbered N in that file (docs/method.md keeps its numbers);
- the rule itself flags a missing path and passes the kinds of reference above (a test of the test).
A failure prints file:line and the missing path for each offence.
"""
import ast
import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A path-like token: words, dots and dashes, joined by "/". It may not start inside a longer path or a URL.
TOKEN = re.compile(r"(?<![\w./~$-])(?:[\w.-]+/)*[\w.-]+/?")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")
TEMPLATE_NEXT = tuple("<{*[")  # `tests/test_<module>.py`, `bench/*.py`: a pattern, not a file
SECTION = re.compile(r"([\w./-]+\.md),? sections? (\d+)")


def repo_files() -> list[str]:
    """Tracked files plus untracked ones that .gitignore admits (a new doc counts before it is committed)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.splitlines() if f and not f.startswith(".venv") and (ROOT / f).is_file()})


def text_lines(f: str) -> list[tuple[int, str]]:
    """(line number, text) of what `f` says to a reader: all of a .md file; a .py file's docstrings and comments."""
    source = (ROOT / f).read_text(encoding="utf-8")
    lines = source.splitlines()
    if f.endswith(".md"):
        return list(enumerate(lines, 1))
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
                out += [(n, lines[n - 1]) for n in range(doc.lineno, doc.end_lineno + 1)]
    return sorted(out)


def cited_paths(line: str, top_dirs: set[str]) -> list[str]:
    """The repository-style paths a line of text cites (see the module docstring for the rule)."""
    line = URL.sub(" ", line)
    found = []
    for m in TOKEN.finditer(line):
        path = m.group().rstrip(".-")
        if line[m.end():].startswith(TEMPLATE_NEXT) or not path:
            continue
        first = path.split("/", 1)[0]
        if re.search(r"[\w-]\.md$", path) or ("/" in path and first in top_dirs):
            found.append(path)
    return found


def missing(path: str, files: set[str], dirs: set[str], names: set[str]) -> bool:
    """Whether `path` names nothing in the repository: a file or folder from the root, or a bare file name."""
    if "/" not in path:
        return path not in names
    norm = os.path.normpath(path)
    return norm.startswith("..") or (norm not in files and norm not in dirs)


def index(files: list[str]) -> tuple[set[str], set[str], set[str], set[str]]:
    """(files, folders, bare file names, top-level folders) of the repository."""
    dirs = {str(p) for f in files for p in Path(f).parents if str(p) != "."}
    top = {f.split("/", 1)[0] for f in files if "/" in f}
    return set(files), dirs, {Path(f).name for f in files}, top


def test_every_cited_repository_file_exists():
    files = repo_files()
    file_set, dirs, names, top = index(files)
    bad = []
    for f in files:
        if not f.endswith((".py", ".md")):
            continue
        for n, line in text_lines(f):
            bad += [f"{f}:{n}: cites {p}, which is not in the repository" for p in cited_paths(line, top)
                    if missing(p, file_set, dirs, names)]
    assert not bad, f"{len(bad)} citation(s) of missing files:\n" + "\n".join(bad)


def test_every_cited_section_exists():
    files = repo_files()
    bad = []
    for f in files:
        if not f.endswith((".py", ".md")):
            continue
        for n, line in text_lines(f):
            for doc, num in SECTION.findall(URL.sub(" ", line)):
                target = ROOT / doc
                if target.is_file() and not re.search(rf"^#+ {num}[. ]", target.read_text(encoding="utf-8"), re.M):
                    bad.append(f"{f}:{n}: cites {doc} section {num}, which has no heading numbered {num}")
    assert not bad, "\n".join(bad)


def test_rule_flags_missing_paths_and_passes_other_kinds_of_reference():
    files = ["README.md", "train.py", "r3/grpo.py", "bench/RESULTS.md", "bench/arms/countdown2/table.md", ".ci/setup"]
    file_set, dirs, names, top = index(files)

    def offences(line):
        return [p for p in cited_paths(line, top) if missing(p, file_set, dirs, names)]

    assert offences("the loss (PAPER.md section 3), see r3/rollout.py and docs/method.md.") == [
        "PAPER.md", "r3/rollout.py", "docs/method.md"]
    assert offences("as ../shared/DESIGN.md says; bench/gone/") == ["../shared/DESIGN.md", "bench/gone/"]
    assert offences("r3/grpo.py, bench/RESULTS.md (RESULTS.md, table.md); `bash .ci/setup`; r3/ and bench/arms/.") == []
    assert offences("TRL's trl/trainer/utils.py and https://github.com/x/y/blob/main/docs/API.md") == []
    assert offences("tests/test_<module>.py, bench/*.py, my_task.py, failures.jsonl, config.json") == []
