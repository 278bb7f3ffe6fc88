"""LEARNING_PATH.md stays true: what it cites exists, what it shows runs, and no module is left out.

WHAT'S GOING ON HERE
  WHAT   The guide to reading gptcore cites code by dotted name, shows shell commands and Python
         snippets, and names files and tests. Each of those can go stale when code moves. The
         learning guide of the Go project gptcore descends from cited line numbers, and every one of
         them into the transformer files went stale. These tests make a stale reference fail the build.
           1. every dotted name `gptcore.xxx[.yyy...]` in the guide resolves (import, then getattr);
           2. every gptcore module (each .py in gptcore/ except __init__ and __main__, and each
              compiled .pyx) is cited at least once;
           3. every module in gptcore/ (each .py and .pyx, __init__ and __main__ included) opens with a
              docstring containing "WHAT'S GOING ON HERE";
           4. every shell command in the guide's code blocks exists: `make TARGET` is a Makefile
              target, `python3 path.py --flag` names a real file that mentions the flag,
              `python3 -m pytest path::test` names a real test, `gptcore ...` (or
              `python3 -m gptcore ...`) parses with the real command-line parser, and
              `mpiexec -n N COMMAND` passes if COMMAND does;
           5. every `python` block runs and prints what its `# ->` comments say;
           6. every file, test id and bare helper name the guide mentions exists, and the guide cites
              no line numbers.
  HOW    Nothing here trains or benchmarks. The commands are checked, never run. The Python snippets
         are tiny and run in a subprocess each, so a snippet that changes the thread count cannot
         affect other tests.

HOW A DOTTED NAME IS FOUND (the regex, DOTTED below)
      (?<![\\w./-])gptcore(?:\\.[A-Za-z_][A-Za-z0-9_]*)+
  "gptcore" followed by one or more ".identifier" parts:
    - the lookbehind means "gptcore" does not continue a word, a path or another dotted name
      (`bench/gptcore.x` and `my_gptcore.x` do not match);
    - a part must start with a letter or an underscore, so a full stop ending a sentence
      ("... in gptcore.model.") is not captured, and a file path never matches: "gptcore/model.py"
      has a slash where the regex needs a dot;
    - `python3 -m gptcore` (no dot) is a command, not a name.
  We search the whole guide: prose, tables, inline code and fenced blocks. A separate test requires
  every dotted name in prose to sit inside backticks, the guide's convention for cited code.

HOW A NAME RESOLVES
  Import the longest prefix that is a module (gptcore.model.Block.backward -> gptcore.model), then
  getattr each remaining part (Block, then backward). A field of a dataclass that has no default
  (gptcore.model.KVCache.qkv) is not a class attribute, so a part that names a dataclass field is
  accepted as the last part. Compiled `cdef` functions are not importable. The guide cites the
  importable `def` or the module instead, and writes cdef helpers as bare names in backticks (`_gemm`),
  which test 6 looks for in the source.
"""
import ast
import contextlib
import dataclasses
import importlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
GUIDE_PATH = REPO / "LEARNING_PATH.md"
GUIDE = GUIDE_PATH.read_text(encoding="utf-8")
PACKAGE = REPO / "gptcore"
HEADER = "WHAT'S GOING ON HERE"

