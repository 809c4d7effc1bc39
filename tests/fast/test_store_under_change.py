"""The load path while the repository changes under it (an audit of aevae.store): a listing while a model
disappears, and a version replaced during its own load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import aevae.store
from aevae.errors import FailedPrecondition, NotFound
from aevae.store import ModelStore


def test_a_model_removed_while_it_is_listed_is_left_out_not_an_error(tiny_repo: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ListModels loads each model's default; a model folder removed meanwhile made the whole listing fail:
    NOT_FOUND for that model when it went before its load, KeyError (INTERNAL) when it went after and another
    call's scan replaced the snapshot before the listing read it again. The other models must still be listed."""
    real = aevae.store.load
    store: list[ModelStore] = []

    def removed_before(version: Any, *args: Any) -> Any:
        if version.name == "vae":
            shutil.rmtree(tiny_repo / "vae", ignore_errors=True)
        return real(version, *args)

    def removed_after(version: Any, *args: Any) -> Any:
        model = real(version, *args)
        if version.name == "vae":
            shutil.rmtree(tiny_repo / "vae", ignore_errors=True)
            store[0].scan(force=True)  # another call's (a request for an unknown model forces one)
        return model

    for load in (removed_before, removed_after):
        monkeypatch.setattr(aevae.store, "load", load)
        shutil.rmtree(tiny_repo / "vae", ignore_errors=True)
        shutil.copytree(tiny_repo / "ae", tiny_repo / "vae")  # a fresh model of that name, not yet loaded
        store[:] = [ModelStore(tiny_repo, refresh_seconds=3600)]
        names = [s.name for s in store[0].summaries()]  # vae: as the listing's scan found it, or left out
        assert [n for n in names if n != "vae"] == ["ae", "vae8"], load.__name__


