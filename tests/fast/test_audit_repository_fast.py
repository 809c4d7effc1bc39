"""The repository and the one load path against a damaged repository, in process (an audit of aevae.repository,
aevae.store, aevae.manifest and aevae.runtimes): manifests that break the parser or the listing rather than
only their version, files replaced between their check and their load, graphs and architectures unlike what
the manifest says, and the cost of scanning many versions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import aevae.repository
from aevae.errors import FailedPrecondition
from aevae.manifest import Manifest
from aevae.repository import MANIFEST, ModelRepository, sha256_file
from aevae.services.listing import models_response
from aevae.services.settings import Limits
from aevae.store import ModelStore
from helpers import write_tiny

LIMITS = Limits(max_message_bytes=1 << 26, max_batch=1 << 16)


def _edit_manifest(version_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = version_dir / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _listed(store: ModelStore) -> dict[str, object]:
    """ListModels' answer as the servers build it, encoded as they send it (protobuf raises on what it cannot
    carry: a string that is no UTF-8, an integer past int64)."""
    response = models_response(store.summaries(), LIMITS)
    response.SerializeToString()
    return {m.name: m for m in response.models}


def _rehash(version_dir: Path, name: str) -> None:
    """The manifest made to list the file's present checksum: a consistent version whose file is unlike the
    manifest's description, not a corrupt one."""
    _edit_manifest(version_dir, lambda d: d["files"].__setitem__(name, sha256_file(version_dir / name)))