DOTTED = re.compile(r"(?<![\w./-])gptcore(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


# ----------------------------------------------------------------------------------------------------
# Reading the guide
# ----------------------------------------------------------------------------------------------------

def fenced_blocks(text=GUIDE):
    """[(language, code)] for every ``` block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text=GUIDE):
    """The guide without its fenced blocks."""
    return FENCE.sub("", text)


def inline_code(text=GUIDE):
    """The contents of every `...` span outside fenced blocks."""
    return INLINE_CODE.findall(prose(text))


def section(title, text=GUIDE):
    """The text of the level-2 section "## <title>", up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f'LEARNING_PATH.md has no "## {title}" section'
    return match.group(1)


def cited_names():
    return sorted(set(DOTTED.findall(GUIDE)))


def resolve(name):
    """None if `name` resolves, else a sentence saying where it stops resolving."""
    parts = name.split(".")
    obj, used = None, 0
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # this prefix is not a module; any other missing module is a real import failure
            if error.name is not None and (module_name + ".").startswith(error.name + "."):
                continue
            raise
        used = i
        break
    if obj is None:
        return f"{name}: no importable module prefix"
    for j, part in enumerate(parts[used:], start=used):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and j == len(parts) - 1 \
                and part in {field.name for field in dataclasses.fields(obj)}:
            return None
        return f"{name}: {'.'.join(parts[:j])} has no attribute {part!r}"
    return None


def module_files():
    """Every module source in gptcore/: the .py files and the compiled .pyx files."""
    return sorted(PACKAGE.glob("*.py")) + sorted(PACKAGE.glob("*.pyx"))


def docstring_of(path):
    """The module docstring of a .py file, or the leading triple-quoted string of a .pyx file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(text))
    match = re.match(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', text, re.DOTALL)
    return match.group(2) if match else None


# ----------------------------------------------------------------------------------------------------
# 1. Every cited name resolves
# ----------------------------------------------------------------------------------------------------

def test_guide_cites_dotted_names():
    assert len(cited_names()) > 20, "the regex found almost no gptcore names: is it broken?"


def test_every_dotted_name_cited_in_the_guide_resolves():
    missing = [problem for problem in map(resolve, cited_names()) if problem]
    assert not missing, "LEARNING_PATH.md cites names that do not exist:\n  " + "\n  ".join(missing)


def test_every_dotted_name_in_prose_is_in_backticks():
    bare = DOTTED.findall(INLINE_CODE.sub("", prose()))
    assert not bare, f"cite code in backticks, as `gptcore.model.GPT`: {sorted(set(bare))}"


@pytest.mark.parametrize("name, resolves", [
    ("gptcore.model.Block.backward", True),
    ("gptcore.model.KVCache.qkv", True),              # a dataclass field without a default
    ("gptcore._kernels.attention_forward", True),     # a compiled def
    ("gptcore.model.Block.backwards", False),
    ("gptcore.modle", False),
    ("gptcore.model.KVCache.qkv.shape", False),       # nothing can follow a field name
])
def test_resolve_accepts_real_names_and_refuses_misspelt_ones(name, resolves):
    assert (resolve(name) is None) == resolves


def test_dotted_name_regex_skips_paths_and_sentence_ends():
    text = "see gptcore/model.py, bench/gptcore.x, `gptcore.model`. And gptcore.kernels.matmul_forward(x)."
    assert DOTTED.findall(text) == ["gptcore.model", "gptcore.kernels.matmul_forward"]


# ----------------------------------------------------------------------------------------------------
# 2. Every module is cited
# ----------------------------------------------------------------------------------------------------

def test_every_gptcore_module_is_cited_in_the_guide():
    names = cited_names()
    modules = [f"gptcore.{path.stem}" for path in module_files()
               if path.stem not in ("__init__", "__main__")]
    uncited = [module for module in modules
               if not any(name == module or name.startswith(module + ".") for name in names)]
    assert not uncited, f"LEARNING_PATH.md never cites these modules: {uncited}"


# ----------------------------------------------------------------------------------------------------
# 3. Every module has its header
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", module_files(), ids=lambda path: path.name)
def test_module_opens_with_a_whats_going_on_here_docstring(path):
    docstring = docstring_of(path)
    assert docstring, f"gptcore/{path.name} does not open with a docstring"
    assert HEADER in docstring, f'the docstring of gptcore/{path.name} has no "{HEADER}" header'


# ----------------------------------------------------------------------------------------------------
# 4. Every shell command exists
# ----------------------------------------------------------------------------------------------------

def makefile_targets():
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.MULTILINE))


def simple_commands(code):
    """Each simple command of a shell block, as an argv list: comments dropped, and lines split
    at `&&`, `||`, `;` and `|`."""
    commands = []
    for line in code.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv = []
        for token in list(lexer) + [";"]:
            if token in ("&&", "||", ";", "|", "&"):
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
    return commands


def gptcore_problems(args):
    from gptcore import cli
    parser = cli._parser()
    subcommand = args[0] if args else None
    choices = next(action.choices for action in parser._actions if hasattr(action, "choices")
                   and isinstance(action.choices, dict))
    if subcommand not in choices:
        return [f"gptcore has no subcommand {subcommand!r} (it has {sorted(choices)})"]
    # argparse would accept an abbreviation (--max-iter for --max-iters); the guide must spell flags out
    options = choices[subcommand]._option_string_actions
    inexact = [arg.split("=")[0] for arg in args[1:] if arg.startswith("-") and arg.split("=")[0] not in options]
    if inexact:
        return [f"gptcore {subcommand} has no flag spelt {flag}" for flag in inexact]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            parser.parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return [f"`gptcore {' '.join(args)}` does not parse: {stderr.getvalue().strip()}"]
    return []


def pytest_target_problems(target):
    path, _, test_name = target.partition("::")
    if not (REPO / path).exists():
        return [f"{path} does not exist"]
    if test_name and not re.search(rf"^\s*def {re.escape(test_name)}\(", (REPO / path).read_text(), re.MULTILINE):
        return [f"{path} has no test {test_name}"]
    return []


def command_problems(argv):
    """What is wrong with one command shown in the guide; [] if it exists as shown."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):        # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return []
    program, args = argv[0], argv[1:]
    if program == "make":
        targets = [arg for arg in args if not arg.startswith("-") and "=" not in arg]
        return [f"the Makefile has no target {target!r}" for target in targets if target not in makefile_targets()]
    if program == "mpiexec":             # mpiexec -n N COMMAND: COMMAND is checked
        if len(args) < 3 or args[0] != "-n" or not args[1].isdigit():
            return [f"`mpiexec {' '.join(args)}`: expected mpiexec -n N COMMAND"]
        return command_problems(args[2:])
    if program == "gptcore":
        return gptcore_problems(args)
    if program in ("python", "python3"):
        if args[:1] == ["-m"]:
            module, rest = args[1], args[2:]
            if module == "gptcore":
                return gptcore_problems(rest)
            if module == "pytest":
                return [p for arg in rest if not arg.startswith("-") for p in pytest_target_problems(arg)]
            return [f"python -m {module}: not a module the guide is allowed to show"]
        script = REPO / args[0]
        if not script.is_file():
            return [f"{args[0]} does not exist"]
        source = script.read_text(encoding="utf-8")
        return [f"{args[0]} does not define the flag {arg.split('=')[0]}" for arg in args[1:]
                if arg.startswith("--") and f'"{arg.split("=")[0]}"' not in source]
    return [f"{program}: not a command this test knows how to check"]


def shell_commands(text=GUIDE):
    return [argv for language, code in fenced_blocks(text) if language == "sh" for argv in simple_commands(code)]


def test_every_code_block_is_labelled_sh_or_python():
    unlabelled = [language for language, _ in fenced_blocks() if language not in ("sh", "python")]
    assert not unlabelled, f"label every fenced block ```sh or ```python, got {unlabelled}"


def test_minimum_path_shows_the_commands_a_newcomer_runs():
    commands = [" ".join(argv) for argv in shell_commands(section("The minimum path"))]
    for expected in ("make build", "python3 python/kernels_tour.py", "python3 python/follow_the_data_flow.py",
                     "gptcore train", "gptcore generate", "gptcore eval", "make test"):
        assert any(command.startswith(expected) for command in commands), \
            f"the minimum path should show `{expected}`; it shows {commands}"


@pytest.mark.parametrize("argv", shell_commands(), ids=lambda argv: " ".join(argv)[:70])
def test_every_shell_command_in_the_guide_exists(argv):
    problems = command_problems(argv)
    assert not problems, f"`{' '.join(argv)}`: " + "; ".join(problems)


@pytest.mark.parametrize("argv, ok", [
    (["make", "build"], True),
    (["make", "no-such-target"], False),
    (["python3", "python/kernels_tour.py"], True),
    (["python3", "python/no_such_example.py"], False),
    (["python3", "bench/profile_step.py", "--config", "tiny"], True),
    (["python3", "bench/profile_step.py", "--confg", "tiny"], False),
    (["gptcore", "train", "--max-iters", "20"], True),
    (["gptcore", "train", "--max-iter", "20"], False),
    (["gptcore", "sample", "--model", "out"], False),
    (["OMP_NUM_THREADS=1", "python3", "-m", "gptcore", "eval", "--model", "out", "--data", "x"], True),
    (["mpiexec", "-n", "2", "gptcore", "train", "--max-iters", "10"], True),
    (["mpiexec", "-n", "2", "gptcore", "train", "--max-iter", "10"], False),
    (["mpiexec", "gptcore", "train"], False),
    (["python3", "-m", "pytest", "tests/test_model.py::test_no_such_test"], False),
    (["rm", "-rf", "out"], False),
])
def test_command_check_accepts_real_commands_and_refuses_made_up_ones(argv, ok):
    assert (command_problems(argv) == []) == ok


# ----------------------------------------------------------------------------------------------------
# 5. Every Python snippet runs and prints what it says
# ----------------------------------------------------------------------------------------------------

def expected_output(code):
    """The values the `# -> value` comments promise, one per printed line: the text after "# ->" up to
    the first ":" (what follows the colon is explanation)."""
    return [comment.split(":")[0].strip() for comment in re.findall(r"#\s*->\s*(.*)$", code, re.MULTILINE)]


PYTHON_BLOCKS = [code for language, code in fenced_blocks() if language == "python"]


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"snippet{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_snippet_runs_and_prints_what_its_comments_say(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    printed = [line.strip() for line in result.stdout.splitlines()]
    assert printed == expected_output(code), (
        f"the snippet printed {printed} but its comments say {expected_output(code)}:\n{code}")


# ----------------------------------------------------------------------------------------------------
# 6. Files, tests and helper names exist; no line numbers
# ----------------------------------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w/.-])((?:gptcore|python|bench|tests|tools)/[\w/.-]*\w\.pyx?)(?:::(\w+))?")


def test_every_file_and_test_the_guide_names_exists():
    problems = [p for path, test in set(PATH.findall(GUIDE))
                for p in pytest_target_problems(path + (f"::{test}" if test else ""))]
    assert not problems, "LEARNING_PATH.md names files or tests that do not exist:\n  " + "\n  ".join(problems)


def source_words():
    files = [*PACKAGE.glob("*.py"), *PACKAGE.glob("*.pyx"), REPO / "setup.py", REPO / "Makefile",
             *REPO.glob("bench/*.py"), *REPO.glob("python/*.py"), *REPO.glob("tools/*.py")]
    return set(re.findall(r"\w+", "\n".join(path.read_text(encoding="utf-8") for path in files)))


def test_every_bare_name_in_backticks_appears_in_the_source():
    # cdef helpers (`_gemm`), constants (`PARALLEL_MIN_WORK`), fields and variables (`wte`, `length`):
    # a single identifier in backticks must still exist somewhere in the code
    words = source_words()
    missing = sorted({span for span in inline_code() if re.fullmatch(r"[A-Za-z_]\w*", span) and span not in words})
    assert not missing, f"LEARNING_PATH.md names identifiers that no source file contains: {missing}"


def test_guide_cites_no_line_numbers():
    assert not re.search(r"\.pyx?:\d+", GUIDE), "cite code by dotted name, not file:line"
    assert not re.search(r"\blines? \d+", GUIDE, re.IGNORECASE), "cite code by dotted name, not line numbers"
