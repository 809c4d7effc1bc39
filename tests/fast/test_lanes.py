"""The trainer's `Lanes`: the AE and the VAE train side by side, each in its own thread, and that changes
nothing but the time: each model ends exactly where it ends trained alone with the same torch threads."""

from __future__ import annotations

import threading

import pytest
import torch

from aevae.models import Architecture, build
from aevae.trainer.loop import Lanes, Member, member, train_steps


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # Lanes sets torch's process-wide thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _members(precision: str) -> list[Member]:
    members = []
    for kind in ("ae", "vae"):
        torch.manual_seed(0)
        model = build(Architecture(kind=kind, hidden=(64, 32), image_shape=(8, 8)))
        members.append(member(kind, model, model, lr=3e-3, total_steps=12))
    return members


@pytest.mark.parametrize("models, threads, world, side_by_side, torch_threads", [
    (2, 2, 1, True, 1), (2, 4, 1, True, 2), (2, 5, 1, True, 2),  # a share of the cores each
    (1, 2, 1, False, 2),  # one model keeps every thread
    (2, 1, 1, False, 1),  # fewer cores than models: one after the other
    (2, 2, 2, False, 2),  # several workers: DDP's all-reduces need one order on every rank
])
def test_side_by_side_only_when_it_pays_and_is_safe(models: int, threads: int, world: int, side_by_side: bool,
                                                    torch_threads: int) -> None:
    with Lanes(models, threads, world) as lanes:
        assert lanes.side_by_side is side_by_side
        seen = lanes.map(lambda m: torch.get_num_threads(), [None] * models)  # type: ignore[list-item]
        assert seen == [torch_threads] * models


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_side_by_side_trains_each_model_exactly_as_alone(precision: str) -> None:
    torch.manual_seed(1)
    images = torch.rand(96, 8, 8)
    order = torch.randperm(96)
    torch.set_num_threads(1)
    alone = _members(precision)
    torch.manual_seed(2)  # the VAE's posterior samples: the only draws from torch's global generator
    losses_alone = [train_steps(m, images, order, 16, range(6), precision) for m in alone]
    together = _members(precision)
    threads: dict[str, str] = {}

    def step(m: Member) -> torch.Tensor:
        threads[m.name] = threading.current_thread().name
        return train_steps(m, images, order, 16, range(6), precision)

    with Lanes(2, 2) as lanes:
        assert not Lanes(2, 2, side_by_side=False).side_by_side
        torch.manual_seed(2)
        losses_together = lanes.map(step, together)
    assert len(set(threads.values())) == 2 and threading.current_thread().name not in threads.values()
    assert [x.item() for x in losses_together] == [x.item() for x in losses_alone]
    for a, b in zip(alone, together):
        for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(p, q), name
        assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_a_failing_lane_raises_in_the_caller() -> None:
    def fail(m: Member) -> None:
        if m.name == "vae":
            raise FloatingPointError("the loss went to nan")

    with Lanes(2, 2) as lanes, pytest.raises(FloatingPointError, match="nan"):
        lanes.map(fail, _members("fp32"))


def test_train_steps_repeats_the_first_batch_for_a_short_shard() -> None:
    torch.manual_seed(0)
    images = torch.rand(40, 8, 8)
    m = _members("fp32")[0]
    total = train_steps(m, images, torch.arange(40), 16, range(4), "fp32")  # the fourth step lies past the end
    assert m.scheduler.last_epoch == 4 and torch.isfinite(total)


def test_a_run_resumed_from_its_checkpoint_ends_where_it_would_have(tmp_path, monkeypatch) -> None:
    """`aevae train --resume` and a restarted worker load the last checkpoint: the models, their optimizers and
    schedules, and torch's global generator (the VAE's posterior samples). Without the generator the resumed
    VAE drew other samples and ended elsewhere than the run that was never stopped."""
    import ray.train

    from aevae.trainer import loop

    torch.manual_seed(1)
    images = torch.rand(96, 8, 8)
    order = torch.randperm(96)
    torch.set_num_threads(1)

    def epochs(members: list[Member], count: int) -> None:
        for _ in range(count):
            for m in members:
                train_steps(m, images, order, 16, range(3), "fp32")

    straight = _members("fp32")
    torch.manual_seed(2)
    epochs(straight, 2)
    stopped = _members("fp32")
    torch.manual_seed(2)
    epochs(stopped, 1)
    saved = loop._save(stopped, 0, str(tmp_path))
    torch.rand(1000)  # what the stopped process drew after its checkpoint, or a new process's fresh state
    resumed = _members("fp32")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: saved)
    assert loop._restore(resumed) == 1
    epochs(resumed, 1)
    for a, b in zip(straight, resumed):
        for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.equal(p, q), f"{a.name} {name}"
