"""The Chinese pages (docs/zh/) keep up with the English reference they translate.

Every finding code of docs/diagnostics.md must be in the checklist (docs/zh/checklist.md), every
keyword argument of docs/api.md where it belongs: ``SafeTrainer``'s in the parameter table of
docs/zh/README.md with the same default (and so on the Chinese pages), ``SafeLoopCallback``'s in
its section of that page, ``find_lr``'s in the checklist. The lists are parsed from the English
pages, and their sizes are checked, so that a parser that finds nothing cannot pass. The pages
link to each other and to the English README, and every relative link and anchor resolves.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
ZH_README = DOCS / "zh" / "README.md"
ZH_CHECKLIST = DOCS / "zh" / "checklist.md"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def finding_codes() -> list[str]:
    """The codes of docs/diagnostics.md: one ``#### `code` `` heading each, under "Finding codes"."""
    section = _read(DOCS / "diagnostics.md").split("\n## Finding codes\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^#### `([a-z]+(?:-[a-z]+)+)`\s*$", section, flags=re.MULTILINE)


def safetrainer_keywords() -> dict[str, object]:
    """The keyword-only arguments of the signature block of docs/api.md, with their defaults."""
    block = _read(DOCS / "api.md").split("```python\nSafeTrainer(", 1)[1].split("```", 1)[0]
    definition = ast.parse("def SafeTrainer(" + block.strip() + ": pass").body[0]
    assert isinstance(definition, ast.FunctionDef)
    names = [arg.arg for arg in definition.args.kwonlyargs]
    defaults = [ast.literal_eval(d) for d in definition.args.kw_defaults if d is not None]
    return dict(zip(names, defaults, strict=True))


def callback_keywords() -> list[str]:
    """``SafeLoopCallback(**guards)``'s list in docs/api.md, its ``reinit_*`` patterns expanded."""
    text = _read(DOCS / "api.md").split("`SafeLoopCallback(**guards)` takes", 1)[1]
    text = text.split("that apply under Lightning (", 1)[1].split(") with the same defaults", 1)[0]
    keywords = list(safetrainer_keywords())
    found: list[str] = []
    for name in re.findall(r"`(\w+\*?)`", text):
        matches = [k for k in keywords if k.startswith(name[:-1])] if name.endswith("*") else [name]
        assert matches and set(matches) <= set(keywords), name
        found += [m for m in matches if m not in found]
    return found


def find_lr_keywords() -> list[str]:
    """The arguments of the ``## `find_lr(...)` `` heading of docs/api.md."""
    heading = re.search(
        r"^## `find_lr\((.*?)\) -> LRFinderResult`", _read(DOCS / "api.md"), flags=re.MULTILINE
    )
    assert heading is not None
    arguments = ast.parse(f"def find_lr({heading.group(1)}): pass").body[0].args  # type: ignore[attr-defined]
    return [arg.arg for arg in arguments.args + arguments.kwonlyargs]


def code_names(text: str) -> set[str]:
    """Identifiers written as code: in inline spans and in fenced blocks."""
    spans = re.findall(r"```.*?```|`[^`\n]+`", text, flags=re.DOTALL)
    # a name, not a part of a hyphenated one: `rollback-unavailable` names no keyword `rollback`
    return {name for span in spans for name in re.findall(r"(?<![\w-])[A-Za-z_]\w*(?![\w-])", span)}


def section(text: str, title: str) -> str:
    """The section whose heading contains ``title``, up to the next heading of its level or above."""
    match = re.search(rf"^(#+) [^\n]*{re.escape(title)}[^\n]*\n", text, flags=re.MULTILINE)
    assert match is not None, title
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{len(match.group(1))}}} ", rest, flags=re.MULTILINE)
    return rest[: end.start()] if end else rest


# -- the parsers find what is there -------------------------------------------------------------


def test_the_english_lists_are_parsed_whole():
    codes = finding_codes()
    assert len(codes) >= 30 and len(set(codes)) == len(codes), codes
    assert {"lr-too-high", "zero-params", "eval-train-overlap", "direct-backward"} <= set(codes)
    keywords = safetrainer_keywords()
    assert len(keywords) >= 35 and keywords["nan_guard"] == "skip" and keywords["log_every"] == 10
    assert len(callback_keywords()) >= 15
    assert find_lr_keywords()[:3] == ["min_lr", "max_lr", "num_steps"] and len(find_lr_keywords()) == 7


