"""`aevae export-onnx`, in process: the test figures it measures for a version that already has its graphs, and
what it says when it is stopped part-way over several versions. MNIST is faked by a data root of small IDX
files that mnist.FILES is made to describe (the real loader reads them); no Ray, no subprocess."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aevae import cli, export_command, mnist, onnx_export
from aevae.errors import Terminated
from aevae.onnx_export import DECODER_INT8
from aevae.repository import MANIFEST, ModelRepository

pytest.importorskip("onnxruntime")
TEST_IMAGES = 300  # per split of the fake MNIST


def _idx_images(rng: np.random.Generator, count: int) -> bytes:
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    return header + rng.integers(0, 256, count * 28 * 28, dtype=np.uint8).tobytes()


def _idx_labels(count: int) -> bytes:
    return (2049).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(i % 10 for i in range(count))


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root with MNIST/raw/ of TEST_IMAGES random images per split (32 x 32 once padded, as the tiny
    ae and vae models take); AEVAE_DATA_ROOT unset, so only --data-root gives test images."""
    monkeypatch.delenv(mnist.DATA_ROOT_ENV, raising=False)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    for name, (_, _, magic, _) in mnist.FILES.items():
        data = _idx_images(rng, TEST_IMAGES) if magic == 2051 else _idx_labels(TEST_IMAGES)
        (raw / name).write_bytes(data)
        files[name] = (len(data), hashlib.sha256(data).hexdigest(), magic, TEST_IMAGES)
    monkeypatch.setattr(mnist, "FILES", files)
    return raw.parent.parent


