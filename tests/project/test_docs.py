"""The user-facing docs name only what exists, so a module split or a renamed flag cannot leave them behind.

README.md, DEVELOPING.md, CHANGELOG.md, docs/*.md, benchmarks/README.md and the comment headers of the shipped YAMLs
are read as text: every repository path, module path, ``drm_lightning.x.y`` name, test name and ``--flag`` they
mention must exist, every ``drm-lightning`` command in their shell blocks must parse against the real signatures
(nothing is instantiated: no model or dataset is loaded), every relative link resolves, the README's Python
example runs, and docs/architecture.md's list of ``merging/methods/`` names every module there. Which modules exist
is the architecture doc's business, not the front page's: nothing here makes the README list them. The shipped
YAMLs' own header commands are checked in ``tests/project/test_configs.py``.
"""

from __future__ import annotations

import importlib
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "drm_lightning"
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "DEVELOPING.md",
        ROOT / "CHANGELOG.md",
        ROOT / "benchmarks" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
YAMLS = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "configs").glob("**/*.yaml")])
IDS = [str(p.relative_to(ROOT)) for p in DOCS]

#: A path from the repository root to a shipped file (placeholders such as ``<task>``, ``{8,14,20}``, ``$t`` or
#: ``*`` are not paths and do not match).
REPO_PATH = re.compile(
    r"(?<![\w/.$<{-])(?:configs|recipes|tests|benchmarks|scripts|docs|data)/[\w./-]*\w\.(?:yaml|py|sh|md|csv)\b"
)
#: A package path, from the package (``drm_lightning/merging/engine/merger.py``) or inside it
#: (``merging/engine/merger.py``, ``methods/drm_joint.py``, a folder ``export/``).
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MODULE_PATH = re.compile(
    rf"(?<![\w/.-])(?:drm_lightning/)?(?:{'|'.join([*SUBPACKAGES, 'methods'])})/(?:[\w/]*\w\.py|(?:\w+/)*)(?![\w/])"
)
DOTTED = re.compile(r"\bdrm_lightning(?:\.[A-Za-z_]\w*)+")
TEST_REF = re.compile(r"(tests/(?:\w+/)*test_\w+\.py)::(\w+)")
BARE_TEST = re.compile(r"`(test_\w+)`")
FLAG = re.compile(r"(?:^|(?<=[\s`(\[]))(--[a-z][a-z_-]*)")
#: Options of the launchers the docs show (torchrun, srun), and Lightning's own ``fit`` options beyond the trainer,
#: model and data groups (``--trainer.x`` and the like are cut to ``--trainer`` by ``FLAG``).
LAUNCHER_FLAGS = {
    "--nproc_per_node", "--standalone", "--nnodes", "--node_rank", "--master_addr", "--master_port",
    "--nodes", "--ntasks-per-node", "--gpus-per-node", "--distribution",
}  # fmt: skip
LIGHTNING_FLAGS = {"--trainer", "--data", "--model", "--ckpt_path", "--seed_everything", "--task_vector_dir"}
TOP_FLAGS = {"--help", "--version", "--debug", "--config", "--print_config"}


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def yaml_header(path: Path) -> str:
    """The comment lines a shipped YAML opens with (its command and what it does)."""
    lines = text(path).splitlines()
    return "\n".join(line for line in lines if line.lstrip().startswith("#"))


COMMAND_LINE = re.compile(r"drm-lightning|drm_lightning\.cli|^python benchmarks/")


def shell_commands(path: Path) -> list[list[str]]:
    """The drm-lightning and benchmark commands of the file's ``bash`` (or untagged) fenced blocks, continuation
    lines joined; a block's ``NAME=value`` lines and a ``for NAME in first ...`` loop's first value are expanded."""
    commands = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text(path), re.S):
        if lang not in ("", "bash"):
            continue
        variables: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if match := re.match(r"(\w+)=(\S+)$", line):
                variables[match.group(1)] = shlex.split(match.group(2))[0]
            elif match := re.match(r"for (\w+) in (\S+)", line):
                variables[match.group(1)] = match.group(2)
            elif COMMAND_LINE.search(line) and not line.startswith("#"):
                for name, value in variables.items():
                    line = re.sub(rf"\$\{{?{name}\b\}}?", value, line)
                commands.append(shlex.split(line, comments=True))
    return commands


