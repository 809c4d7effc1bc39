"""The commands' numeric flags: every bad value is refused before anything starts, with what is accepted."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aevae import cli
from aevae.errors import UserError
from aevae.trainer.cli import MAX_WIDTH, config_from_args, register


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


@pytest.mark.parametrize("argv, message", [
    (("--lr", "nan"), "--lr must be positive and finite, got nan"),
    (("--lr", "inf"), "--lr must be positive and finite, got inf"),
    (("--lr", "-1"), "--lr must be positive and finite"),
    (("--epochs", "0"), "--epochs must be positive"),
    (("--hidden", "0"), "--hidden takes comma-separated layer widths from 1 to 65,536"),
    (("--hidden", "1024,,256"), "got '1024,,256'"),
    (("--hidden", "1024,x"), "e.g. 1024,512,256"),
    (("--hidden", str(MAX_WIDTH + 1)), "--hidden takes"),
    (("--latent-dim", str(MAX_WIDTH + 1)), "--latent-dim must be at most 65,536"),
])
def test_bad_flags_are_refused_with_what_is_accepted(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UserError) as error:
        config_from_args(parse(*argv))
    assert message in str(error.value)


def test_good_flags_make_the_config() -> None:
    config = config_from_args(parse("--lr", "1e-3", "--hidden", "64,32", "--latent-dim", "8", "--epochs", "2"))
    assert (config.lr, config.hidden, config.latent_dim, config.epochs) == (1e-3, (64, 32), 8, 2)
    assert config_from_args(parse()).epochs == 15  # the default recipe (trainer/config.py)
    assert config_from_args(parse("--models", "vae, ae,vae")).models == ("vae", "ae")  # each model once


@pytest.mark.parametrize("argv", [
    ["decode", "--timeout", "nan", "0,0,0,0", "-o", "x.png"],
    ["encode", "--timeout", "inf", "x.png"],
    ["decode-batch", "--prior", "10", "--scale", "nan", "-o", "out"],
    ["decode-batch", "--prior", "10", "--cpus-per-worker", "nan", "-o", "out"],
    ["decode-batch", "--prior", "10", "--timeout", "-1", "--decoder", "127.0.0.1:1", "-o", "out"],
    ["train", "--lr", "inf"],
])
def test_every_command_refuses_a_non_finite_or_negative_number(argv: list[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    flag = argv[argv.index(next(a for a in argv if a in ("nan", "inf", "-1"))) - 1]
    assert f"{flag} must be positive and finite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("argv, flag", [
    (["serve", "decoder", "--port", "70000"], "--port"),
    (["serve", "encoder", "--health-port", "-2"], "--health-port"),
    (["ui", "--metrics-port", "65536"], "--metrics-port"),
    (["up", "--decoder-port", "70000"], "--decoder-port"),
])
def test_every_command_refuses_a_port_out_of_range(argv: list[str], flag: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # `up` would train into ./models if the port passed
    assert cli.main([*argv, "--models-dir", str(tmp_path)] if argv[0] != "ui" else argv) == 2
    assert f"{flag} must be 0..65535 (0 picks a free port)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything started


def test_a_run_needing_more_cpus_than_the_machine_has_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Ray Train would wait for the workers' CPUs forever, without a word."""
    import os

    import ray

    from aevae.trainer import job
    from aevae.trainer.config import TrainConfig

    cpus = os.cpu_count() or 1
    for workers, per_worker in ((1, cpus + 1), (cpus + 1, 1)):
        config = TrainConfig(num_workers=workers, cpus_per_worker=per_worker, models_dir=str(tmp_path / "models"),
                             data_root=str(tmp_path))
        with pytest.raises(UserError) as error:
            job.run(config)
        assert f"needs {workers * per_worker} CPUs, and the Ray cluster has {cpus} (this machine's CPUs)" \
            in str(error.value) and "--address" in str(error.value)
    assert not ray.is_initialized() and not (tmp_path / "models").exists()


def test_cpus_beyond_a_named_cluster_are_waited_for_with_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    from aevae.errors import check_cpus, cpus_problem

    assert cpus_problem("--workers", 2, 2, 4) is None
    problem = cpus_problem("--workers", 3, 1.5, 4)
    assert problem == "--workers 3 x --cpus-per-worker 1.5 needs 4.5 CPUs, and the Ray cluster has 4"
    check_cpus("--workers", 3, 1.5, 4, "10.0.0.1:6379")  # a named cluster may grow: said, not refused
    assert f"{problem} now: waiting for it to grow" in capsys.readouterr().out
    with pytest.raises(UserError, match="lower --workers or --cpus-per-worker"):
        check_cpus("--workers", 3, 1.5, 4, None)
    check_cpus("--workers", 2, 2, 4, None)  # fits: nothing said
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, message", [
    (["--max-message-bytes", "3000000000"], "--max-message-bytes must be at most 1073741824, got 3000000000"),
    (["--keepalive-seconds", "1e12"], "--keepalive-seconds must be at most 2147483"),
])
def test_serve_refuses_numbers_past_what_grpc_takes(argv: list[str], message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """They passed the settings and were an OverflowError traceback from grpc.aio.server (exit 1)."""
    assert cli.main(["serve", "decoder", "--port", "0", "--models-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["serve", "decoder", "--help"], ["up", "--help"]])
def test_help_shows_defaults_but_not_an_on_off_flags_false(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every flag's default is shown from the code, except an on/off flag's: "--insecure ... (default: False)"
    said what its name says."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: False)" not in out
    assert "--insecure" in out
    assert "(default: 0.5)" in out or "(default: 8080)" in out  # a valued flag still shows its default
