"""docs/TOUR.md points into the code; these tests keep every pointer valid.

A reference is `path::name` or `path::Class.method` in backticks: the file
must exist and define that name (found with `ast`, so nothing is imported).
Relative links and the scripts and test files in its commands must exist.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "docs" / "TOUR.md"
TEXT = TOUR.read_text(encoding="utf-8")

REFERENCE = re.compile(r"`([\w./-]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND = re.compile(r"^ {4}((?:python|pytest|tinyddpm) .+)$", re.MULTILINE)
STOP = re.compile(r"^## Stop (\d+)", re.MULTILINE)

REFERENCES = sorted(set(REFERENCE.findall(TEXT)))
MIN_REFERENCES = 25
MIN_STOPS = 8          # the toy, then the seven stops of the paper's path


def defined_names(body):
    """{name: node} for the functions, classes and assigned names of a module or class body."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def resolve(path, dotted):
    """The AST node that `path::dotted` names, or raise AssertionError saying what is missing."""
    file = ROOT / path
    assert file.is_file(), f"docs/TOUR.md names {path}, which does not exist"
    node_body = ast.parse(file.read_text(encoding="utf-8"), filename=str(file)).body
    where = path
    for part in dotted.split("."):
        names = defined_names(node_body)
        assert part in names, f"docs/TOUR.md names {path}::{dotted}, but {where} defines no {part!r}"
        node = names[part]
        node_body = getattr(node, "body", [])
        where = f"{where}::{part}"
    return node


def test_the_tour_has_enough_stops_and_references():
    stops = [int(n) for n in STOP.findall(TEXT)]
    assert len(stops) >= MIN_STOPS and stops == list(range(len(stops))), stops
    assert len(REFERENCES) >= MIN_REFERENCES, f"only {len(REFERENCES)} references found"


@pytest.mark.parametrize("path, name", REFERENCES, ids=[f"{p}::{n}" for p, n in REFERENCES])
def test_every_reference_resolves(path, name):
    resolve(path, name)


def test_resolve_rejects_what_does_not_exist():
    with pytest.raises(AssertionError, match="defines no 'no_such_method'"):
        resolve("tinyddpm/diffusion.py", "GaussianDiffusion.no_such_method")
    with pytest.raises(AssertionError, match="does not exist"):
        resolve("tinyddpm/no_such_file.py", "anything")


def test_every_stop_names_code_and_a_command():
    sections = re.split(r"^## ", TEXT, flags=re.MULTILINE)[1:]
    stops = [s for s in sections if s.startswith("Stop")]
    for section in stops:
        title = section.splitlines()[0]
        assert REFERENCE.search(section), f"'{title}' names no path::function"
        assert COMMAND.search(section), f"'{title}' gives no command to run"


def test_the_papers_key_equations_are_all_visited():
    for eq in ("eqs. 2 and 4", "eqs. 6 and 7", "eq. 11", "eq. 12", "eq. 14", "eq. 5"):
        assert eq in TEXT, f"docs/TOUR.md does not mention {eq}"


def test_every_relative_link_exists():
    links = [l for l in LINK.findall(TEXT) if not re.match(r"[a-z]+:", l) and not l.startswith("#")]
    assert links, "no relative links found"
    for link in links:
        target = (TOUR.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"docs/TOUR.md links to {link}, which does not exist"


def test_every_picture_is_a_small_png():
    from PIL import Image

    pictures = [l for l in LINK.findall(TEXT) if l.endswith(".png")]
    assert len(pictures) >= 4
    for link in pictures:
        path = TOUR.parent / link
        assert path.stat().st_size < 300_000, f"{link} is {path.stat().st_size} bytes"
        with Image.open(path) as img:
            assert img.format == "PNG"


def test_scripts_and_test_files_in_commands_exist():
    commands = COMMAND.findall(TEXT)
    assert len(commands) >= 8
    for command in commands:
        for word in command.split():
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), f"command '{command}' names {word}, which does not exist"


def test_pytest_selections_in_commands_select_real_tests():
    # `pytest FILE -k NAME` with a NAME no test has would run nothing and pass silently.
    for command in COMMAND.findall(TEXT):
        m = re.match(r"pytest (\S+) -k (\S+)$", command)
        if m:
            source = (ROOT / m.group(1)).read_text(encoding="utf-8")
            assert m.group(2) in source, f"'{command}': no test in {m.group(1)} matches {m.group(2)!r}"