def test_a_manifest_nested_past_the_recursion_limit_breaks_only_its_version(tiny_repo: Path) -> None:
    """json raises RecursionError (no ValueError) on deep nesting: it escaped the scan, and every call for
    every model failed as an internal error for as long as the file was there."""
    shutil.copytree(tiny_repo / "vae" / "1", tiny_repo / "vae" / "2")
    (tiny_repo / "vae" / "2" / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    scan = ModelRepository(tiny_repo).scan()
    assert [v.number for v in scan.versions["vae"]] == [1] and sorted(scan.versions) == ["ae", "vae", "vae8"]
    assert [(b.number, b.reason) for b in scan.broken] == [
        (2, "manifest.json is nested too deeply to be read; a manifest is a few levels deep")]
    store = ModelStore(tiny_repo)
    assert store.get("vae").number == 1 and store.get("ae").number == 1
    assert "nested too deeply" in _listed(store)["vae"].broken[0].reason  # type: ignore[attr-defined]


@pytest.mark.parametrize("edit", [
    lambda d: d["files"].__setitem__("\udcff", "0" * 64),  # a file name: its reason was "no \udcff"
    lambda d: d["metrics"].__setitem__("\ud800", 1.0),  # a metric's name, sent as a map key
])
def test_a_lone_surrogate_in_a_manifest_breaks_its_version_not_the_listing(tiny_repo: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """json accepts "\\udcff", which is no text: ListModels could not encode the reason or the metric that held
    it, and failed for every model (UNKNOWN); the call naming the version hung until its deadline."""
    shutil.copytree(tiny_repo / "vae" / "1", tiny_repo / "vae" / "2")
    _edit_manifest(tiny_repo / "vae" / "2", edit)
    store = ModelStore(tiny_repo)
    with pytest.raises(FailedPrecondition, match="lone UTF-16 surrogate") as error:
        store.get("vae", 2)
    str(error.value).encode("utf-8")
    listed = _listed(store)["vae"]
    assert listed.version == 1 and [b.version for b in listed.broken] == [2]  # type: ignore[attr-defined]


def test_numbers_no_listing_can_carry_break_the_version_not_the_listing(tiny_repo: Path) -> None:
    """A metric past a float's range (10**400) made float() raise OverflowError, and a latent width past int64
    in a model's only version made protobuf raise: either failed the whole listing, for every model."""
    write_tiny(tiny_repo, "vae", seed=1)
    _edit_manifest(tiny_repo / "vae" / "2", lambda d: d["metrics"].update(huge=10**400, test_bce=99.5))

    def wide(data: dict) -> None:  # type: ignore[type-arg]
        data["latent_dim"] = data["architecture"]["latent_dim"] = 2**70

    _edit_manifest(tiny_repo / "ae" / "1", wide)
    store = ModelStore(tiny_repo)
    listed = _listed(store)
    assert listed["vae"].version == 2 and dict(listed["vae"].metrics) == {"test_bce": 99.5}  # type: ignore[attr-defined]
    assert listed["vae8"].version == 1  # type: ignore[attr-defined]
    assert listed["ae"].version == 0 and not listed["ae"].latent_dim  # type: ignore[attr-defined]
    assert "'latent_dim' must be at most 2147483647" in listed["ae"].broken[0].reason  # type: ignore[attr-defined]
    with pytest.raises(FailedPrecondition, match=r"'latent_dim' must be at most 2147483647"):
        store.get("ae")


def test_a_file_replaced_after_its_check_is_not_loaded_unchecked(tiny_repo: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy over a version's file in place (cp, rsync --inplace) landing between the load's checksum and the
    runtime opening the file by its path: the runtime loaded bytes nobody checked, served under the version's
    label until the next scan. What is loaded is now the bytes checked."""
    other = write_tiny(tiny_repo / "other", "vae", seed=7)
    graph = tiny_repo / "vae" / "1" / "decoder.onnx"
    check = aevae.repository.sha256_file

    def check_then_replace(path: Path) -> str:
        digest = check(path)
        if path == graph:  # checked: now replaced, before it is opened
            shutil.copy(other.file("decoder.onnx"), graph)
        return digest

    monkeypatch.setattr(aevae.repository, "sha256_file", check_then_replace)
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    with pytest.raises(FailedPrecondition, match="decoder.onnx does not match the checksum"):
        store.get("vae", 1)


def test_a_weights_file_the_manifest_does_not_list_is_not_loaded(tiny_repo: Path) -> None:
    """The torch runtime loaded weights.pt whether or not the manifest listed its checksum: bytes nobody
    checked, served as the version."""
    _edit_manifest(tiny_repo / "vae" / "1", lambda d: d["files"].pop("weights.pt"))
    with pytest.raises(FailedPrecondition, match="weights.pt is not listed in manifest.json"):
        ModelStore(tiny_repo, runtime="torch").get("vae")


def _edit_graph(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    import onnx

    model = onnx.load(str(path))
    edit(model.graph)
    onnx.save(model, str(path))
    _rehash(path.parent, path.name)


def _rename_input(graph) -> None:  # type: ignore[no-untyped-def]
    old = graph.input[0].name
    graph.input[0].name = "z"
    for node in graph.node:
        node.input[:] = ["z" if name == old else name for name in node.input]


def _float64_output(graph) -> None:  # type: ignore[no-untyped-def]
    import onnx

    out = graph.output[0]
    graph.node.append(onnx.helper.make_node("Cast", [out.name], ["as_double"], to=onnx.TensorProto.DOUBLE))
    out.name, out.type.tensor_type.elem_type = "as_double", onnx.TensorProto.DOUBLE


@pytest.mark.parametrize("edit, reason", [
    (_rename_input, r"decoder.onnx cannot decode a latent: Required inputs \(\['z'\]\) are missing"),
    (_float64_output, r"decoder.onnx gives float64 images of 1 x 32 x 32 for one latent, but the manifest says "
                      r"float32 of 1 x 32 x 32"),
])
def test_a_decoder_graph_unlike_the_api_breaks_the_version_at_load(tiny_repo: Path, edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A valid decoder graph, checksummed in its manifest, whose input has another name (or whose images are
    float64): it loaded, was listed as serving, and every Decode failed as an internal error (or answered
    another dtype than the API's)."""
    write_tiny(tiny_repo, "vae", seed=1)
    _edit_graph(tiny_repo / "vae" / "2" / "decoder.onnx", edit)
    store = ModelStore(tiny_repo, runtime="onnx")
    with pytest.raises(FailedPrecondition, match=reason):
        store.get("vae", 2)
    assert store.get("vae").number == 1
    assert [b.version for b in _listed(store)["vae"].broken] == [2]  # type: ignore[attr-defined]


def test_an_architecture_unlike_the_weights_is_refused_before_it_is_built(tiny_repo: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch runtime built the manifest's architecture, then found the weights did not fit it: an
    architecture edited to hidden [8000, 8000] allocated 0.5 GiB first (a bigger one, an out-of-memory kill of
    the server). The parameters are counted before anything is built."""
    import aevae.models

    built: list[object] = []
    build = aevae.models.build
    monkeypatch.setattr(aevae.models, "build", lambda arch: (built.append(arch.hidden), build(arch))[1])
    _edit_manifest(tiny_repo / "vae" / "1", lambda d: d["architecture"].__setitem__("hidden", [8000, 8000]))
    store = ModelStore(tiny_repo, runtime="torch")
    with pytest.raises(FailedPrecondition, match=r"weights.pt holds [\d,]+ parameters, but the manifest's "
                                                 r"architecture has 144,577,032"):
        store.get("vae")
    assert built == []
    assert store.get("ae").number == 1 and built == [(16,)]


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    parsed = [0]
    loads = Manifest.loads.__func__  # type: ignore[attr-defined]

    def counting(cls, text: str) -> Manifest:  # type: ignore[no-untyped-def]
        parsed[0] += 1
        return loads(cls, text)

    monkeypatch.setattr(Manifest, "loads", classmethod(counting))
    return parsed


def test_scanning_unchanged_versions_reads_no_manifest_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scan parsed every manifest and resolved every file's path component by component: 1 s of CPU per
    scan of 3,000 versions, paid by every ListModels and by every request for a version number that does
    not exist. A manifest is parsed again only when its stat changed (here: trusted at once, where a
    service waits SETTLED_NS for the file system's coarse clock), and its files are looked at with one lstat
    each. Whatever changes is still seen at the next scan."""
    monkeypatch.setattr(aevae.repository, "SETTLED_NS", 0)
    first = write_tiny(tmp_path, "vae")
    for number in range(2, 201):  # the files hard links: 200 versions in a few milliseconds
        folder = tmp_path / "vae" / str(number)
        folder.mkdir()
        shutil.copy(first.file(MANIFEST), folder)
        for name in first.manifest.files:
            os.link(first.file(name), folder / name)
    parsed = _count_parses(monkeypatch)
    resolved: list[Path] = []
    resolve = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: (resolved.append(self), resolve(self, strict))[1])
    repository = ModelRepository(tmp_path)
    assert len(repository.scan().versions["vae"]) == 200 and parsed[0] == 200
    assert len(repository.scan().versions["vae"]) == 200 and parsed[0] == 200  # none parsed again
    assert len(resolved) == 2  # the root, once a scan

    # still exact: a manifest edited in place (its size and mtime restored), a file gone, a version gone
    manifest = tmp_path / "vae" / "7" / MANIFEST
    st = manifest.stat()
    manifest.write_text(manifest.read_text().replace('"test_bce": 100.0', '"test_bce": 111.0'))
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert manifest.stat().st_size == st.st_size
    (tmp_path / "vae" / "9" / "decoder.onnx").unlink()
    shutil.rmtree(tmp_path / "vae" / "11")
    scan = repository.scan()
    assert parsed[0] == 201
    assert {v.number: v.manifest.metrics["test_bce"] for v in scan.versions["vae"]}[7] == 111.0
    assert [(b.number, b.reason) for b in scan.broken] == [(9, "no decoder.onnx")]
    assert len(scan.versions["vae"]) == 198 and len(repository._manifests) == 199


def test_a_manifest_changed_within_the_settling_time_is_read_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A stat is trusted only once its times are older than the file system's clock can blur: a manifest
    rewritten in place within one tick, to the same size, could otherwise keep the parse of its old bytes."""
    version = write_tiny(tmp_path, "vae")
    parsed = _count_parses(monkeypatch)
    repository = ModelRepository(tmp_path)
    for _ in range(3):
        repository.scan()
    assert parsed[0] == 3  # just written: read at every scan
    text = version.file(MANIFEST).read_text()
    st = version.file(MANIFEST).stat()
    version.file(MANIFEST).write_text(text.replace('"test_bce": 100.0', '"test_bce": 200.0'))
    os.utime(version.file(MANIFEST), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert repository.scan().versions["vae"][0].manifest.metrics["test_bce"] == 200.0


@pytest.mark.parametrize("name", ["1.0", "+1", " 1", "١", "１", "²"])
def test_folders_of_odd_names_are_no_versions_and_are_named(tiny_repo: Path, name: str) -> None:
    """Unicode digits (Arabic-Indic, full-width, superscript) are digits to str.isdigit and int(), but no
    version's name: never served, and named as ignored so that their owner learns why."""
    shutil.copytree(tiny_repo / "vae" / "1", tiny_repo / "vae" / name)
    scan = ModelRepository(tiny_repo).scan()
    assert [v.number for v in scan.versions["vae"]] == [1] and not scan.broken
    assert [p.name for p, _ in scan.ignored] == [name]
    assert ModelStore(tiny_repo).get("vae").number == 1


def test_a_reason_quoting_a_huge_value_is_cut(tiny_repo: Path) -> None:
    """A manifest's reason quotes the value it refuses: an image_shape of 100,000 numbers (well under the 1 MiB
    a manifest may have) made a reason of 0.7 MB, and the call asking for the version failed past gRPC's 16 KiB
    of metadata (RESOURCE_EXHAUSTED about metadata, not FAILED_PRECONDITION with the reason)."""
    shutil.copytree(tiny_repo / "vae" / "1", tiny_repo / "vae" / "2")
    _edit_manifest(tiny_repo / "vae" / "2", lambda d: d.__setitem__("image_shape", list(range(1, 100_000))))
    (broken,) = ModelRepository(tiny_repo).scan().broken
    assert broken.reason.startswith("manifest.json: 'image_shape' must be [height, width]")
    assert len(broken.reason) == 300 and broken.reason.endswith("...")
    with pytest.raises(FailedPrecondition) as error:
        ModelStore(tiny_repo).get("vae", 2)
    assert len(str(error.value)) < 400


def test_an_error_naming_many_broken_versions_stays_short(tiny_repo: Path) -> None:
    """A model of 1,000 broken versions (here: folders with no manifest yet) and none loadable: the error named
    every one, 30 KB, past gRPC's 16 KiB of metadata, so its callers got RESOURCE_EXHAUSTED about metadata."""
    for number in range(1, 1001):
        (tiny_repo / "many" / str(number)).mkdir(parents=True)
    with pytest.raises(FailedPrecondition) as error:
        ModelStore(tiny_repo).get("many")
    assert str(error.value) == ("no loadable version of model 'many': version 1: no manifest.json; version 2: no "
                                "manifest.json; version 3: no manifest.json; and 997 more broken versions")


def test_listings_name_the_newest_broken_versions_and_count_them_all(tiny_repo: Path) -> None:
    """1,000 broken versions beside a good one: ListModels named every one with its reason (about 200 with long
    reasons outgrew a --max-message-bytes of 64 KiB, and the listing failed for every model), and the metrics
    gave each its own series. Now the newest LISTED_BROKEN with their reasons, the count of all, and one
    series a model."""
    from prometheus_client.core import CollectorRegistry

    from aevae.services.metrics import ServiceCollector
    from aevae.store import LISTED_BROKEN

    for number in range(2, 1002):
        (tiny_repo / "vae" / str(number)).mkdir()
    store = ModelStore(tiny_repo)
    listed = _listed(store)["vae"]
    assert listed.version == 1 and listed.broken_count == 1000  # type: ignore[attr-defined]
    assert [b.version for b in listed.broken] == list(range(1002 - LISTED_BROKEN, 1002))  # type: ignore[attr-defined]
    assert all(b.reason == "no manifest.json" for b in listed.broken)  # type: ignore[attr-defined]
    assert models_response(store.summaries(), LIMITS).ByteSize() < 4096
    registry = CollectorRegistry()
    registry.register(ServiceCollector(store, []))
    series = [s for m in registry.collect() if m.name == "aevae_model_versions_broken" for s in m.samples]
    assert [(s.labels, s.value) for s in series] == [({"model": "vae"}, 1000.0)]


def test_latent_statistics_nested_past_the_recursion_limit_are_refused_not_an_internal_error(tiny_repo: Path) -> None:
    """The encoder turns a ValueError of the statistics into FAILED_PRECONDITION naming the file; json's
    RecursionError is none, and answered INTERNAL with a traceback in the log."""
    version_dir = tiny_repo / "vae" / "1"
    (version_dir / "latent_stats.json").write_text("[" * 100_000 + "]" * 100_000)
    _rehash(version_dir, "latent_stats.json")
    model = ModelStore(tiny_repo).get("vae")
    with pytest.raises(ValueError, match="latent_stats.json is nested too deeply to be read"):
        model.latent_stats()


def test_a_fifo_in_place_of_a_listed_file_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO swapped in for a listed file after the scan: opening it waited for a writer for ever, and a load
    waits with the store's lock held (every call of every model with it). Now the load refuses it at once."""
    import threading

    from aevae.inference import load

    version = write_tiny(tmp_path, "vae")
    graph = version.file("decoder.onnx")
    graph.unlink()
    os.mkfifo(graph)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load(version, "onnx")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the load raised is the result
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    try:
        assert not thread.is_alive(), "the load is waiting on the FIFO"
        assert isinstance(outcome[0], ValueError) and "not a regular file" in str(outcome[0]), outcome
    finally:
        if thread.is_alive():  # release the blocked open: a writer that comes and goes
            os.close(os.open(graph, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(10)


def test_version_names_that_are_no_folder_are_said_not_skipped_silently(tmp_path: Path) -> None:
    """`vae/5 -> 5` (a symlink loop), a dangling symlink and a file named like a version were skipped without
    a word; the scan now says why each is no version (the store logs it once), and the good version serves."""
    from aevae.repository import ModelRepository

    write_tiny(tmp_path, "vae")
    (tmp_path / "vae" / "5").symlink_to("5")
    (tmp_path / "vae" / "6").symlink_to(tmp_path / "nowhere")
    (tmp_path / "vae" / "7").write_text("not a version")
    scan = ModelRepository(tmp_path).scan()
    reasons = {path.name: why for path, why in scan.ignored}
    assert reasons == {"5": "a symlink that leads to no folder (missing, or a loop)",
                       "6": "a symlink that leads to no folder (missing, or a loop)",
                       "7": "a file, not a version folder"}
    assert [v.number for v in scan.versions["vae"]] == [1]


def test_a_symlink_loop_in_a_version_is_named_without_the_servers_path(tmp_path: Path) -> None:
    """Python's words for a loop name the absolute path; the reason goes to every client (ListModels, the
    OIP index, FAILED_PRECONDITION)."""
    version = write_tiny(tmp_path, "vae")
    listed = next(name for name in version.manifest.files if name.endswith(".onnx"))
    (version.path / listed).unlink()
    (version.path / listed).symlink_to(version.path / listed)
    repository = ModelRepository(tmp_path, allow_symlinks=True)
    (broken,) = repository.scan().broken
    assert f"{listed} cannot be resolved: a loop of symbolic links" in broken.reason
    assert str(tmp_path) not in broken.reason
    # the manifest too (it was "no manifest.json", as if the version had none)
    (version.path / "manifest.json").unlink()
    (version.path / "manifest.json").symlink_to("m2")
    (version.path / "m2").symlink_to("manifest.json")
    (broken,) = ModelRepository(tmp_path, allow_symlinks=True).scan().broken
    assert broken.reason == "manifest.json cannot be resolved: a loop of symbolic links"


def test_misnamed_model_folders_and_control_characters_are_said_once_and_escaped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A model folder "VAE" was left out without a word (calls for it: NOT_FOUND); a version folder named
    "3\\nINFO ..." wrote a forged line into the log."""
    import logging

    write_tiny(tmp_path, "vae")
    (tmp_path / "VAE").mkdir()
    (tmp_path / ".hidden").mkdir()  # the writers' own: not a model, not said
    (tmp_path / "vae" / "3\nINFO aevae.store: loaded vae:9").mkdir()
    with caplog.at_level(logging.WARNING, logger="aevae.store"):
        ModelStore(tmp_path).scan()
    messages = [r.getMessage() for r in caplog.records]
    assert any("VAE: a model folder is named by 1 to 64 of a-z" in m for m in messages), messages
    assert not any(".hidden" in m for m in messages)
    assert all("\n" not in m for m in messages) and any("3\\nINFO aevae.store" in m for m in messages)


def test_versions_that_failed_to_load_are_not_offered_as_available(tmp_path: Path) -> None:
    write_tiny(tmp_path, "vae")
    second = write_tiny(tmp_path, "vae", seed=1)
    weights = next(second.path / n for n in second.manifest.files if n.endswith(".onnx"))
    weights.write_bytes(b"\0" * weights.stat().st_size)  # the same size: found broken when loaded
    store = ModelStore(tmp_path)
    with pytest.raises(FailedPrecondition):
        store.get("vae", 2)
    with pytest.raises(Exception, match=r"has no version 7; available: vae: 1$"):
        store.get("vae", 7)


def test_adding_files_to_a_full_disk_leaves_none_of_them(tmp_path: Path) -> None:
    """export-onnx on a full disk said the version was left as it was, and left a 6.8 MB graph in its folder,
    listed nowhere: the files renamed into place before the failure go again."""
    version = write_tiny(tmp_path, "vae")
    before = sorted(p.name for p in version.path.iterdir())

    def full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    repository = ModelRepository(tmp_path)
    with pytest.raises(OSError, match="No space"):
        repository.add_files(version, {"extra.onnx": lambda path: path.write_bytes(b"graph"), "more.onnx": full})
    assert sorted(p.name for p in version.path.iterdir()) == before
    assert ModelStore(tmp_path).get("vae").number == 1
