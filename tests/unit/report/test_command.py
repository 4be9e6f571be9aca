"""`safeloop report`: the files it writes, and one clear line with exit code 2 for what it cannot draw."""

from __future__ import annotations

import base64
import re
import sys

import pytest

from safeloop.cli import main
from safeloop.results import FitResult
from tests.unit.report import records


def _report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_report_is_one_self_contained_page_with_the_pngs_beside_it(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    records.write(tmp_path / "run", records.eventful_run())
    code, out, err = _report(capsys, str(tmp_path / "run"), "-o", str(tmp_path / "out" / "page.html"))
    assert code == 0 and not err and "wrote" in out
    page = (tmp_path / "out" / "page.html").read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert "page-loss.png" in pngs and "page-update-ratio-branch-1.png" in pngs
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(pngs) and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch: it opens offline
    # the findings, most severe first, each with its fix
    assert page.index("nonfinite-loss") < page.index("loss-spike</span>") < page.index("resume-fresh-start")
    assert "check the data" in page and "lower the lr" in page


def test_a_killed_runs_record_is_drawn_with_a_note(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    records.write(tmp_path, records.eventful_run()[:6], tail=records.log(15, 1.0)[:30])
    code, out, _ = _report(capsys, str(tmp_path))
    assert code == 0 and "note: the last line (7) was cut" in out and (tmp_path / "report.html").exists()


NEWER = ['{"v":1,"type":"fit","step":0}\n', '{"v":9,"type":"log"}\n']


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda path: path.mkdir(), "no run record in"),
        (lambda path: records.write(path, NEWER), "format version 9"),
        (
            lambda path: records.write(path, [records.fit(), "garbage\n", records.log(5, 1.0)]),
            "line 2 is not JSON",
        ),
    ],
)
def test_what_cannot_be_drawn_is_one_line_on_stderr_and_exit_code_2(tmp_path, capsys, make, expected):
    make(tmp_path / "run")
    code, out, err = _report(capsys, str(tmp_path / "run"))
    assert code == 2 and not out and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_without_matplotlib_the_command_and_plot_name_the_extra(tmp_path, capsys, monkeypatch):
    records.write(tmp_path, records.eventful_run())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = _report(capsys, str(tmp_path))
    assert code == 2 and 'pip install "safeloop[report]"' in err and len(err.strip().splitlines()) == 1
    with pytest.raises(
        ImportError, match=r'FitResult\.plot needs matplotlib.*pip install "safeloop\[report\]"'
    ):
        FitResult(global_step=1).plot()
