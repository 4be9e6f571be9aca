"""The package's structure, read from its source: who may see the trainer, and no import circles.

Components receive explicit state; only callbacks see the trainer, through its public
attributes. These tests parse ``safeloop/`` (nothing is imported for the first three) and fail
when a module reaches for the trainer again. Each check is also run on a planted offender, so
that none of them can pass vacuously.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "safeloop"
MAY_IMPORT_TRAINER = {"safeloop.callbacks", "safeloop"}  # callbacks.py (types) and __init__.py

_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def _trainer_importers(root: Path) -> list[str]:
    modules = import_graph.module_names(root)
    return sorted(
        name
        for name, path in modules.items()
        if any(t == "safeloop.trainer" for t, _ in import_graph.imported_modules(name, path, set(modules)))
    )


def _names_a_trainer(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return "trainer" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return "trainer" in node.attr.lower()
    return False


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_trainer_accesses(source: str) -> list[str]:
    """``trainer._x`` (read or written), and ``getattr/setattr/hasattr(trainer, "_x")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and _names_a_trainer(node.value)) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and _names_a_trainer(node.args[0])
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_only_callbacks_and_the_package_face_import_the_trainer():
    assert set(_trainer_importers(ROOT)) <= MAY_IMPORT_TRAINER


def test_no_module_but_the_trainer_touches_a_private_attribute_of_the_trainer():
    offenders = {
        str(path.relative_to(ROOT)): hits
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "trainer.py" and (hits := private_trainer_accesses(path.read_text()))
    }
    assert offenders == {}


def test_the_private_attribute_check_catches_each_way_of_reaching_in():
    source = (
        "def f(trainer, self):\n"
        "    trainer._history.append(1)\n"
        "    self.trainer._findings = []\n"
        "    getattr(trainer, '_loss_fn')\n"
        "    trainer.global_step, trainer.__class__, other._private\n"
    )
    assert len(private_trainer_accesses(source)) == 3


def test_a_planted_import_of_the_trainer_is_found(tmp_path):
    package = tmp_path / "safeloop"
    package.mkdir()
    (package / "__init__.py").write_text("from safeloop.trainer import SafeTrainer\n")
    (package / "trainer.py").write_text("from safeloop import skips\n")
    (package / "skips.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .trainer import SafeTrainer\n"
    )
    assert _trainer_importers(tmp_path) == ["safeloop", "safeloop.skips"]


def test_no_import_circle_at_run_time_and_only_callbacks_with_trainer_at_type_level():
    assert import_graph.broken_rules(ROOT) == []
    assert import_graph.circles(import_graph.import_graph(ROOT, type_level=True)) == [
        {"safeloop.callbacks", "safeloop.trainer"}
    ]


def test_circles_are_found_through_lazy_and_typing_only_imports(tmp_path):
    package = tmp_path / "safeloop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from safeloop.b import g\n")  # lazy: run time
    (package / "b.py").write_text("import safeloop.a\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import safeloop.d\n"
    )
    (package / "d.py").write_text("from . import c\n")
    assert import_graph.circles(import_graph.import_graph(tmp_path, type_level=False)) == [
        {"safeloop.a", "safeloop.b"}
    ]
    assert sorted(
        map(sorted, import_graph.circles(import_graph.import_graph(tmp_path, type_level=True)))
    ) == [
        ["safeloop.a", "safeloop.b"],
        ["safeloop.c", "safeloop.d"],
    ]
    assert len(import_graph.broken_rules(tmp_path)) == 2


# -- the keyword arguments, spelled in the signature, the config, the docstring and the docs ------


def _keywords() -> dict[str, object]:
    from safeloop import SafeTrainer

    parameters = inspect.signature(SafeTrainer.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


# settings whose config value is the argument normalised (None resolved, a sequence made a tuple)
_NORMALISED = {"gradient_accumulation_steps": (None, 1), "log_with": (None, ())}


def test_every_keyword_argument_is_a_setting_or_a_run_object_with_the_same_default():
    from dataclasses import MISSING, fields

    from safeloop.config import OBJECT_ARGUMENTS, TrainerConfig

    keywords = _keywords()
    settings = {f.name: f.default for f in fields(TrainerConfig)}
    assert MISSING not in settings.values()
    assert set(keywords) == set(settings) | set(OBJECT_ARGUMENTS)
    assert not set(settings) & set(OBJECT_ARGUMENTS)
    for name, default in settings.items():
        assert (keywords[name], default) == _NORMALISED.get(name, (default, default)), name


def test_every_keyword_argument_is_in_the_docstring_and_the_api_reference():
    from safeloop import SafeTrainer

    keywords = _keywords()
    docstring = SafeTrainer.__doc__ or ""
    args = docstring.split("Args:")[1].split("Raises:")[0]
    documented = re.findall(r"^\s{8}(\w+) \(`", args, flags=re.MULTILINE)
    assert documented == ["model", "optimizer", "train_dataloader", *keywords]

    api = (ROOT / "docs" / "api.md").read_text()
    block = api.split("```python\nSafeTrainer(", 1)[1].split("```", 1)[0]
    definition = ast.parse("def SafeTrainer(" + block.strip() + ": pass").body[0]
    assert isinstance(definition, ast.FunctionDef)
    shown = definition.args
    assert [arg.arg for arg in shown.args] == ["model", "optimizer", "train_dataloader"]
    assert [arg.arg for arg in shown.kwonlyargs] == list(keywords)
    defaults = [ast.literal_eval(d) for d in shown.kw_defaults if d is not None]
    assert dict(zip([arg.arg for arg in shown.kwonlyargs], defaults, strict=True)) == keywords
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| `([^`]+)` \|", api, flags=re.MULTILINE))
    assert {name: ast.literal_eval(rows[name]) for name in keywords if name in rows} == keywords


@pytest.mark.parametrize("bad", [{"max_epoch": 1}, {}])
def test_build_config_refuses_arguments_beyond_or_short_of_the_signature(bad):
    from torch import nn

    from safeloop import Callback
    from safeloop.config import build_config

    arguments = {**_keywords(), **bad}
    if not bad:
        del arguments["seed"]
    with pytest.raises(TypeError, match="beyond or short of SafeTrainer's keyword arguments"):
        build_config(nn.Linear(1, 1), None, None, arguments, callback_base=Callback)


def test_the_projects_files_stand_alone_and_cite_no_file_outside_the_repository():
    # the contract files the project was built from live outside the repository: a reader of the
    # docs, the code or the tests must never be sent to them
    outside = ("FINDINGS.md", "API.md", "DESIGN.md", "STYLE.md", "../shared")
    cited = []
    for folder in ("safeloop", "docs", "tests", "examples", "benchmarks", "tools"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md") and path != Path(__file__).resolve():
                text = path.read_text(encoding="utf-8")
                cited += [f"{path.relative_to(ROOT)}: {name}" for name in outside if name in text]
    for name in ("README.md", "CHANGELOG.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        cited += [f"{name}: {item}" for item in outside if item in text]
    assert not cited, cited


def test_the_package_ships_its_type_marker():
    import importlib.resources

    root = Path(__file__).resolve().parents[2]
    assert importlib.resources.files("safeloop").joinpath("py.typed").is_file()
    # setuptools puts only modules in the wheel unless the marker is named as package data
    assert 'safeloop = ["py.typed"]' in (root / "pyproject.toml").read_text()
