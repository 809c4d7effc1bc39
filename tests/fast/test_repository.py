"""The repository on disk: atomic numbered writes, canonical version names, numbers never reused, symlinks
out of the root refused; and it stays free of torch and of the model runtime."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest

from aevae.manifest import Manifest
from aevae.repository import HIGH_WATER, MANIFEST, STAGING_PREFIX, STALE_SECONDS, ModelRepository, version_number
from aevae.store import ModelStore
from helpers import ROOT, write_tiny


def test_writes_are_numbered_checksummed_and_leave_no_staging(tmp_path: Path) -> None:
    first = write_tiny(tmp_path, "ae", "ae")
    second = write_tiny(tmp_path, "ae", "ae", seed=1)
    assert (first.number, second.number) == (1, 2)
    assert second.manifest.number == 2 and second.manifest.name == "ae"
    assert set(second.manifest.files) == {"weights.pt", "latent_stats.json", "encoder.onnx", "decoder.onnx",
                                         "decoder.int8.onnx"}
    assert second.manifest.runtimes["onnx"]["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in (tmp_path / "ae").iterdir() if not p.name.startswith(".high")) == ["1", "2"]
    on_disk = Manifest.loads((tmp_path / "ae" / "2" / MANIFEST).read_text())
    assert on_disk == second.manifest


def test_a_bad_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model name"):
        ModelRepository(tmp_path).write("../evil", Manifest.from_json({
            "kind": "ae", "latent_dim": 2, "image_shape": [4, 4], "architecture": {}, "files": {}}), {})


def test_numbers_are_never_reused_after_the_newest_is_deleted(tmp_path: Path) -> None:
    write_tiny(tmp_path, "vae")
    write_tiny(tmp_path, "vae")
    shutil.rmtree(tmp_path / "vae" / "2")
    assert write_tiny(tmp_path, "vae").number == 3


@pytest.mark.parametrize("name, number", [("1", 1), ("42", 42), ("9223372036854775807", 2**63 - 1),
                                          ("0", None), ("002", None), ("1e3", None), ("-1", None),
                                          ("99999999999999999999", None), ("9223372036854775808", None)])
def test_only_canonical_decimal_names_are_versions(name: str, number: int | None) -> None:
    assert version_number(name) == number


def test_non_canonical_folders_are_ignored_not_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each folder that looks meant as a version but is none is named, once per store (not at every
    refresh); the writer's hidden entries are not."""
    write_tiny(tmp_path, "vae")
    write_tiny(tmp_path, "vae")
    for name in ("002", "99999999999999999999", "v1"):
        shutil.copytree(tmp_path / "vae" / "2", tmp_path / "vae" / name)
    (tmp_path / "vae" / ".incoming-x").mkdir()
    scan = ModelRepository(tmp_path).scan()
    assert [v.number for v in scan.versions["vae"]] == [1, 2]
    assert sorted(p.name for p, why in scan.ignored if "leading zeros" in why) == ["002", "99999999999999999999", "v1"]
    store = ModelStore(tmp_path, refresh_seconds=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            store.scan()
    assert caplog.text.count("ignoring") == 3 and "v1" in caplog.text and ".incoming" not in caplog.text


def test_an_incomplete_version_is_broken_with_its_reason(tmp_path: Path) -> None:
    write_tiny(tmp_path, "vae")
    shutil.copytree(tmp_path / "vae" / "1", tmp_path / "vae" / "2")
    (tmp_path / "vae" / "2" / MANIFEST).unlink()
    shutil.copytree(tmp_path / "vae" / "1", tmp_path / "vae" / "3")
    data = json.loads((tmp_path / "vae" / "3" / MANIFEST).read_text())
    del data["latent_dim"]
    (tmp_path / "vae" / "3" / MANIFEST).write_text(json.dumps(data))
    (tmp_path / "vae" / "4").mkdir()
    scan = ModelRepository(tmp_path).scan()
    assert [v.number for v in scan.versions["vae"]] == [1]
    reasons = {b.number: b.reason for b in scan.broken}
    assert reasons[2] == "no manifest.json" and "'latent_dim'" in reasons[3] and reasons[4] == "no manifest.json"


def test_a_symlink_out_of_the_root_is_broken_unless_allowed(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    write_tiny(root, "vae")
    write_tiny(elsewhere, "vae")
    (root / "vae" / "2").symlink_to(elsewhere / "vae" / "1")
    scan = ModelRepository(root).scan()
    assert [v.number for v in scan.versions["vae"]] == [1]
    assert "outside the repository root" in scan.broken[0].reason
    assert [v.number for v in ModelRepository(root, allow_symlinks=True).versions()["vae"]] == [1, 2]


def test_a_symlink_loop_or_an_oversized_manifest_breaks_only_its_version(tmp_path: Path) -> None:
    write_tiny(tmp_path, "vae")
    for number in (2, 3):
        shutil.copytree(tmp_path / "vae" / "1", tmp_path / "vae" / str(number))
    (tmp_path / "vae" / "2" / "weights.pt").unlink()
    (tmp_path / "vae" / "2" / "weights.pt").symlink_to("weights.pt")  # points at itself
    manifest = tmp_path / "vae" / "3" / MANIFEST
    manifest.write_text(" " * (2 << 20) + manifest.read_text())
    scan = ModelRepository(tmp_path).scan()
    assert [v.number for v in scan.versions["vae"]] == [1]
    reasons = {b.number: b.reason for b in scan.broken}
    assert reasons[2].startswith("weights.pt cannot be resolved")
    assert reasons[3] == "manifest.json is over 1048576 bytes; a manifest is a few KiB"


def test_the_repository_imports_neither_torch_nor_the_runtime() -> None:
    tree = ast.parse((ROOT / "aevae" / "repository.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "torch" or m in ("aevae.inference", "aevae.runtimes")}


def test_a_repository_that_cannot_be_written_says_so_before_any_work(tmp_path: Path) -> None:
    from aevae.errors import UserError

    ModelRepository(tmp_path / "new" / "models").ensure_writable()
    assert not (tmp_path / "new").exists()  # checked, not created: a run that fails later leaves nothing
    (tmp_path / "file").write_text("not a folder")
    for root in (tmp_path / "file", tmp_path / "file" / "models"):
        with pytest.raises(UserError, match=r"cannot write model versions under .*: .*file is a file, not a folder; "
                                            r"pass --models-dir"):
            ModelRepository(root).ensure_writable()


def test_a_version_gets_the_permissions_of_an_ordinary_folder(tmp_path: Path) -> None:
    """Not tempfile's 0o700: a service running as another user (the containers' 10001) could not read a
    version a trainer wrote, and found it broken, Permission denied."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        version = write_tiny(tmp_path, "vae")
    finally:
        os.umask(old)
    assert stat.S_IMODE(version.path.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "vae" / ".high-water").stat().st_mode) == 0o644
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in version.path.iterdir())


def test_the_high_water_mark_is_never_lowered_by_a_writer_finishing_alongside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers of versions 5 and 6 set the mark together: 6 must stay, or it is given out again once its folder
    is deleted. Version 6's writer sets its mark while version 5's is about to replace the file."""
    import os
    import threading

    model_dir = tmp_path / "vae"
    model_dir.mkdir()
    (model_dir / ".high-water").write_text("4\n")
    repository = ModelRepository(tmp_path)
    replace = os.replace
    other: list[threading.Thread] = []

    def replace_after_the_other_writer(src: str, dst: object) -> None:
        if str(dst).endswith(".high-water") and not other:
            other.append(threading.Thread(target=repository._set_high_water, args=(model_dir, 6)))
            other[0].start()
            other[0].join(timeout=0.5)  # with the lock it waits for this writer instead
        replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace_after_the_other_writer)
    repository._set_high_water(model_dir, 5)
    other[0].join(timeout=10)
    assert (model_dir / ".high-water").read_text().strip() == "6"


def test_a_version_number_past_the_largest_is_refused_never_written_unlisted(tmp_path: Path) -> None:
    from aevae.errors import UserError
    from aevae.repository import MAX_NUMBER

    write_tiny(tmp_path, "vae")
    (tmp_path / "vae" / ".high-water").write_text(f"{MAX_NUMBER}\n")
    with pytest.raises(UserError, match=f"next number would be past {MAX_NUMBER}"):
        ModelRepository(tmp_path).ensure_writable(["vae"])
    with pytest.raises(ValueError, match=f"next version number would be {MAX_NUMBER + 1}"):
        write_tiny(tmp_path, "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir() if not p.name.startswith(".")) == ["1"]


def test_a_disk_too_full_for_the_versions_is_refused_before_any_work(tmp_path: Path) -> None:
    """An empty temporary file is created even on a full disk: the space is checked on its own."""
    import shutil

    from aevae.errors import UserError

    free = shutil.disk_usage(tmp_path).free
    ModelRepository(tmp_path / "models").ensure_writable(["ae", "vae"], needed_bytes=1 << 20)
    with pytest.raises(UserError, match=r"cannot write model versions under .*: they need about .* MiB, and .* MiB "
                                        r"is free there"):
        ModelRepository(tmp_path / "models").ensure_writable(["ae", "vae"], needed_bytes=free + (1 << 30))
    assert not (tmp_path / "models").exists()


def test_adding_files_that_cannot_be_written_leaves_the_version_as_it_was(tmp_path: Path) -> None:
    import errno

    version = write_tiny(tmp_path, "vae")
    before = sorted(p.name for p in version.path.iterdir())

    def full_disk(path: Path) -> None:
        path.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError):
        ModelRepository(tmp_path).add_files(version, {"extra.bin": full_disk})
    assert sorted(p.name for p in version.path.iterdir()) == before  # no .extra.bin.incoming left behind


def test_files_added_stay_once_the_manifest_lists_them_and_a_second_adder_adds_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the new manifest is in place (the folder's fsync; a SIGTERM there) removed the files it
    lists, leaving a version broken for good ("no extra.bin"). And a second command adding the same files (two
    `aevae export-onnx` at once) reads the manifest anew under the model's lock: it finds them and adds nothing."""
    import errno

    from aevae import repository as repo_module

    version = write_tiny(tmp_path, "vae")
    real = repo_module.fsync_path

    def failing_on_the_folder(path: Path) -> None:
        if Path(path) == version.path:
            raise OSError(errno.EIO, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(repo_module, "fsync_path", failing_on_the_folder)
    with pytest.raises(OSError):
        ModelRepository(tmp_path).add_files(version, {"extra.bin": lambda path: path.write_bytes(b"data")})
    monkeypatch.setattr(repo_module, "fsync_path", real)
    again = ModelRepository(tmp_path).scan().versions["vae"][-1]  # the version is whole, with the file
    assert "extra.bin" in again.manifest.files and (again.path / "extra.bin").read_bytes() == b"data"
    again.check_files()
    calls: list[str] = []
    stale = version  # a caller holding the version as it was before the file was added
    added = ModelRepository(tmp_path).add_files(stale, {"extra.bin": lambda path: calls.append("wrote")})
    assert calls == [] and added.manifest.files == again.manifest.files
    assert not [p.name for p in version.path.iterdir() if p.name.endswith(".incoming")]


@pytest.mark.parametrize("stop_after", ["extra.bin", MANIFEST])
def test_a_stop_as_a_rename_returns_leaves_the_version_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              stop_after: str) -> None:
    """Ctrl-C (and SIGTERM, raised as Terminated, a KeyboardInterrupt) is raised as the rename returns, before
    the next statement. After the manifest's rename, add_files removed the files the manifest now listed: the
    version was broken for good ("no extra.bin"). After a file's rename, it kept that file, listed nowhere."""
    import os

    from aevae import repository as repo_module

    version = write_tiny(tmp_path, "vae")
    before = sorted(p.name for p in version.path.iterdir())
    real = os.replace

    def stopped_as_it_returns(source: object, target: object) -> None:
        real(source, target)  # type: ignore[arg-type]
        if Path(str(target)).name == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(repo_module.os, "replace", stopped_as_it_returns)
    with pytest.raises(KeyboardInterrupt):
        ModelRepository(tmp_path).add_files(version, {"extra.bin": lambda path: path.write_bytes(b"data")})
    monkeypatch.setattr(repo_module.os, "replace", real)
    scan = ModelRepository(tmp_path).scan()
    assert not scan.broken, scan.broken
    (again,) = scan.versions["vae"]
    again.check_files()
    listed = stop_after == MANIFEST  # the manifest naming it was in place: it stays, else it goes
    assert ("extra.bin" in again.manifest.files) is listed
    assert sorted(p.name for p in version.path.iterdir()) == sorted([*before, *(["extra.bin"] if listed else [])])


def test_a_version_in_place_is_reported_written_even_if_its_high_water_mark_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The mark's two bytes can find the disk the version just filled: the version is complete, so a failure
    would only have a caller (the trainer) call it lost and train it again."""
    (tmp_path / "vae" / ".high-water").mkdir(parents=True)  # in the way of the mark, as a full disk would be
    with caplog.at_level(logging.WARNING):
        version = write_tiny(tmp_path, "vae")
    assert version.number == 1 and [v.number for v in ModelRepository(tmp_path).versions()["vae"]] == [1]
    assert "vae/1 written, but its high-water mark could not be raised" in caplog.text


def test_a_killed_writers_leftovers_are_removed_by_the_next_writer_once_stale(tmp_path: Path) -> None:
    """A writer killed mid-write leaves its hidden staging folder (megabytes of weights) and maybe a high-water
    file being replaced; the next writer of the model removes those an hour old, and leaves a live writer's."""
    import os
    import time

    write_tiny(tmp_path, "vae")
    model_dir = tmp_path / "vae"
    old = time.time() - STALE_SECONDS - 60
    stale_folder = model_dir / f"{STAGING_PREFIX}dead"
    stale_folder.mkdir()
    (stale_folder / "weights.pt").write_bytes(b"x" * 1000)
    stale_mark = model_dir / f"{HIGH_WATER}-dead"
    stale_mark.write_text("7\n")
    live_folder = model_dir / f"{STAGING_PREFIX}live"
    live_folder.mkdir()
    for path in (stale_folder, stale_mark):
        os.utime(path, (old, old))
    write_tiny(tmp_path, "vae")
    left = sorted(p.name for p in model_dir.iterdir())
    assert left == sorted([HIGH_WATER, f"{HIGH_WATER}.lock", f"{STAGING_PREFIX}live", "1", "2"])
    assert ModelRepository(tmp_path).scan().versions["vae"][-1].number == 2  # the stale mark's 7 was never read
    # a file being added to a version (aevae export-onnx) when its writer was killed
    version = ModelRepository(tmp_path).scan().versions["vae"][-1]
    stale_file, live_file = version.path / ".extra.onnx.incoming", version.path / ".other.onnx.incoming"
    for path in (stale_file, live_file):
        path.write_bytes(b"half")
    os.utime(stale_file, (old, old))
    ModelRepository(tmp_path).add_files(version, {"notes.txt": lambda path: path.write_text("n")})
    assert not stale_file.exists() and live_file.exists() and (version.path / "notes.txt").is_file()


def test_a_written_version_is_flushed_to_disk_before_it_is_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file of the version, the staging folder, then the model folder after the rename, in that order: a
    rename can reach the disk before the data of the files renamed."""
    import os

    from aevae import repository

    order: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(repository.os, "fsync", lambda fd: (order.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                            real_fsync(fd))[1])
    monkeypatch.setattr(repository.os, "rename", lambda a, b: (order.append(f"rename {Path(b).name}"),
                                                              real_rename(a, b))[1])
    write_tiny(tmp_path, "vae")
    rename = order.index("rename 1")
    before = [Path(p) for p in order[:rename]]
    assert {p.name for p in before if p.parent.name.startswith(STAGING_PREFIX)} >= {MANIFEST, "weights.pt",
                                                                                     "decoder.onnx"}
    assert before[-1].name.startswith(STAGING_PREFIX)  # the folder's entries last
    assert Path(order[rename + 1]) == (tmp_path / "vae").resolve()


def test_what_exists_is_described_in_bounded_length(tmp_path: Path) -> None:
    """NOT_FOUND names what exists; with every version of every model listed, a repository of thousands of
    versions made a status over gRPC's 16 KiB of metadata, and the client got RESOURCE_EXHAUSTED about
    metadata instead of NOT_FOUND."""
    from types import SimpleNamespace

    from aevae.repository import Scan

    few = Scan(versions={"ae": [SimpleNamespace(number=n) for n in (1, 2, 3)]})  # type: ignore[misc]
    assert few.describe(tmp_path) == "ae: 1, 2, 3"
    many = [SimpleNamespace(number=2**62 + n) for n in range(5000)]
    huge = Scan(versions={f"m{i:03d}-{'x' * 56}": many for i in range(300)})  # type: ignore[misc]
    text = huge.describe(tmp_path)
    assert len(text.encode()) < 8192, len(text)
    assert text.startswith(f"m000-{'x' * 56}: {2**62}, {2**62 + 1}, {2**62 + 2}, ..., ")
    assert f"{2**62 + 4999} (5000 versions)" in text and text.endswith("; and 280 more models")


def test_an_empty_answer_says_why_when_the_scan_knows(tmp_path: Path) -> None:
    """A models folder the service may not read (its permissions, a container's uid) was described as "no models
    in models (train some ...)", naming only the folder's last part and sending its operator off to train."""
    from aevae.repository import BrokenVersion, Scan

    denied = Scan(ignored=[(tmp_path / "vae", "the model folder cannot be read: Permission denied")])
    assert denied.describe(tmp_path) == (f"no models readable in {tmp_path}: the model folder cannot be read: "
                                         "Permission denied")
    broken = Scan(broken=[BrokenVersion("vae", 1, tmp_path / "vae" / "1", "weights.pt does not match")])
    assert broken.describe(tmp_path) == (f"no loadable model in {tmp_path}: 1 broken version(s), e.g. vae/1: "
                                         "weights.pt does not match")
    assert Scan().describe(tmp_path) == f"no models in {tmp_path} (train some with `aevae train`)"
    afile = tmp_path / "models.txt"
    afile.write_text("")
    assert Scan().describe(afile) == f"no models: {afile} is a file, not a folder (--models-dir names the repository's folder)"


def test_a_name_is_matched_whole_a_final_newline_included(tmp_path: Path) -> None:
    """`$` also matches before a final newline: a folder "vae\\n" was served as a model of that name, and a
    writer took it."""
    write_tiny(tmp_path, "vae")
    shutil.copytree(tmp_path / "vae", tmp_path / "vae\n")
    assert list(ModelRepository(tmp_path).scan().versions) == ["vae"]
    with pytest.raises(ValueError, match="model name"):
        ModelRepository(tmp_path).write("ae\n", Manifest.from_json({
            "kind": "ae", "latent_dim": 2, "image_shape": [4, 4], "architecture": {}, "files": {}}), {})


def test_a_name_no_folder_can_have_does_not_make_the_store_look_again(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown names are looked for again on disk (a version written since); names no model folder can have
    ("../x", NUL bytes) are refused without a rescan, which any client could otherwise force on every call."""
    from aevae.errors import NotFound

    write_tiny(tmp_path, "vae")
    store = ModelStore(tmp_path)
    forced: list[bool] = []
    scan = store.scan
    monkeypatch.setattr(store, "scan", lambda force=False: (forced.append(force), scan(force))[1])
    for name in ("../vae", "vae\x00", "/etc/passwd", "VAE"):
        with pytest.raises(NotFound):
            store.resolve(name, None)
    assert forced and True not in forced
    with pytest.raises(NotFound):
        store.resolve("ae", None)
    assert True in forced  # a name a folder may have: looked for again


def test_a_models_dir_that_is_a_symlink_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    """Every command ended in Path.resolve's RuntimeError traceback (serve, export-onnx)."""
    from aevae.errors import UserError
    from aevae.repository import models_dir

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="is a loop of symbolic links"):
        models_dir(str(loop))
    assert models_dir(str(tmp_path / "later")) == tmp_path / "later"  # a folder yet to be made is fine
