"""The one load path's policy: the newest loadable version is the default, a broken one is marked once and
reported, an explicit request for it fails with the reason, and changed files are never served stale."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aevae.errors import FailedPrecondition, NotFound
from aevae.repository import WEIGHTS, sha256_file
from aevae.store import ModelStore
from helpers import write_tiny


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_is_skipped_by_default_and_reported(tiny_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tiny(tiny_repo, "vae", seed=1)
    _flip(tiny_repo / "vae" / "2" / WEIGHTS)
    store = ModelStore(tiny_repo, refresh_seconds=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert store.get("vae").number == 1
        (summary,) = [s for s in store.summaries() if s.name == "vae"]
    assert summary.number == 1 and summary.numbers == [1]
    assert "checksum" in summary.broken[2]
    assert caplog.text.count("vae/2 is broken") == 1  # marked once, not re-hashed per request
    with pytest.raises(FailedPrecondition, match=r"model 'vae' version 2 is broken: .*checksum"):
        store.get("vae", 2)


def test_no_loadable_version_is_a_failed_precondition_with_every_reason(tiny_repo: Path) -> None:
    _flip(tiny_repo / "ae" / "1" / WEIGHTS)
    store = ModelStore(tiny_repo)
    with pytest.raises(FailedPrecondition, match=r"no loadable version of model 'ae': version 1: .*checksum"):
        store.get("ae")
    (summary,) = [s for s in store.summaries() if s.name == "ae"]
    assert summary.number == 0 and summary.numbers == [] and 1 in summary.broken


def test_graphs_that_do_not_take_what_the_manifest_says_break_the_version(tiny_repo: Path) -> None:
    """A manifest edited to describe another model (its architecture edited to agree) over the old graphs:
    broken with the reason at load, instead of every request failing inside ONNX Runtime."""
    write_tiny(tiny_repo, "vae", seed=1)
    path = tiny_repo / "vae" / "2" / "manifest.json"
    data = json.loads(path.read_text())
    data["latent_dim"] = data["architecture"]["latent_dim"] = 8
    path.write_text(json.dumps(data))
    store = ModelStore(tiny_repo, refresh_seconds=0, runtime="onnx")
    assert store.get("vae").number == 1
    with pytest.raises(FailedPrecondition, match=r"version 2 is broken: decoder.onnx takes or gives latents of "
                                                 r"N x 4, but the manifest says N x 8"):
        store.get("vae", 2)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_and_never_run(tiny_repo: Path, tmp_path: Path) -> None:
    version = write_tiny(tiny_repo, "vae", seed=1)
    marker = tmp_path / "pwned"
    weights = version.file(WEIGHTS)
    state = torch.load(weights, weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, weights)
    manifest = version.manifest.with_(files={**version.manifest.files, WEIGHTS: sha256_file(weights)})
    version.file("manifest.json").write_text(manifest.dumps())  # a consistent checksum: only the pickle is bad
    store = ModelStore(tiny_repo, runtime="torch")  # the runtime that reads weights.pt
    with pytest.raises(FailedPrecondition, match="version 2 is broken"):
        store.get("vae", 2)
    assert store.get("vae").number == 1
    assert not marker.exists()


def test_a_model_whose_only_manifest_is_unreadable_is_broken_not_unknown(tiny_repo: Path) -> None:
    """A corrupt manifest.json leaves nothing that describes the version, but the model is there: asking
    for it says why it cannot be served (FAILED_PRECONDITION with the reason), not that it does not exist."""
    (tiny_repo / "ae" / "1" / "manifest.json").write_text("{not json")
    store = ModelStore(tiny_repo)
    for version in (None, 1):
        with pytest.raises(FailedPrecondition, match=r"no loadable version of model 'ae': version 1: .*manifest"):
            store.get("ae", version)
    assert store.holds("ae") and store.holds("vae") and not store.holds("nope")
    with pytest.raises(NotFound):
        store.get("nope")
    # and listed so, with the reason: it was in no listing while its calls named it broken
    (summary,) = [s for s in store.summaries() if s.name == "ae"]
    assert (summary.number, summary.numbers, summary.kind, summary.latent_dim, summary.image_shape) == (0, [], "", 0, ())
    assert list(summary.broken) == [1] and "manifest" in summary.broken[1]
    assert [s.name for s in store.summaries()] == ["ae", "vae", "vae8"]


def test_requests_for_unknown_models_share_rescans(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each miss rescans (a model may have just been written), but misses that wait while a scan runs take
    the next scan's result instead of queueing one scan each: a flood of unknown names costs one scan at a
    time. A model written before the miss is still found."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    store = ModelStore(tiny_repo, refresh_seconds=60)
    store.scan()
    scans = 0
    real_scan = store.repository.scan

    def slow_scan():  # type: ignore[no-untyped-def]
        nonlocal scans
        scans += 1
        time.sleep(0.05)
        return real_scan()

    monkeypatch.setattr(store.repository, "scan", slow_scan)
    barrier = threading.Barrier(16)

    def miss(i: int) -> str:
        barrier.wait()
        with pytest.raises(NotFound) as error:
            store.get(f"nope{i}")
        return str(error.value)

    with ThreadPoolExecutor(16) as pool:
        errors = list(pool.map(miss, range(16)))
    assert all("unknown model" in e for e in errors)
    assert scans <= 4, scans  # one scan each would be 16
    write_tiny(tiny_repo, "late", "ae")
    assert store.get("late").name == "late"


def test_unknown_model_and_version_list_what_exists(tiny_repo: Path) -> None:
    store = ModelStore(tiny_repo)
    with pytest.raises(NotFound, match=r"unknown model 'nope'; available: ae: 1; vae: 1; vae8: 1"):
        store.get("nope")
    with pytest.raises(NotFound, match=r"model 'vae' has no version 7"):
        store.get("vae", 7)


def test_a_long_model_name_is_shortened_in_the_error(tiny_repo: Path) -> None:
    with pytest.raises(NotFound) as error:
        ModelStore(tiny_repo).get("x" * 100_000)
    assert len(str(error.value)) < 300 and "100000 chars" in str(error.value)


def _decode_one(store: ModelStore, number: int | None = None) -> np.ndarray:
    return store.get("vae", number).decode(np.ones((1, 4), np.float32))


def test_a_version_replaced_in_place_is_reloaded_not_served_stale(tiny_repo: Path) -> None:
    store = ModelStore(tiny_repo, refresh_seconds=0)
    before = _decode_one(store)
    other = write_tiny(tiny_repo / "other", "vae", seed=7)
    for name in (*other.manifest.files, "manifest.json"):
        tmp = tiny_repo / "vae" / "1" / f".{name}.new"
        shutil.copy(other.file(name), tmp)
        os.replace(tmp, tiny_repo / "vae" / "1" / name)
    after = _decode_one(store)
    expected = ModelStore(tiny_repo / "other").get("vae").decode(np.ones((1, 4), np.float32))
    assert not np.array_equal(before, after) and np.array_equal(after, expected)


def test_a_file_altered_in_place_with_its_size_and_mtime_restored_is_still_noticed(tiny_repo: Path) -> None:
    """The change time gives it away: the loaded model is dropped, and the altered file fails its checksum."""
    store = ModelStore(tiny_repo, refresh_seconds=0)
    _decode_one(store)
    graph = tiny_repo / "vae" / "1" / "decoder.onnx"
    st = graph.stat()
    time.sleep(0.01)
    _flip(graph, offset=st.st_size // 2)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_size == st.st_size and graph.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(FailedPrecondition, match="checksum"):
        store.get("vae", 1)


def test_a_deleted_version_is_dropped_and_a_recreated_one_reloaded(tiny_repo: Path) -> None:
    store = ModelStore(tiny_repo, refresh_seconds=0)
    write_tiny(tiny_repo, "vae", seed=3)
    assert store.get("vae").number == 2
    shutil.move(tiny_repo / "vae" / "2", tiny_repo / "saved")
    assert store.get("vae").number == 1
    with pytest.raises(NotFound):
        store.get("vae", 2)
    other = write_tiny(tiny_repo / "other", "vae", seed=9)
    shutil.copytree(other.path, tiny_repo / "vae" / "2")
    expected = ModelStore(tiny_repo / "other").get("vae").decode(np.ones((1, 4), np.float32))
    assert np.array_equal(_decode_one(store, 2), expected)


def test_a_repaired_broken_version_is_tried_again(tiny_repo: Path) -> None:
    version = write_tiny(tiny_repo, "vae", seed=1)
    good = version.file(WEIGHTS).read_bytes()
    _flip(version.file(WEIGHTS))
    store = ModelStore(tiny_repo, refresh_seconds=0)
    assert store.get("vae").number == 1
    version.file(WEIGHTS).write_bytes(good)
    os.utime(version.file(WEIGHTS), ns=(1, 1))
    assert store.get("vae").number == 2


def test_peek_is_none_until_loaded_then_the_model(tiny_repo: Path) -> None:
    store = ModelStore(tiny_repo, refresh_seconds=60)
    assert store.peek("vae", None) is None
    model = store.get("vae")
    assert store.peek("vae", None) is model and store.peek("vae", 1) is model


# -- the disk changing between a scan and a load, and folders that cannot be read -------------------------------

def test_a_version_rewritten_between_a_scan_and_its_load_is_loaded_at_the_next_scan(tiny_repo: Path) -> None:
    """The load checks the new files against the manifest of the scan before: a mismatch, marked broken.
    The next scan sees a manifest with other checksums and lifts the mark (it stayed for good before)."""
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    store.scan(force=True)
    other = write_tiny(tiny_repo / "other", "vae", seed=7)
    for name in (*other.manifest.files, "manifest.json"):
        shutil.copy(other.file(name), tiny_repo / "vae" / "1" / name)
    with pytest.raises(FailedPrecondition, match="checksum"):
        store.get("vae", 1)
    store.scan(force=True)
    expected = ModelStore(tiny_repo / "other").get("vae").decode(np.ones((1, 4), np.float32))
    assert np.array_equal(_decode_one(store, 1), expected)


def test_a_version_removed_between_a_scan_and_its_load_is_not_found_not_broken(tiny_repo: Path) -> None:
    write_tiny(tiny_repo, "vae", seed=3)
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    store.scan(force=True)
    shutil.rmtree(tiny_repo / "vae" / "2")
    assert store.get("vae").number == 1  # the default looks again
    store.scan(force=True)
    with pytest.raises(NotFound):
        store.get("vae", 2)
    (summary,) = [s for s in store.summaries() if s.name == "vae"]
    assert summary.broken == {} and summary.numbers == [1]  # not reported broken for ever


def test_a_version_half_removed_under_its_load_is_not_found_not_broken(tiny_repo: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """rm -r removes a folder's files before the folder: a load that found the manifest gone, the folder still
    there, marked the version broken ("No such file or directory") where it is being removed."""
    import aevae.store as store_module

    write_tiny(tiny_repo, "vae", seed=3)
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    store.scan(force=True)
    load = store_module.load

    def removed_midway(version: object, *args: object) -> object:
        for path in sorted((tiny_repo / "vae" / "2").iterdir()):
            path.unlink()
        return load(version, *args)

    monkeypatch.setattr(store_module, "load", removed_midway)
    with pytest.raises(NotFound, match="model 'vae' version 2 was removed"):
        store.get("vae", 2)
    assert store.broken() == {}


def test_folders_that_cannot_be_read_cost_only_themselves(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 on one version or model folder made every model's calls INTERNAL (the scan raised), and a
    service over such a repository would not start. (Root ignores permissions, so the error is injected.)"""
    from aevae.repository import ModelRepository

    check, iterdir = ModelRepository._check, Path.iterdir

    def unreadable_version(self, name, number, path, root):  # type: ignore[no-untyped-def]
        if name == "vae":
            raise PermissionError(13, "Permission denied", str(path / "manifest.json"))
        return check(self, name, number, path, root)

    monkeypatch.setattr(ModelRepository, "_check", unreadable_version)
    scan = ModelRepository(tiny_repo).scan()
    assert sorted(scan.versions) == ["ae", "vae8"]
    assert [(b.name, b.reason) for b in scan.broken] == [("vae", "Permission denied (manifest.json)")]
    with pytest.raises(FailedPrecondition, match="Permission denied"):
        ModelStore(tiny_repo).get("vae")
    monkeypatch.setattr(ModelRepository, "_check", check)

    def unreadable(folder: str):  # type: ignore[no-untyped-def]
        def listing(self: Path):  # type: ignore[no-untyped-def]
            if self.name == folder:
                raise PermissionError(13, "Permission denied", str(self))
            return iterdir(self)
        return listing

    monkeypatch.setattr(Path, "iterdir", unreadable("vae"))
    scan = ModelRepository(tiny_repo).scan()
    assert sorted(scan.versions) == ["ae", "vae8"] and "cannot be read" in scan.ignored[0][1]
    assert ModelStore(tiny_repo).get("ae").number == 1
    monkeypatch.setattr(Path, "iterdir", unreadable(tiny_repo.name))
    scan = ModelRepository(tiny_repo).scan()
    assert scan.versions == {} and "the repository cannot be read: Permission denied" in scan.ignored[0][1]


