"""The trainer's progress lines: what each epoch's figures were measured on."""

from __future__ import annotations

from aevae.trainer.job import _format_progress
from aevae.trainer.loop import PROGRESS_TEST_IMAGES


def _message(epoch: int, test_images: int) -> dict:
    figures = {"train_loss": 120.0, "test_bce": 110.0, "test_kl": 10.0, "test_loss": 120.0}
    return {"epoch": epoch, "epoch_seconds": 11.5, "images_per_second": 5217.0, "eta_seconds": 61.0,
            "test_images": test_images, "ae": {**figures, "test_kl": 0.0, "test_loss": 110.0}, "vae": figures}


def test_an_epoch_on_part_of_the_test_set_says_how_many_images() -> None:
    ae, vae = _format_progress(_message(3, PROGRESS_TEST_IMAGES), 15)
    assert ae.startswith("[ae] epoch 3/15") and vae.startswith("[vae] epoch 3/15")
    assert f"test({PROGRESS_TEST_IMAGES:,}) bce 110.00 kl 10.00 total 120.00" in vae
    assert "ETA 1m01s" in ae


def test_the_last_epoch_names_the_whole_test_set() -> None:
    [ae, _] = _format_progress(_message(15, 10_000), 15)
    assert "test(10,000) bce 110.00 kl 0.00 total 110.00" in ae


def test_messages_other_than_metrics_pass_through() -> None:
    assert _format_progress("resumed from the checkpoint of epoch 2", 15) == ["resumed from the checkpoint of epoch 2"]
