"""Every bad input: exit code 2, one paragraph on stderr, no traceback, nothing written."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import regrow
from conftest import interrupt_run
from regrow.cli import main
from regrow.config import read_recipe


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, message):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("regrow: stage")]
    assert len(lines) == 1, err
    assert lines[0].startswith("regrow: error: ")
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.sparsity=1.5", "sparsity must be a number in [0, 1)"),
        ("recover.epochs=true", "'recover': 'epochs' takes a number, not true"),
        ("seed=-1", "'seed': Input should be greater than or equal to 0"),
        ("name=../../elsewhere", "'name' is used as a folder name"),
        ("sensitivity.levels=true", "'sensitivity.levels': Input should be a valid list"),
        ("prune.threshold=0.1", "give exactly one of sparsity"),
        ("prune.sparsity=null", "give exactly one of sparsity"),
        (
            "prune.pattern=blocky",
            "unknown pattern 'blocky'; allowed values: channel, channel+head, head, n:m (e.g. '2:4'), unstructured",
        ),
        (
            "prune.criterion=psychic",
            "unknown criterion 'psychic'; allowed values: bn_scale, magnitude, random, sparsegpt, taylor, wanda",
        ),
        ("recover.method=hope", "unknown recovery method 'hope'; allowed values: distill, finetune"),
        ("schedule.name=weekly", "unknown schedule 'weekly'; allowed values: gradual, iterative, one_shot"),
        ("prune.targets=[conv9.*]", "targets entry 'conv9.*' matches no parameter"),
        ("prune.pattern=4:4", "needs 0 < n < m"),
        ("prune.pattern=2:4", "fixes the sparsity at 0.5, but sparsity 0.9 was asked for"),
        ("prune.sparsty=0.5", "unknown key 'prune.sparsty'; allowed keys here:"),
        ("model.factory=no_such_module_xyz:build", "module 'no_such_module_xyz' cannot be found"),
        ("model.factory=regrow.models:no_such_fn", "has no function 'no_such_fn'; its functions are:"),
        ("data.factory=regrow.models:digits_cnn", "returned Sequential; it must return a regrow.data.DataBundle"),
        ("schedule.name=gradual", "needs prune.sparsity, not prune.threshold"),
        ("prune.macs=0.5", "macs, params and latency budgets need pattern 'channel', 'head' or 'channel+head'"),
        ("prune.pattern=head", "pattern 'head' found no attention module"),
    ],
)
def test_bad_input_exits_2_with_one_message(capsys, tmp_path, override, message):
    out = tmp_path / "out"
    extra = (
        ["--set", "prune.sparsity=null", "--set", "prune.threshold=0.1"] if override == "schedule.name=gradual" else []
    )
    extra += ["--set", "model.name=null"] if override.startswith("model.factory") else []
    extra += ["--set", "data.name=null", "--set", "data.kwargs={}"] if override.startswith("data.factory") else []
    code, _, err = run_cli(capsys, "run", "demo", "--set", override, *extra, "--out", str(out))
    assert_clean_error(code, err, message)
    assert not out.exists()  # nothing is written for a run that cannot start


NEW_TASK = "{name: digits, kwargs: {classes: [0, 1, 2, 3, 4]}}"  # model.train.data: trained on another task


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["recover.method=rigl", "prune.pattern=2:4", "prune.sparsity=null", "prune.ignore=[0.weight]"],
            "needs pattern 'unstructured'",
        ),
        (["recover.rewind=lr", "recover.lr_schedule=one_cycle"], "recover.lr_schedule 'one_cycle' would be ignored"),
        (["recover.lr_schedule=rewind"], "unknown lr_schedule 'rewind'; allowed values: constant, cosine, one_cycle"),
        (["prune.criterion=bn_scale"], "it needs pattern 'channel', not 'unstructured'"),
        (["schedule.name=gradual", "schedule.initial=0.95"], "schedule.initial (0.95) must be below"),
        (["prune.clamps={'0.*': [0, 0.5]}"], "give prune.allocation"),
        (["prune.allocation=sensitivity", "prune.clamps={'0.*': [0, 2]}"], "must be [min, max] with 0 <= min"),
        (["sensitivity.levels=[1.5]"], "sensitivity levels must be a non-empty list of numbers in (0, 1)"),
        (["sensitivity.levels=[]"], "sensitivity levels must be a non-empty list"),
        (["recover.stop_when={within: 150}"], "'recover.stop_when.within'"),
        (["prune.allocation_file=/nonexistent/allocation.json"], "is not readable JSON"),
        (["recover.method=transfer", "recover.distill=true"], "does not apply to method 'transfer'"),
        (["recover.method=transfer", "recover.rewind=weights"], "method 'transfer' gives it a new head"),
        (["recover.rewind=lr", "recover.rewind_epoch=500"], "recover.rewind_epoch 500 is not inside the original"),
        (
            [f"model.train.data={NEW_TASK}", "recover.method=finetune", "recover.stop_when={within: 1}"],
            "a run with model.train.data (a new task) has no dense baseline on the new task",
        ),
        (
            [f"model.train.data={NEW_TASK}", "recover.method=finetune", "recover.rewind=weights"],
            "a run with model.train.data (a new task) gives it a new head",
        ),
        (["schedule.name=gradual", "recover.method=share"], "clusters the surviving weights once"),
        (["model.train=null", "recover.stop_when={within: 1}"], "its baseline is an untrained network"),
        (["recover.stop_when={}"], "recover.stop_when is empty"),
        (
            ["prune.pattern=channel", "prune.sparsity=null", "prune.macs=0.5", "prune.criterion=wanda"],
            "criterion 'wanda' prunes single weights layer by layer from calibration inputs; it needs pattern",
        ),
        (["prune.calibration={batches: 4}"], "prune.calibration configures the calibrated criteria"),
        (
            ["prune.criterion=sparsegpt", "prune.sparsity=null", "prune.threshold=0.1"],
            "a threshold on its scores means nothing",
        ),
        (["prune.criterion=wanda", "prune.calibration={batches: 0}"], "'prune.calibration.batches': Input should be"),
        (["recover.max_lr=0.01"], "recover.max_lr is given but applies only to lr_schedule 'one_cycle'"),
        (["recover.rewind_checkpoint=w.safetensors"], "recover.rewind_checkpoint is given but applies only to rewind"),
        (["recover.dynamic={update_every: 5}"], "recover.dynamic is given but applies only to method 'rigl' or 'set'"),
        (["recover.share={k: 4}"], "recover.share is given but applies only to method 'share' or share.after: true"),
        (
            ["prune.pattern=channel", "prune.sparsity=null", "prune.latency=0.8", "schedule.name=iterative"],
            "a latency budget is met in one shot",
        ),
        (
            ["prune.pattern=channel", "prune.sparsity=null", "prune.macs=0.5", "recover.rewind=weights"],
            "only rewind 'lr' applies",
        ),
        (
            ["model.name=mlp", "model.kwargs={}", "data.kwargs={batch_size: 64, flatten: true}"],
            "augment 'shift' moves images and needs batches shaped (N, C, H, W); got shape (64, 64)",
        ),
    ],
)
def test_settings_that_do_not_work_together_are_refused_before_any_work(capsys, tmp_path, overrides, message):
    out = tmp_path / "out"
    argv = [arg for o in overrides for arg in ("--set", o)]
    code, _, err = run_cli(capsys, "run", "demo", *argv, "--out", str(out))
    assert_clean_error(code, err, message)
    assert not out.exists()


def test_allocation_file_for_other_targets_is_refused(capsys, tmp_path):
    import json

    plan = {
        "format": "regrow.allocation",
        "method": "sensitivity",
        "pattern": "unstructured",
        "budget": {"sparsity": 0.9},
        "per_target": {"features.0.weight": 0.9, "fc.weight": 0.9},
        "notes": [],
    }
    (tmp_path / "allocation.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "run", "demo", "--set", f"prune.allocation_file={tmp_path / 'allocation.json'}", "--out", str(out)
    )
    assert_clean_error(code, err, "does not plan this model's targets (unknown: ['fc.weight', 'features.0.weight']")
    assert not out.exists()


def test_structural_budget_errors(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "run",
        "demo",
        "--set",
        "prune.pattern=channel",
        "--set",
        "prune.macs=1.5",
        "--set",
        "prune.sparsity=null",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(code, err, "macs must be in (0, 1]")
    code, _, err = run_cli(
        capsys, "run", "demo", "--set", "prune.pattern=channel", "--set", "prune.macs=0.5", "--out", str(tmp_path / "o")
    )
    assert_clean_error(code, err, "give exactly one budget for a structural pattern")
    code, _, err = run_cli(
        capsys,
        "run",
        "demo",
        "--set",
        "prune.pattern=channel",
        "--set",
        "schedule.name=gradual",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(code, err, "use schedule 'iterative'")


def test_n_m_on_a_layer_with_too_few_inputs(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "run",
        "demo",
        "--set",
        "prune.pattern=2:4",
        "--set",
        "prune.sparsity=null",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(code, err, "target '0.weight' has 1 inputs, which is not divisible by 4")


def test_yaml_syntax_error_reports_its_line(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmodel:\n  name: digits_cnn\n  kwargs: {width: 4\n")
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_clean_error(code, err, "is not valid YAML at line 5")


def test_a_key_given_twice_is_refused_not_silently_replaced(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nprune: {sparsity: 0.8}\nrecover: {epochs: 1}\nprune: {sparsity: 0.5}\n")
    code, _, err = run_cli(capsys, "run", str(recipe), "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, "at line 4, column 1: duplicate key 'prune' (first at line 2)")
    code, _, err = run_cli(capsys, "run", "demo", "--set", "prune.clamps={a: [0, 1], a: [0, 0.5]}")
    assert_clean_error(code, err, "duplicate key 'a'")
    merged = read_recipe_text("base: &b {epochs: 1, lr: 0.1}\nrecover: {<<: *b, epochs: 2}\n")  # anchors still merge
    assert merged["recover"] == {"epochs": 2, "lr": 0.1}
    recipe.write_text("name: x\n? [a, b]\n: 1\n")
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_clean_error(code, err, "a key must be a plain value, not list")


def read_recipe_text(text):
    from regrow.config import yaml_load

    return yaml_load(text)


def test_missing_recipe(capsys):
    code, _, err = run_cli(capsys, "run", "does-not-exist.yaml")
    assert_clean_error(code, err, "neither a file nor a built-in recipe")


def test_a_folder_named_like_a_built_in_recipe_does_not_hide_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. left by `regrow demo --out demo`
    (tmp_path / "mine").mkdir()
    assert read_recipe("demo")[0]["name"] == "demo"
    code, _, err = run_cli(capsys, "run", "mine")
    assert_clean_error(code, err, "recipe 'mine' is a directory, not a recipe file")


def test_corrupt_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "run", "demo", "--set", f"model.checkpoint={ckpt}", "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, "is not a readable safetensors file")


def test_checkpoint_of_another_model(capsys, tmp_path):
    ckpt = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(ckpt))
    code, _, err = run_cli(capsys, "run", "demo", "--set", f"model.checkpoint={ckpt}", "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, "does not fit the model")


def test_pickle_checkpoint_is_refused(capsys, tmp_path):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"whatever")
    code, _, err = run_cli(capsys, "run", "demo", "--set", f"model.checkpoint={ckpt}", "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, "looks like a pickle file")


def test_non_empty_output_directory_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "run", "demo", "--out", str(out))
    assert_clean_error(code, err, "is not empty")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_set_syntax_and_unknown_command(capsys):
    code, _, err = run_cli(capsys, "run", "demo", "--set", "prune.sparsity")
    assert_clean_error(code, err, "must look like key=value")
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_list_shows_every_registry(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for word in (
        "patterns:",
        "unstructured",
        "n:m",
        "criteria:",
        "taylor",
        "schedules:",
        "gradual",
        "methods:",
        "distill",
        "finetune",
        "recipes:",
        "demo",
        "models:",
        "digits_cnn",
    ):
        assert word in out


def test_help_on_every_command(capsys):
    for argv in ([], ["run"], ["demo"], ["list"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        assert "usage: regrow" in capsys.readouterr().out


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("regrow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "regrow.cli"]
    proc = subprocess.run(
        [*cmd, "run", "demo", "--set", "prune.sparsity=1.5"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "sparsity must be a number in [0, 1)" in proc.stderr


def test_sensitivity_command_writes_its_files(capsys, tmp_path):
    out = tmp_path / "s"
    code, _, _ = run_cli(
        capsys,
        "sensitivity",
        "demo",
        "--set",
        "model.train.epochs=2",
        "--set",
        "sensitivity.levels=[0.5, 0.9]",
        "--set",
        "sensitivity.batches=1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"sensitivity.json", "sensitivity.png", "sensitivity.md"}
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved["levels"] == [0.5, 0.9]
    assert [c["name"] for c in saved["curves"]] == ["0.weight", "2.weight", "6.weight"]
    assert all(len(c["loss"]) == 2 for c in saved["curves"])


def test_sensitivity_of_a_transfer_recipe_is_measured_on_its_source_data(tmp_path):
    from regrow.pipeline import run_sensitivity

    result = run_sensitivity(
        "digits_transfer",
        overrides=[
            "model.train.epochs=5",
            "model.kwargs.num_classes=3",
            "model.train.data.kwargs.classes=[0, 1, 2]",
            "data.kwargs.classes=[3, 4, 5, 6, 7, 8, 9]",
            "sensitivity.levels=[0.5]",
            "sensitivity.batches=2",
        ],
        out_dir=tmp_path / "s",
        progress=False,
    )
    # Trained and measured on the 3 source classes; the 7-class target data does not fit its head.
    assert result.baseline_accuracy > 0.8


def test_global_options_are_accepted_after_every_command(capsys):
    code, out, _ = run_cli(capsys, "list", "patterns", "-q", "--debug")
    assert code == 0 and out.startswith("patterns:")


def test_a_closed_pipe_ends_the_listing_quietly(tmp_path):
    cmd = f"{sys.executable} -m regrow.cli list | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "patterns:\n" and "Error" not in done.stderr, done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads a pipe through /dev/fd")
def test_a_recipe_read_from_a_pipe(tmp_path):
    r, w = os.pipe()
    os.write(w, b"name: piped\nmodel: {name: mlp}\ndata: {name: digits}\nprune: {sparsity: 0.5}\n")
    os.close(w)
    try:
        data, _ = read_recipe(f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert data["name"] == "piped" and data["prune"] == {"sparsity": 0.5}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_ends_a_run_like_ctrl_c_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "runs" / "o"
    argv = ["run", "demo", "--out", str(out), "--set", "model.train.epochs=500", "--set", "checkpoint.enabled=false"]
    # wait until the run is training its baseline, with its staging folder made
    code, err = interrupt_run(argv, tmp_path, lambda: out.is_dir() and any(out.iterdir()), signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "regrow: terminated" in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # the folders it created are gone, with the half-written files


@pytest.mark.parametrize(
    "stop, code, said", [("SIGTERM", 128 + 15, "regrow: terminated"), ("SIGINT", 130, "regrow: interrupted")]
)
def test_a_signal_that_lands_in_an_import_still_ends_the_run_cleanly(capsys, monkeypatch, stop, code, said):
    """A signal that arrives while a class body runs (a lazy import, such as torch's of torch._dynamo when the
    first optimizer is made) is raised inside ``__set_name__``, which Python 3.11 wraps in a RuntimeError."""
    from regrow.cli import _Terminated

    class Landing:
        def __set_name__(self, owner, name):
            raise _Terminated(signal.SIGTERM) if stop == "SIGTERM" else KeyboardInterrupt

    def run_that_imports(recipe, args):
        type("Imported", (), {"attribute": Landing()})

    monkeypatch.setattr("regrow.cli._run", run_that_imports)
    assert main(["run", "demo", "--no-progress"]) == code
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


_SWALLOWED = """
import os, signal, sys
import regrow.recovery.loop as loop
from regrow.cli import main