def test_the_keyword_lists_of_the_docs_are_the_code_s():
    import inspect

    from safeloop import SafeTrainer

    signature = inspect.signature(SafeTrainer.__init__).parameters.values()
    assert list(safetrainer_keywords()) == [p.name for p in signature if p.kind is p.KEYWORD_ONLY]
    signature = inspect.signature(SafeTrainer.find_lr).parameters
    assert find_lr_keywords() == [name for name in signature if name != "self"]
    pytest.importorskip("lightning")
    from safeloop.lightning import SafeLoopCallback

    signature = inspect.signature(SafeLoopCallback.__init__).parameters
    assert sorted(callback_keywords()) == sorted(name for name in signature if name != "self")


def test_a_code_or_keyword_left_out_is_found():
    page = "`lr-too-high` and `rollback_lr_factor=0.5`, ```python\nSafeTrainer(m, o, d, seed=0)\n```"
    assert {"rollback_lr_factor", "seed", "SafeTrainer"} <= code_names(page)
    assert "rollback" not in code_names(page) and "lr" not in code_names("`lr-too-high`")
    assert "eval-train-overlap" not in _backticked_codes(page)


# -- the Chinese pages hold them ----------------------------------------------------------------


def _backticked_codes(text: str) -> set[str]:
    return set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", text))


def test_every_finding_code_is_in_the_chinese_checklist():
    missing = [code for code in finding_codes() if code not in _backticked_codes(_read(ZH_CHECKLIST))]
    assert not missing, f"docs/zh/checklist.md does not name these codes of docs/diagnostics.md: {missing}"


def test_every_safetrainer_keyword_is_on_the_chinese_pages_with_its_default():
    named = code_names(_read(ZH_README)) | code_names(_read(ZH_CHECKLIST))
    missing = [name for name in safetrainer_keywords() if name not in named]
    assert not missing, (
        f"docs/zh/README.md and checklist.md do not name these keywords of docs/api.md: {missing}"
    )

    table = section(_read(ZH_README), "参数速查")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", table, flags=re.MULTILINE))
    shown = {name: ast.literal_eval(default) for name, default in rows.items()}
    expected = safetrainer_keywords()
    missing = [name for name in expected if name not in shown]
    assert not missing, f"the parameter table of docs/zh/README.md lacks: {missing}"
    wrong = {name: (shown[name], expected[name]) for name in expected if shown[name] != expected[name]}
    assert not wrong, f"defaults in docs/zh/README.md differ from docs/api.md (shown, api): {wrong}"
    assert set(shown) == set(expected), set(shown) - set(expected)


def test_every_callback_keyword_is_in_the_chinese_lightning_section():
    named = code_names(section(_read(ZH_README), "SafeLoopCallback"))
    missing = [name for name in callback_keywords() if name not in named]
    assert not missing, f"the SafeLoopCallback section of docs/zh/README.md does not name: {missing}"


def test_every_find_lr_and_fit_argument_is_in_the_chinese_pages():
    named = code_names(section(_read(ZH_CHECKLIST), "学习率"))
    missing = [name for name in find_lr_keywords() if name not in named]
    assert not missing, f"item 1 of docs/zh/checklist.md does not name these find_lr arguments: {missing}"
    assert "resume_from" in code_names(_read(ZH_README)) | code_names(_read(ZH_CHECKLIST))


# -- links ----------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters of any script kept)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.DOTALL)
    return {slug(title) for title in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_the_slug_is_githubs():
    assert (
        slug("## 9. DeepSpeed / FSDP / DDP 下用 hook 看梯度".lstrip("# "))
        == "9-deepspeed--fsdp--ddp-下用-hook-看梯度"
    )
    assert slug("`fit(resume_from=None) -> FitResult`") == "fitresume_fromnone---fitresult"
    assert slug("Lightning\uff1a`SafeLoopCallback`") == "lightningsafeloopcallback"  # a full-width colon


@pytest.mark.parametrize("page", [ZH_README, ZH_CHECKLIST], ids=lambda p: p.name)
def test_every_link_of_the_chinese_pages_resolves(page: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
        assert "://" not in target, f"{page.name} links outside the repository: {target}"
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        exists = path.is_file() and path.is_relative_to(ROOT)
        if not exists or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_chinese_pages_and_the_english_readme_link_each_other():
    readme, checklist = _read(ZH_README), _read(ZH_CHECKLIST)
    assert "](../../README.md)" in readme and "](checklist.md)" in readme
    assert "](README.md)" in checklist and "](../../README.md)" in checklist
    english = _read(ROOT / "README.md")
    assert "](docs/zh/README.md)" in english.split("\n## ", 1)[0]  # near the top
    assert "](docs/zh/checklist.md)" in english