def test_latent_statistics_over_the_cap_are_refused_before_they_are_read(tiny_repo: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import aevae.repository

    version = ModelStore(tiny_repo).get("vae").version
    assert version is not None and version.latent_stats()["latent_dim"] == 4
    monkeypatch.setattr(aevae.repository, "STATS_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="latent_stats.json is over"):
        version.latent_stats()


def test_a_slow_load_holds_only_its_own_version(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose files take long to hash and load (big, on slow storage) kept the store's one lock for
    the whole load, so every call for any other model waited behind it (9 s for a 3 GB file). Now the load
    holds its version alone: another model's calls and rescans go on, and a second caller of the same
    version waits for the first load and takes its result instead of loading it again."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import aevae.store

    store = ModelStore(tiny_repo, refresh_seconds=0)  # every call rescans, as calls after a refresh do
    store.get("ae")
    release, started = threading.Event(), threading.Event()
    loads: list[str] = []
    real_load = aevae.store.load

    def held_load(version, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(version.name)
        if version.name == "vae":
            started.set()
            assert release.wait(30)
        return real_load(version, *args, **kwargs)

    monkeypatch.setattr(aevae.store, "load", held_load)
    with ThreadPoolExecutor(3) as pool:
        first, second = pool.submit(store.get, "vae"), None
        try:
            assert started.wait(10)
            second = pool.submit(store.get, "vae")
            other = pool.submit(lambda: (store.get("ae").name, store.scan(force=True).versions.keys()))
            name, names = other.result(timeout=5)  # before the fix: waited until the vae load ended
            assert name == "ae" and {"ae", "vae"} <= set(names)
            assert not first.done() and not second.done()
        finally:
            release.set()
        assert first.result(timeout=10) is second.result(timeout=10)  # type: ignore[union-attr]
    assert loads.count("vae") == 1


def test_work_that_may_load_runs_on_the_loader_threads() -> None:
    """A call whose model is not ready (a load or a rescan ahead) runs on the loader's threads, so one
    waiting for a slow load never holds the few threads loaded models' calls run on."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from aevae.services.admission import Runner

    def thread() -> str:
        return threading.current_thread().name

    with ThreadPoolExecutor(1, thread_name_prefix="work") as work, \
            ThreadPoolExecutor(1, thread_name_prefix="load") as loader:
        run = Runner(work, inline_max=4, loader=loader)

        async def names() -> list[str]:
            return [await run(thread, 1, True), await run(thread, 100, True), await run(thread, 1, False)]

        inline, big, unready = asyncio.run(names())
    assert inline == "MainThread" and big.startswith("work") and unready.startswith("load")


def test_a_load_out_of_memory_names_its_type_when_its_message_is_empty(tiny_repo: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """str(MemoryError()) is "": the store logged "not preloaded: ... cannot be loaded now: ;"."""
    import aevae.store as store_module
    from aevae.store import broken_reason

    def out_of_memory(*args: object) -> object:
        raise MemoryError()

    monkeypatch.setattr(store_module, "load", out_of_memory)
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    with caplog.at_level(logging.WARNING):
        store.preload()
    assert "cannot be loaded now: MemoryError; it is tried again" in caplog.text
    assert "now: ;" not in caplog.text
    assert store.broken() == {}  # not the version's fault
    for exc in (MemoryError(), ValueError("\n  \n"), RuntimeError("/srv/models/vae/1/")):
        assert broken_reason(exc) == type(exc).__name__
    assert broken_reason(ValueError("\n  shape mismatch\n")) == "shape mismatch"


def test_a_runtime_installed_but_not_loadable_is_said_so_and_breaks_no_version(tiny_repo: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a low `ulimit -v` onnxruntime's and torch's libraries could not be mapped: the store said "it has
    no ONNX graphs and torch is not installed" of a version that had both, and marked it broken for good."""
    import aevae.runtimes as runtimes
    from aevae.errors import ResourceExhausted

    def unmappable(name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> Any:
            raise ImportError(f"{name}.so: failed to map segment from shared object")
        return fail

    real_onnx, real_torch = runtimes.onnxruntime, runtimes.TorchRuntime.open
    monkeypatch.setattr(runtimes, "onnxruntime", unmappable("onnxruntime_pybind11_state"))
    monkeypatch.setattr(runtimes.TorchRuntime, "open", unmappable("libtorch_cuda"))
    store = ModelStore(tiny_repo, refresh_seconds=0)
    with pytest.raises(ResourceExhausted, match=r"onnxruntime is installed but cannot be loaded in this process: "
                                                r"onnxruntime_pybind11_state.so: failed to map segment.*tried again"):
        store.get("vae", 1)
    assert store.broken() == {}
    monkeypatch.setattr(runtimes, "onnxruntime", real_onnx)
    assert store.get("vae", 1).runtime.name == "onnx"  # the limit lifted: the same version loads

    def not_installed(*args: object, **kwargs: object) -> Any:
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr(runtimes, "onnxruntime", not_installed)
    version = store.resolve("ae", 1)
    with pytest.raises(runtimes.RuntimeUnavailable, match="torch is installed but cannot be loaded"):
        runtimes.open_runtime(version)
    monkeypatch.setattr(runtimes.TorchRuntime, "open", real_torch)
    assert runtimes.open_runtime(version).name == "torch"
    with pytest.raises(ValueError, match=r"^onnxruntime is not installed: pip install 'aevae\[serve\]'$"):
        runtimes.open_runtime(version, prefer="onnx")