class Dropped:
    def __del__(self):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        for _ in range(100_000):  # the handler runs here, inside __del__, where Python swallows what it raises
            pass

steps, step = [], loop._step
def counted(*args):
    steps.append(1)
    if len(steps) == 3:
        Dropped()
    return step(*args)

loop._step = counted
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test runner's workers ignore it)
code = main(sys.argv[2:])
print(len(steps))
sys.exit(code)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    "stop, code, said", [("SIGTERM", 128 + 15, "regrow: terminated"), ("SIGINT", 130, "regrow: interrupted")]
)
def test_a_signal_whose_stop_python_swallows_still_ends_the_run_at_the_next_step(tmp_path, stop, code, said):
    """A signal handled inside a ``__del__`` (or a weakref callback) raises where Python only prints "Exception
    ignored"; the run must still stop, at the next training step, not train to its end."""
    out = tmp_path / "o"
    budget = ["model.train.epochs=3", "recover.epochs=2", "evaluate.latency=false", "checkpoint.enabled=false"]
    argv = ["run", "demo", "--out", str(out), "--no-progress", *[a for s in budget for a in ("--set", s)]]
    done = subprocess.run(
        [sys.executable, "-c", _SWALLOWED, stop, *argv],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "Exception ignored" in done.stderr, done.stderr  # the signal did land where its stop is lost
    assert done.returncode == code and said in done.stderr, done.stderr
    assert done.stdout.split() == ["3"]  # it stopped after the step that lost it
    assert not out.exists()


def test_a_remembered_stop_is_raised_once_and_forgotten_when_the_run_ends():
    from regrow.errors import forget_stop, raise_lost_stop, signalled

    raise_lost_stop()  # nothing remembered: nothing raised
    stop = KeyboardInterrupt()
    assert signalled(stop) is stop
    with pytest.raises(KeyboardInterrupt) as raised:
        raise_lost_stop()
    assert raised.value is stop
    raise_lost_stop()  # raised once
    signalled(KeyboardInterrupt())
    forget_stop()
    raise_lost_stop()


def test_the_interruption_behind_an_error_is_found_through_its_cause_or_context():
    from regrow.errors import interruption

    stop = KeyboardInterrupt()
    try:
        try:
            raise stop
        except KeyboardInterrupt:
            raise ValueError("raised while handling it")  # noqa: B904 (the context is what is tested)
    except ValueError as exc:
        during = exc
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = during
    assert interruption(stop) is stop and interruption(during) is stop and interruption(wrapped) is stop
    looped = RuntimeError("a cycle")
    looped.__context__ = RuntimeError("its context")
    looped.__context__.__context__ = looped
    assert interruption(looped) is None and interruption(ValueError("plain")) is None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "o"
    budget = ["model.train.epochs=40", "recover.epochs=1", "evaluate.latency=false"]
    argv = ["run", "demo", "--out", str(out), "--no-progress", *[a for s in budget for a in ("--set", s)]]

    def saved() -> bool:
        """An epoch ended and its checkpoint is recorded: state.json, written after the phase's file, names the
        phase. (Waiting for the phase's file alone raced the record: a SIGTERM in between found no checkpoint.)"""
        for state in out.glob(".regrow-partial-*/.regrow-checkpoint/state.json"):
            try:
                return bool(json.loads(state.read_text())["phases"])
            except (OSError, ValueError, KeyError):
                return False
        return False

    code, err = interrupt_run(argv, tmp_path, saved, signal.SIGTERM, settle=0)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "the run stopped (interrupted)" in err and "is kept in" in err, err
    assert "run the same command with --resume to continue it" in err, err
    assert main([*argv, "--resume"]) == 0
    assert (out / "report.json").is_file() and not list(out.glob(".regrow-*"))


def test_an_empty_out_means_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")  # the working directory is not empty: it must not be used
    report = regrow.run(
        "demo",
        overrides=["model.train.epochs=1", "recover.epochs=1", "evaluate.latency=false"],
        out_dir="",
        progress=False,
    )
    assert os.path.dirname(report.out_dir) == "runs" and (tmp_path / report.out_dir / "report.json").is_file()


def test_what_strategy_auto_chooses_is_checked_with_what_the_recipe_states(capsys, tmp_path):
    out = tmp_path / "o"
    overrides = ["model.train.epochs=1", "recover.method=share", "recover.epochs=110"]  # long enough for gradual
    argv = [arg for o in overrides for arg in ("--set", o)]
    code, _, err = run_cli(capsys, "-q", "run", "digits_auto", *argv, "--out", str(out))
    assert_clean_error(code, err, "recover.method 'share' clusters the surviving weights once")
    assert not out.exists()


BAD_DATA = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

def batches(x_dim=4, labels=lambda y: y):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        x = torch.randn(8, x_dim, generator=g)
        out.append((x, labels((x[:, 0] > 0).long())))
    return out

def good():  # uint8 labels, as raw image datasets store them, are class indices too
    return {"train": batches(labels=lambda y: y.to(torch.uint8)), "test": batches()}

def labels_out_of_range():
    return {"train": batches(labels=lambda y: y + 5), "test": batches()}

def float_labels():
    return {"train": batches(), "test": batches(labels=lambda y: y.float())}

def wrong_inputs():
    return {"train": batches(x_dim=7), "test": batches(x_dim=7)}
"""


@pytest.mark.parametrize(
    "factory, message",
    [
        ("labels_out_of_range", "the labels of the train data run from 5 to 6, but the model scores 3 classes"),
        ("float_labels", "the labels of the test data must be a 1-D int64 (torch.long) or uint8 tensor"),
        ("wrong_inputs", "the model cannot run on a batch of the train data (RuntimeError: mat1 and mat2"),
    ],
)
def test_data_that_does_not_fit_the_model_is_refused_before_training(capsys, tmp_path, monkeypatch, factory, message):
    (tmp_path / "mydata.py").write_text(BAD_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {factory: 'mydata:model', train: {epochs: 1}}\n"
        f"data: {{factory: 'mydata:{factory}'}}\nprune: {{sparsity: 0.5}}\nrecover: {{epochs: 1}}\n"
        "evaluate: {latency: false}\n"
    )
    code, _, err = run_cli(capsys, "-q", "run", str(recipe), "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, message)
    assert not (tmp_path / "o").exists()
    recipe.write_text(recipe.read_text().replace(factory, "good"))  # the same recipe with fitting data runs
    assert run_cli(capsys, "-q", "run", str(recipe), "--out", str(tmp_path / "o"))[0] == 0


def test_a_busy_machine_gets_a_warning_naming_a_thread_count(monkeypatch, capsys):
    import torch

    from regrow.cli import _set_threads

    monkeypatch.setattr("regrow.cli._busy_elsewhere", lambda: 1.0)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _set_threads(None)
        assert torch.get_num_threads() == 2  # a warning, not a change: results depend on the thread count
        err = capsys.readouterr().err
        assert "the machine is busy (1.0 other processes running on 2 cores) and torch would use 2 threads" in err
        assert "pass --threads 1" in err
        monkeypatch.setattr("regrow.cli._busy_elsewhere", lambda: 0.0)
        _set_threads(None)
        assert capsys.readouterr().err == ""
        _set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_threads_must_be_a_positive_whole_number(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["run", "demo", "--threads", "0"])
    assert ended.value.code == 2
    assert "--threads: must be a whole number of threads, 1 or more; got '0'" in capsys.readouterr().err
