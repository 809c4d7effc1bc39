"""`aevae report` stopped part way (Ctrl-C, SIGTERM, an error or a refusal found after the start): it says what
it finished and what not, keeps its exit status, leaves an earlier report in --out whole, and leaves no empty
folder it made itself.

In process (aevae.cli.main) on the tiny models of `tiny_repo`, with 300 random images standing in for MNIST
and a classifier of zeros: no training, no Ray, no MNIST files. The stop is made to happen at a known point by
a figure function that raises."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from aevae import cli, mnist  # noqa: E402
from aevae.errors import Terminated  # noqa: E402
from aevae.report import build, figures, page  # noqa: E402
from aevae.report import classifier as digit_classifier  # noqa: E402

STOPS = [(KeyboardInterrupt, 130), (Terminated, 128 + signal.SIGTERM)]


@pytest.fixture(autouse=True)
def _fake_data_and_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 random images as both MNIST splits, and a classifier that calls nothing a digit: the report runs
    its parts on them in seconds."""
    _fake(monkeypatch)


def _fake(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    split = mnist.Split(rng.integers(0, 256, (300, 32, 32), dtype=np.uint8), rng.integers(0, 10, 300))
    data = mnist.Mnist(split, split, "fake", {"train-images-idx3-ubyte": "fake"})
    monkeypatch.setattr(mnist, "load", lambda *args: data)
    pooled = digit_classifier.features_in(np.zeros((1, 32, 32))).shape[1]
    zeros = digit_classifier.DigitClassifier(
        np.zeros(pooled, np.float32), np.eye(4, pooled, dtype=np.float32), 1e9, (np.zeros((4, 10), np.float32),),
        (np.zeros(10, np.float32),), {"recipe": digit_classifier.RECIPE, "train_images": 300, "seed": 0})
    monkeypatch.setattr(digit_classifier, "load_or_train", lambda *args, **kwargs: zeros)


def _stop_at(monkeypatch: pytest.MonkeyPatch, module: object, name: str, stop: type[BaseException]) -> None:
    def stopped(*args: object, **kwargs: object) -> None:
        raise stop()

    monkeypatch.setattr(module, name, stopped)


def _report(models: Path, out: Path) -> int:
    return cli.main(["report", "--models-dir", str(models), "--out", str(out), "--no-ae2d", "--test-limit", "100",
                     "--samples", "50"])


@pytest.fixture(scope="module")
def _a_report(_tiny_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One whole report of the tiny models, made once for the tests that need an earlier report in --out."""
    made = tmp_path_factory.mktemp("report")
    models, out = Path(shutil.copytree(_tiny_template, made / "models")), made / "reports"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _fake(monkeypatch)
        assert _report(models, out) == 0
    return out


@pytest.fixture
def earlier(_a_report: Path, tmp_path: Path) -> Path:
    """--out holding an earlier whole report (a fresh copy of `_a_report`)."""
    return Path(shutil.copytree(_a_report, tmp_path / "reports"))


@pytest.mark.parametrize(("stop", "code"), STOPS)
def test_a_stop_before_the_first_figure_leaves_no_folder_it_made(
        stop: type[BaseException], code: int, tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The run made --out/figures at its start: a stop before the first figure left an empty figures/ (and an
    --out with nothing of use in it), which looked like a report that had written nothing."""
    _stop_at(monkeypatch, figures, "reconstructions", stop)
    out = tmp_path / "new" / "reports"
    assert _report(tiny_repo, out) == code
    assert not (tmp_path / "new").exists(), sorted(p.name for p in (tmp_path / "new").rglob("*"))
    err = capsys.readouterr().err
    assert "stopped before any figure was drawn" in err and "rerun `aevae report`" in err, err


def test_a_refusal_after_the_start_leaves_no_folder_it_made(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A repository without `ae` is found missing after --out was made: the refusal left out/figures behind."""
    out = tmp_path / "reports"
    assert _report(tmp_path / "no-models", out) == 2
    assert "unknown model 'ae'" in capsys.readouterr().err
    assert not out.exists()


def test_the_folders_the_user_had_stay_even_empty(tiny_repo: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what this run made goes: an --out the user made stays (its figures/ made by the run goes), and so
    does an empty figures/ the user had, and a folder holding a file."""
    drawn = figures.reconstructions
    _stop_at(monkeypatch, figures, "reconstructions", KeyboardInterrupt)
    mine = tmp_path / "mine"
    mine.mkdir()
    assert _report(tiny_repo, mine) == 130
    assert mine.is_dir() and not (mine / "figures").exists()
    (mine / "figures").mkdir()
    assert _report(tiny_repo, mine) == 130
    assert (mine / "figures").is_dir()
    assert [p.name for p in mine.iterdir()] == ["figures"]  # and no staging folder of the runs
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(figures, "reconstructions", drawn)
    _stop_at(monkeypatch, figures, "pca_scatter", KeyboardInterrupt)  # the first figure is drawn, then the stop
    assert _report(tiny_repo, fresh) == 130
    assert not fresh.exists()  # what was drawn went with the run


@pytest.mark.parametrize(("stop", "code"), STOPS)
def test_a_rerun_that_stops_leaves_the_earlier_report_whole_and_says_so(
        stop: type[BaseException], code: int, tiny_repo: Path, earlier: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C or SIGTERM ended the report with 130 or 143 and not a word of what it had written; and a rerun
    stopped half way had removed the earlier report's page and replaced some of its figures (finished work
    lost, for a page it had not made yet). The figures are drawn aside and published with the page."""
    out = earlier
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len([p for p in before if p.parts[0] == "figures"]) == 10 and Path("index.html") in before
    capsys.readouterr()
    _stop_at(monkeypatch, figures, "violins", stop)  # the third figure: reconstructions and pca are drawn
    assert _report(tiny_repo, out) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "stopped" in line]
    assert len(lines) == 1, err
    assert ("aevae report: stopped: 2 figure(s) drawn (reconstructions.png, pca.png), dropped with the run; the "
            f"report in {out} is as it was (an earlier run's, or none): rerun `aevae report` to finish") == lines[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["figures", "index.html", "numbers.json"]


def test_a_rerun_removes_the_earlier_report_s_figures_it_does_not_draw_and_nothing_else(
        tiny_repo: Path, earlier: Path) -> None:
    """An earlier report with the 2-d comparison, a rerun with --no-ae2d: its traversal figure stayed in figures/
    beside the new page, which no longer shows it. What the earlier numbers.json did not list is not the
    report's to remove."""
    import json

    out = earlier
    numbers = json.loads((out / "numbers.json").read_text())
    numbers["figures"]["traversal_ae-2d"] = "figures/traversal-ae-2d.png"
    (out / "numbers.json").write_text(json.dumps(numbers))
    (out / "figures" / "traversal-ae-2d.png").write_bytes(b"the earlier run's")
    (out / "figures" / "mine.png").write_bytes(b"the user's")
    assert _report(tiny_repo, out) == 0
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert "traversal-ae-2d.png" not in names and "mine.png" in names and len(names) == 11, names
    for text in ('{"figures": {"x": 5}}', "[]", "{", '{"figures": {"x": "../index.html"}}'):  # not a report's
        (out / "numbers.json").write_text(text)
        assert build._figures_named(out / "numbers.json") == set(), text


def test_a_stop_while_the_page_is_published_says_which_half_is_there(tiny_repo: Path, earlier: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every part measured and drawn, the figures and numbers.json published, the stop as the page is written:
    no page of the earlier run is left beside the new figures."""
    out = earlier
    real = build.write_whole

    def stopped_at_the_page(path: Path, *args: object, **kwargs: object) -> None:
        if Path(path).name == build.PAGE:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(build, "write_whole", stopped_at_the_page)
    assert _report(tiny_repo, out) == 130
    err = capsys.readouterr().err
    assert f"stopped: 10 figure(s) written to {out / 'figures'} (reconstructions.png, " in err, err
    assert (f"; {out / 'numbers.json'} written, the page {out / 'index.html'} not: rerun `aevae report` to "
            "finish") in err, err
    assert len(list((out / "figures").glob("*.png"))) == 10
    assert (out / "numbers.json").is_file() and not (out / "index.html").exists()


def test_the_stop_line_names_an_ae2d_the_run_trained_and_a_page_already_written(tmp_path: Path) -> None:
    """A stop after `ae-2d` was trained (minutes of a first run) must say it is kept, or the user expects to
    pay for it again; a stop after the page was written must not ask for a rerun."""
    written = build.Written(tmp_path, tmp_path / ".staging", figures=[tmp_path / ".staging" / "pca.png"],
                            trained="ae-2d/1")
    line = written.stop_line()
    assert line.startswith("aevae report: stopped: 1 figure(s) drawn (pca.png)") and "ae-2d/1, trained by this " \
        "run, is in the repository and will be reused; the report in" in line, line
    written.published = True
    assert "1 figure(s) written to" in written.stop_line() and "the page (index.html, numbers.json" in \
        written.stop_line()
    written.page = {build.PAGE, build.NUMBERS}
    assert written.stop_line().endswith(f"the page is written: {tmp_path / 'index.html'}")
    assert "rerun" not in written.stop_line()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_figure_stopped_while_written_leaves_no_truncated_file(stop: type[BaseException], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop or a full disk during savefig left a truncated PNG under the figure's name (a broken image on the
    page, or in place of an earlier run's whole one)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    path = tmp_path / "figures" / "pca.png"
    path.parent.mkdir()
    path.write_bytes(b"an earlier run's figure")

    def half_written(self: object, target: Path, **kwargs: object) -> None:
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n")
        raise stop()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    with pytest.raises(stop):
        figures._save(plt.figure(), path)
    assert path.read_bytes() == b"an earlier run's figure"
    assert [p.name for p in path.parent.iterdir()] == ["pca.png"]  # no temporary left beside it