@pytest.fixture
def no_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test images from the environment (make exports AEVAE_DATA_ROOT): nothing is measured."""
    monkeypatch.delenv(mnist.DATA_ROOT_ENV, raising=False)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a version folder (hidden temporaries included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def _without_int8(folder: Path) -> None:
    """The version as written before the trainer made the int8 decoder: no graph, no precision entries."""
    manifest = _manifest(folder)
    del manifest["files"][DECODER_INT8]
    for name in ("int8", "bf16"):
        manifest["runtimes"].pop(name, None)
    (folder / DECODER_INT8).unlink()
    (folder / MANIFEST).write_text(json.dumps(manifest))


# -- 1. test figures for a version that has all its graphs ---------------------------------------------------
def test_a_version_with_its_graphs_gets_its_test_figures_measured_and_recorded(
        tiny_repo: Path, data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With every graph in place, `--data-root` printed "has its ONNX graphs" and measured nothing: a version
    converted without test images could not get its reduced-precision figures but by deleting a graph."""
    folder = tiny_repo / "vae" / "1"
    before = _manifest(folder)
    assert "test" not in before["runtimes"]["int8"] and "test" not in before["runtimes"]["bf16"]
    files = {name: data for name, data in _files(folder).items() if name != MANIFEST}
    argv = ["export-onnx", "--models-dir", str(tiny_repo), "--data-root", str(data_root)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert (f"vae/1: measured the int8 and bf16 decoders on {TEST_IMAGES} test images (test BCE vs fp32: int8 "
            in captured.out), captured.out
    assert "ae/1: measured the int8 and bf16 decoders" in captured.out
    # vae8's images are 24 x 20: not measured on 32 x 32 test images, and said so (not "broken")
    assert "vae8/1: its test figures are not measured: its images are 24 x 20, the test images 32 x 32" in captured.err
    assert "broken" not in captured.err
    assert {n: d for n, d in _files(folder).items() if n != MANIFEST} == files  # graphs, weights: byte for byte
    after = _manifest(folder)
    assert after["files"] == before["files"]
    for name in ("int8", "bf16"):
        test = after["runtimes"][name]["test"]
        assert test["images"] == TEST_IMAGES and test["bce_cost"] == round(test["bce"] - test["fp32_bce"], 4)
        assert {k: v for k, v in after["runtimes"][name].items() if k != "test"} == before["runtimes"][name]
    assert after["runtimes"]["int8"]["test"]["fp32_bce"] == after["runtimes"]["bf16"]["test"]["fp32_bce"]
    assert {k: v for k, v in after.items() if k != "runtimes"} == {k: v for k, v in before.items() if k != "runtimes"}
    (version,) = ModelRepository(tiny_repo).versions()["vae"]
    version.check_files()  # whole: every file matches the manifest's checksums
    # a second run finds the figures and leaves the version alone
    recorded = (folder / MANIFEST).read_bytes()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "vae/1: has its ONNX graphs and test figures" in out and "measured" not in out, out
    assert (folder / MANIFEST).read_bytes() == recorded


def test_the_figures_recorded_are_the_ones_the_trainer_s_writer_measures(tiny_repo: Path, data_root: Path) -> None:
    """Measured on the version's own int8 graph, the same way as when the graph is made: the figures match
    what reduced_precision gives for the same graphs, model and images."""
    from aevae.inference import load
    from aevae.runtimes import torch_module

    (version,) = ModelRepository(tiny_repo).versions()["vae"]
    images = mnist.load(data_root).test.floats()
    graphs = {name: version.file(name).read_bytes() for name in ("encoder.onnx", "decoder.onnx")}
    _, expected = onnx_export.reduced_precision(graphs, torch_module(load(version, prefer="torch")), images)
    recorded = export_command.record_figures(ModelRepository(tiny_repo), version, images)
    assert recorded is not None
    for name in ("int8", "bf16"):
        assert recorded.manifest.runtimes[name]["test"] == expected[name]["test"]


def test_without_a_data_root_it_says_the_figures_are_missing_and_changes_nothing(
        tiny_repo: Path, no_data_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = (tiny_repo / "vae" / "1" / MANIFEST).read_bytes()
    assert cli.main(["export-onnx", "--models-dir", str(tiny_repo), "vae"]) == 0
    out = capsys.readouterr().out
    assert "vae/1: has its ONNX graphs (not the int8 and bf16 test figures: --data-root measures them)" in out, out
    assert (tiny_repo / "vae" / "1" / MANIFEST).read_bytes() == manifest


def test_a_figure_recorded_meanwhile_by_another_export_onnx_is_kept(tiny_repo: Path, data_root: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest is read anew under the model's lock before it is changed: what another writer recorded
    while this one measured stays, and only the figures still lacking are added."""
    repository = ModelRepository(tiny_repo)
    (version,) = repository.versions()["vae"]
    theirs = {"bce": 1.0, "by": "the other export-onnx"}
    real = onnx_export.precision_entries

    def measured_while_another_records(*args: Any, **kwargs: Any) -> Any:
        entries = real(*args, **kwargs)

        def record(current: Any) -> Any:
            return current.with_(runtimes={**current.runtimes, "int8": {**current.runtimes["int8"], "test": theirs}})
        assert ModelRepository(tiny_repo).amend_manifest(version, record) is not None
        return entries

    monkeypatch.setattr(onnx_export, "precision_entries", measured_while_another_records)
    images = mnist.load(data_root).test.floats()
    recorded = export_command.record_figures(repository, version, images)
    assert recorded is not None
    assert recorded.manifest.runtimes["int8"]["test"] == theirs  # kept, not overwritten with a stale copy
    assert recorded.manifest.runtimes["bf16"]["test"]["images"] == TEST_IMAGES
    assert "vae/1: measured the bf16 decoders on" in capsys.readouterr().out


def test_two_export_onnx_measuring_one_version_at_once_record_its_figures_once(tiny_repo: Path,
                                                                               data_root: Path) -> None:
    """Both measure; under the lock the second finds the figures the first recorded and writes nothing. The
    manifest stays whole and its files as they were."""
    folder = tiny_repo / "vae" / "1"
    files = {n: d for n, d in _files(folder).items() if n != MANIFEST}
    images = mnist.load(data_root).test.floats()
    results: list[Any] = []
    errors: list[BaseException] = []

    def measure() -> None:
        try:
            repository = ModelRepository(tiny_repo)
            results.append(export_command.record_figures(repository, repository.versions()["vae"][0], images))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=measure) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sum(r is not None for r in results) == 1, (errors, results)
    (version,) = ModelRepository(tiny_repo).versions()["vae"]
    version.check_files()
    assert all("test" in version.manifest.runtimes[name] for name in ("int8", "bf16"))
    assert {n: d for n, d in _files(folder).items() if n != MANIFEST} == files


def test_amend_manifest_may_not_change_the_files(tiny_repo: Path) -> None:
    """Files and their checksums come only with add_files, which writes the file first."""
    repository = ModelRepository(tiny_repo)
    (version,) = repository.versions()["vae"]
    before = (version.path / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="leaves the files and their checksums as they are"):
        repository.amend_manifest(version, lambda m: m.with_(files={**m.files, "x.bin": "0" * 64}))
    assert (version.path / MANIFEST).read_bytes() == before
    assert repository.amend_manifest(version, lambda m: None) is None


def test_a_data_root_without_mnist_is_a_one_line_error_before_any_work(
        tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(mnist.DATA_ROOT_ENV, raising=False)
    _without_int8(tiny_repo / "ae" / "1")
    before = _files(tiny_repo / "ae" / "1")
    (tmp_path / "nothing").mkdir()
    code = cli.main(["export-onnx", "--models-dir", str(tiny_repo), "--data-root", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"aevae export-onnx: error: MNIST not available (looked in {tmp_path / 'nothing' / 'MNIST' / 'raw'}). "
            "Pass --data-root DIR") in err, err
    assert _files(tiny_repo / "ae" / "1") == before


# -- 2. stopped part-way: one line saying what is done and what is not ----------------------------------------
@pytest.mark.parametrize(("stop", "status"), [(KeyboardInterrupt, 130), (Terminated, 128 + signal.SIGTERM)])
def test_a_stop_between_versions_names_what_was_converted_and_what_was_left(
        tiny_repo: Path, no_data_root: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        stop: type[BaseException], status: int) -> None:
    """Ctrl-C or SIGTERM during export-onnx over several versions exited 130 / 143 without a word: which
    versions had their graphs, and which were left as they were, was for the user to find out."""
    for name in ("ae", "vae", "vae8"):
        _without_int8(tiny_repo / name / "1")
    before = {name: _files(tiny_repo / name / "1") for name in ("vae", "vae8")}
    real = export_command.add_graphs
    calls: list[str] = []

    def stopped_on_the_second(repository: Any, version: Any, *args: Any) -> Any:
        calls.append(str(version))
        if len(calls) == 2:
            raise stop()
        return real(repository, version, *args)

    monkeypatch.setattr(export_command, "add_graphs", stopped_on_the_second)
    assert cli.main(["export-onnx", "--models-dir", str(tiny_repo)]) == status
    err = capsys.readouterr().err
    assert ("stopped: graphs added to ae/1; vae/1 left as it was (nothing of it changed); 1 version(s) not "
            "reached; the same command again does the rest") in err, err
    assert "Traceback" not in err
    assert DECODER_INT8 in ModelRepository(tiny_repo).versions()["ae"][0].manifest.files
    assert {name: _files(tiny_repo / name / "1") for name in ("vae", "vae8")} == before


@pytest.mark.parametrize(("after", "line", "int8_listed"), [
    # the int8 graph renamed into place, its manifest not yet: the graph goes again, the version is as it was
    (DECODER_INT8, "stopped: no version changed; ae/1 left as it was (nothing of it changed)", False),
    # the manifest listing it renamed into place: the change is done, and said so
    (MANIFEST, "stopped: graphs added to ae/1; 2 version(s) not reached", True),
])
def test_a_stop_inside_the_write_leaves_the_version_whole_and_says_which_way(
        tiny_repo: Path, no_data_root: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        after: str, line: str, int8_listed: bool) -> None:
    """A KeyboardInterrupt is raised as the rename returns, before the next statement: add_files removed the
    graphs a manifest already listed (a version broken for good) and left one renamed just before the stop,
    listed nowhere. Whichever way it fell, the version is whole and the line says which."""
    import os

    from aevae import repository as repository_module

    for name in ("ae", "vae", "vae8"):
        _without_int8(tiny_repo / name / "1")
    folder = tiny_repo / "ae" / "1"
    before = _files(folder)
    real = os.replace

    def stop_after(source: Any, target: Any) -> None:
        real(source, target)
        if Path(target) == folder / after:
            raise KeyboardInterrupt

    monkeypatch.setattr(repository_module.os, "replace", stop_after)
    assert cli.main(["export-onnx", "--models-dir", str(tiny_repo)]) == 130
    monkeypatch.setattr(repository_module.os, "replace", real)
    err = capsys.readouterr().err
    assert line in err, err
    (version,) = ModelRepository(tiny_repo).versions()["ae"]
    version.check_files()
    assert (DECODER_INT8 in version.manifest.files) is int8_listed
    assert not [name for name in os.listdir(folder) if name.endswith(".incoming")]
    if not int8_listed:
        assert _files(folder) == before


def test_graphs_another_export_onnx_added_meanwhile_are_kept_and_named_so(
        tiny_repo: Path, no_data_root: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs converting one version at once: the second's add_files finds the graphs listed under the lock
    and adds nothing, yet it printed "wrote decoder.int8.onnx" and counted the version as its own work."""
    folder = tiny_repo / "vae" / "1"
    _without_int8(folder)
    repository = ModelRepository(tiny_repo)
    (version,) = repository.versions()["vae"]
    real = onnx_export.reduced_precision

    def while_another_adds_its_own(*args: Any, **kwargs: Any) -> Any:
        made = real(*args, **kwargs)
        ModelRepository(tiny_repo).add_files(version, {DECODER_INT8: onnx_export.bytes_writer(b"theirs")})
        return made

    monkeypatch.setattr(onnx_export, "reduced_precision", while_another_adds_its_own)
    export_command.add_graphs(repository, version)
    out = capsys.readouterr().out
    assert "vae/1: has its ONNX graphs (added meanwhile by another export-onnx)" in out and "wrote" not in out, out
    assert (folder / DECODER_INT8).read_bytes() == b"theirs"


def test_a_version_changed_while_measured_is_named_as_changed_not_broken(
        tiny_repo: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Another writer replaced a graph while this run measured the version: nothing is recorded, and the
    version was listed as "broken", which sent its owner looking for damage that was another's change."""
    folder = tiny_repo / "vae" / "1"
    real = onnx_export.precision_entries

    def while_another_replaces_the_int8_graph(*args: Any, **kwargs: Any) -> Any:
        entries = real(*args, **kwargs)
        if (folder / MANIFEST).exists():
            manifest = _manifest(folder)
            (folder / DECODER_INT8).write_bytes(b"another writer's graph")
            manifest["files"][DECODER_INT8] = hashlib.sha256(b"another writer's graph").hexdigest()
            (folder / MANIFEST).write_text(json.dumps(manifest))
        return entries

    monkeypatch.setattr(onnx_export, "precision_entries", while_another_replaces_the_int8_graph)
    code = cli.main(["export-onnx", "vae/1", "--models-dir", str(tiny_repo), "--data-root", str(data_root)])
    err = capsys.readouterr().err
    assert code == 2
    assert "vae/1: not measured: its files changed while they were measured (another writer)" in err, err
    assert "1 version(s) changed by another writer while measured, not measured: vae/1 (run export-onnx again)" \
        in err, err
    assert "broken" not in err, err
    assert "test" not in _manifest(folder)["runtimes"]["int8"]  # nothing recorded