def drm_lightning_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``drm-lightning`` (or ``-m drm_lightning.cli``), None for any other command."""
    for marker in ("drm_lightning.cli", "drm-lightning"):
        if marker in tokens:
            return tokens[tokens.index(marker) + 1 :]
    return None


def repo_path_exists(path: str) -> bool:
    """From the repository root; ``data/x.py`` may also be the package's ``data/`` (the demo data is ``data/demo``)."""
    return (ROOT / path).exists() or (path.startswith("data/") and (PACKAGE / path).exists())


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_repository_paths_named_in_the_docs_exist(doc: Path) -> None:
    missing = sorted({p for p in REPO_PATH.findall(text(doc)) if not repo_path_exists(p)})
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_repository_paths_named_in_the_yaml_headers_exist() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)}: {p}"
        for path in YAMLS
        for p in set(REPO_PATH.findall(yaml_header(path)))
        if not repo_path_exists(p)
    )
    assert not missing, f"YAML headers name files that do not exist: {missing}"


#: Folders the user fills (StoryCloze's csv files come through a request form), named where the docs say so.
USER_FOLDERS = {"data/story_cloze/"}


def package_path_exists(name: str) -> bool:
    if name in USER_FOLDERS:
        return True
    name = name.removeprefix("drm_lightning/")
    return any((base / name).exists() for base in (PACKAGE, PACKAGE / "merging", ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_package_modules_named_in_the_docs_exist(doc: Path) -> None:
    """``merging/engine/merger.py``, ``methods/drm_joint.py``, ``drm_lightning/export/``: a split leaves no stale
    name."""
    missing = sorted({p for p in MODULE_PATH.findall(text(doc)) if not package_path_exists(p)})
    assert not missing, f"{doc.relative_to(ROOT)} names package modules that do not exist: {missing}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_in_the_docs_resolve(doc: Path) -> None:
    """``[results](docs/results.md)``, ``[x](../benchmarks/README.md)``: a moved or renamed page breaks no link."""
    targets = {t.split("#", 1)[0] for t in LINK.findall(text(doc)) if not re.match(r"[a-z]+:", t)}
    missing = sorted(t for t in targets if t and not (doc.parent / t).exists())
    assert not missing, f"{doc.relative_to(ROOT)} links to files that do not exist: {missing}"


SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


def table_blocks(doc: Path) -> list[tuple[int, list[str]]]:
    """The runs of consecutive lines that start with ``|`` outside code fences: (first line number, lines)."""
    blocks: list[tuple[int, list[str]]] = []
    fenced = False
    for number, line in enumerate(text(doc).splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("|"):
            if blocks and blocks[-1][0] + len(blocks[-1][1]) == number:
                blocks[-1][1].append(line)
            else:
                blocks.append((number, [line]))
    return blocks


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_table_in_the_docs_has_a_header_and_one_column_count(doc: Path) -> None:
    """A Markdown table is a header, a ``|---|`` row, then rows of as many cells: a blank line inside a table
    turns its second half into plain text with pipes, and a row with a cell too many or too few renders wrong."""
    for first, lines in table_blocks(doc):
        where = f"{doc.relative_to(ROOT)}:{first}"
        assert len(lines) >= 2 and SEPARATOR.match(lines[1]), f"{where}: a table without its |---| row: {lines[0]!r}"
        cells = [len(re.findall(r"(?<!\\)\|", line.replace("`|`", ""))) for line in lines]
        assert len(set(cells)) == 1, f"{where}: rows with different column counts {cells}"


def resolves(dotted: str) -> bool:
    """``drm_lightning.a.b.C.d``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_dotted_names_in_the_docs_and_yaml_headers_resolve() -> None:
    sources = [(doc, text(doc)) for doc in DOCS] + [(path, yaml_header(path)) for path in YAMLS]
    bad = sorted(
        {
            f"{path.relative_to(ROOT)}: {name}"
            for path, content in sources
            for name in DOTTED.findall(content)
            if not resolves(name)
        }
    )
    assert not bad, f"names that do not import: {bad}"


@cache
def defined_tests(module: str) -> frozenset[str]:
    """The test functions of ``module``, a path from the repository root (``tests/cli/test_cli.py``)."""
    path = ROOT / module
    return frozenset(re.findall(r"^\s*(?:async )?def (test_\w+)", text(path), re.M)) if path.is_file() else frozenset()


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_tests_named_in_the_docs_exist(doc: Path) -> None:
    content = text(doc)
    every = frozenset().union(*(defined_tests(str(p.relative_to(ROOT))) for p in (ROOT / "tests").glob("**/test_*.py")))
    missing = [f"{m}::{name}" for m, name in TEST_REF.findall(content) if name not in defined_tests(m)]
    missing += [name for name in BARE_TEST.findall(content) if name not in every]
    assert not missing, f"{doc.relative_to(ROOT)} names tests that do not exist: {sorted(set(missing))}"


def test_architecture_names_every_methods_module() -> None:
    section = text(ROOT / "docs" / "architecture.md").split("## Inside `merging/methods/`", 1)[1].split("\n## ", 1)[0]
    modules = {p.name for p in (PACKAGE / "merging" / "methods").glob("*.py") if p.stem != "__init__"}
    named = set(re.findall(r"`(\w+\.py)`", section))
    assert modules - named == set(), f"docs/architecture.md, Inside merging/methods/: {sorted(modules - named)}"
    assert named - modules - {"functional.py", "reference.py", "registry.py"} == set(), sorted(named - modules)


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for tokens in shell_commands(doc):
            args = drm_lightning_args(tokens)
            if args and "--help" not in args and not any("..." in a for a in args):
                found.append((f"{doc.relative_to(ROOT)}: {shlex.join(tokens)[:80]}", args))
    return found


@pytest.mark.parametrize(("where", "args"), doc_commands(), ids=[where for where, _ in doc_commands()])
def test_drm_lightning_commands_in_the_docs_parse(where: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every full ``drm-lightning`` command the docs show parses against the real signatures, nothing built."""
    from drm_lightning.commands import parse
    from drm_lightning.commands.expert import parse_expert_args

    monkeypatch.chdir(ROOT)  # the commands are written to run from the repository root
    command, rest = args[0], args[1:]
    if command in ("fit", "validate", "test"):
        parse_expert_args(args)
    else:
        parse(command, rest)


def benchmark_commands() -> list[tuple[str, Path, list[str]]]:
    found = []
    for doc in DOCS:
        for tokens in shell_commands(doc):
            if len(tokens) > 1 and tokens[0] == "python" and tokens[1].startswith("benchmarks/"):
                flags = [t.split("=")[0] for t in tokens[2:] if t.startswith("--")]
                found.append((f"{doc.relative_to(ROOT)}: {shlex.join(tokens)[:80]}", ROOT / tokens[1], flags))
    return found


def script_has_option(source: str, flag: str) -> bool:
    """``"--flag"`` in the script, or an option it builds from a name (``f"--{name.replace('_', '-')}"`` over the
    fields of its model spec, as ``merge_scaling.py`` does) that the script defines."""
    if f'"{flag}"' in source:
        return True
    name = flag.removeprefix("--").replace("-", "_")
    return 'add_argument(f"--{' in source and re.search(rf"^\s+{name}: ", source, re.M) is not None


@pytest.mark.parametrize(("where", "script", "flags"), benchmark_commands(), ids=[b[0] for b in benchmark_commands()])
def test_benchmark_commands_in_the_docs_use_the_scripts_options(where: str, script: Path, flags: list[str]) -> None:
    assert script.is_file(), f"{where}: {script.relative_to(ROOT)} does not exist"
    source = text(script)
    missing = [f for f in flags if not script_has_option(source, f)]
    assert not missing, f"{where}: {script.relative_to(ROOT)} has no option {missing}"


@cache
def known_flags() -> frozenset[str]:
    """Every option of the drm-lightning commands, the benchmark and shell scripts, the launchers' and Lightning's."""
    from drm_lightning.commands import build_parser

    flags = set(TOP_FLAGS | LAUNCHER_FLAGS | LIGHTNING_FLAGS)
    for name in ("merge", "evaluate", "extract", "statistics", "pipeline"):
        flags |= {o.split(".")[0] for o in build_parser(name)._option_string_actions if o.startswith("--")}
    for script in (ROOT / "benchmarks").glob("*.py"):
        source = text(script)
        flags |= set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", source))
        if 'add_argument(f"--{' in source:
            flags |= {"--" + n.replace("_", "-") for n in re.findall(r"^\s+(\w+): ", source, re.M)}
    for script in (ROOT / "scripts").glob("*.sh"):  # the options a shell script takes or passes on
        flags |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text(script)))
    return frozenset(flags)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_flags_named_in_the_docs_exist(doc: Path) -> None:
    unknown = sorted(set(FLAG.findall(text(doc))) - known_flags())
    assert not unknown, f"{doc.relative_to(ROOT)} names options no command or benchmark has: {unknown}"


def test_readme_functional_example_runs() -> None:
    """The README's tensor example (the only Python block that needs no model or folder) runs as written."""
    blocks = re.findall(r"```python\n(.*?)```", text(ROOT / "README.md"), re.S)
    example = [b for b in blocks if "from drm_lightning.merging import functional as F" in b]
    assert len(example) == 1, "README.md: expected one Python block using drm_lightning.merging.functional"
    namespace: dict[str, object] = {}
    exec(compile(example[0], "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    deltas, merged = namespace["deltas"], namespace["merged"]
    assert merged.shape == deltas[0].shape and merged.dtype == deltas[0].dtype