def test_a_version_whose_folder_is_replaced_during_its_load_is_not_broken_for_ever(
        tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy that replaces a version folder by an identical copy (rm -r; cp -r, rsync --delete, a volume's
    atomic swap) while the service loads it: that load fails, and the version was marked broken for the files
    found *after* the failure (the new, good copy), so no later scan lifted the mark: broken for good."""
    real = aevae.store.load
    spare = tiny_repo.parent / "spare-vae-1"
    shutil.copytree(tiny_repo / "vae" / "1", spare)
    replaced = []

    def load_while_replaced(version: Any, *args: Any) -> Any:
        if version.name == "vae" and not replaced:
            replaced.append(True)
            shutil.rmtree(version.path)
            try:
                return real(version, *args)  # the files are gone: FileNotFoundError
            finally:
                shutil.copytree(spare, version.path)  # back, identical, as new files
        return real(version, *args)

    monkeypatch.setattr(aevae.store, "load", load_while_replaced)
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    store.scan(force=True)
    with pytest.raises((NotFound, aevae.store.FailedPrecondition)):
        store.get("vae", 1)
    store.scan(force=True)  # the next look at the repository
    assert store.get("vae", 1).number == 1
    assert ("vae", 1) not in store.broken()


def test_an_encoder_graph_without_the_log_variance_the_manifest_promises_breaks_the_version(tiny_repo: Path) -> None:
    """An AE's graphs under a manifest edited to say VAE (its architecture edited to agree): the graph gives one
    output, so the log-variance array was never written and each Encode returned uninitialized server memory
    as `logvar`. The graphs must give what the manifest states: broken at load, with the reason."""
    path = tiny_repo / "ae" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    data["kind"] = data["architecture"]["kind"] = "vae"
    path.write_text(json.dumps(data))
    store = ModelStore(tiny_repo, runtime="onnx")
    with pytest.raises(FailedPrecondition, match=r"model 'ae' version 1 is broken: encoder.onnx gives 1 output "
                                                 r"\(the mean\), but the manifest says vae: 2"):
        store.get("ae", 1)
    assert store.get("vae").number == 1  # the others serve on


def test_an_encoder_graph_of_another_latent_width_breaks_the_version(tiny_repo: Path) -> None:
    """The encoder graph of an 8-d VAE of the same image shape put in vae/1 (4-d) with the manifest's checksum
    updated: the decoder's graph was checked against the latent width, the encoder's outputs never were, and
    every Encode failed inside the model (INTERNAL) instead of the version being broken with the reason."""
    from aevae.repository import sha256_file
    from helpers import write_tiny

    wide = write_tiny(tiny_repo.parent / "wide", "vae", latent_dim=8)
    version = tiny_repo / "vae" / "1"
    shutil.copy(wide.file("encoder.onnx"), version / "encoder.onnx")
    path = version / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["encoder.onnx"] = sha256_file(version / "encoder.onnx")
    path.write_text(json.dumps(data))
    with pytest.raises(FailedPrecondition, match=r"version 1 is broken: encoder.onnx takes or gives mean of N x 8, "
                                                 r"but the manifest says N x 4"):
        ModelStore(tiny_repo, runtime="onnx").get("vae", 1)


def test_listing_more_models_than_are_held_loaded_does_not_reload_them_all(tiny_repo: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Over more models than `max_loaded` (32 in a service; the docs mention repositories of 60), each listing
    loaded every model's default again, hashing all its files (tens of MB each for the default architecture):
    loading in a cycle through a smaller LRU, every load missed, and the listing evicted the models the
    requests were using. Clients ask for the listing every 2 s. A version that loaded and whose files have not
    changed since is described without loading it again."""
    real, loads = aevae.store.load, []

    def counted(version: Any, *args: Any) -> Any:
        loads.append(str(version))
        return real(version, *args)

    monkeypatch.setattr(aevae.store, "load", counted)
    store = ModelStore(tiny_repo, max_loaded=1)
    first = store.summaries()
    assert sorted(loads) == ["ae/1", "vae/1", "vae8/1"]
    loads.clear()
    assert store.summaries() == first and loads == []
    (tiny_repo / "vae" / "1" / "latent_stats.json").write_text("{}")  # changed: looked at again, and broken
    (vae,) = [s for s in store.summaries() if s.name == "vae"]
    assert loads == ["vae/1"] and vae.number == 0 and "checksum" in vae.broken[1]


def test_a_version_repaired_and_broken_again_is_named_again(tiny_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A broken version is logged once, not at every refresh; but once repaired, breaking again (the same
    reason) is news and is logged again. The set of what was logged kept every message for good: no second
    line, and a set growing with every reason a changing file ever had."""
    import logging

    path = tiny_repo / "vae" / "1" / "latent_stats.json"
    good = path.read_bytes()
    store = ModelStore(tiny_repo, refresh_seconds=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            path.write_text("{}")  # fails its checksum
            for _ in range(3):
                store.scan(force=True)
                with pytest.raises(FailedPrecondition):
                    store.get("vae", 1)
            path.write_bytes(good)
            store.scan(force=True)
            assert store.get("vae", 1).number == 1
    assert caplog.text.count("model version vae/1 is broken") == 2, caplog.text
    assert not store._logged  # nothing is broken now


def test_a_default_resolved_before_a_newer_version_appeared_is_not_kept_as_the_default(
        tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request resolves the default (vae/1) and loads it; meanwhile another call's scan finds vae/2 and clears
    the defaults. The first request then cached vae/1 as the default anyway, and the lock-free path (peek) served
    it until the next refresh. It may answer with the version it resolved, but not keep it as the default."""
    from helpers import write_tiny

    real = aevae.store.load
    store = ModelStore(tiny_repo, refresh_seconds=3600)

    def newer_meanwhile(version: Any, *args: Any) -> Any:
        if (version.name, version.number) == ("vae", 1):
            write_tiny(tiny_repo, "vae", seed=1)  # vae/2
            store.scan(force=True)
        return real(version, *args)

    store.scan(force=True)
    monkeypatch.setattr(aevae.store, "load", newer_meanwhile)
    assert store.get("vae").number == 1
    cached = store.peek("vae", None)
    assert cached is None or cached.number == 2
    assert store.get("vae").number == 2


def test_latent_statistics_replaced_after_the_load_are_refused_not_served(tiny_repo: Path) -> None:
    """The load checks every file's checksum, but the statistics are read when first asked for: a file
    replaced in between (other figures, valid JSON) was served as the version's. They are checked as read."""
    store = ModelStore(tiny_repo, refresh_seconds=3600)
    loaded = store.get("vae", 1)
    path = tiny_repo / "vae" / "1" / "latent_stats.json"
    stats = json.loads(path.read_text())
    stats["count"] = 123
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="latent_stats.json does not match the checksum in its manifest"):
        loaded.latent_stats()
