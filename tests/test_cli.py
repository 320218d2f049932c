"""``fedlora-fast train``: bad input gives one clear line and a non-zero exit; a tiny run writes its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora_fast.cli import EXIT_USAGE, main

from conftest import tiny_bert_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer BERT (hidden 16) with the packaged MiniLM tokenizer, and 240 rows of SMS data."""
    return tiny_bert_run(tmp_path_factory.mktemp("cli"), 240)


def tiny_args(tiny, out, *extra):
    return ["train", "--model", tiny["model"], "--data", tiny["data"], "--partition", "iid", "--rounds", "2",
            "--local-steps", "2", "--batch-size", "8", "--max-length", "24", "--out", str(out), "--no-progress",
            *extra]


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data", "/nonexistent/x.csv"], "no such file '/nonexistent/x.csv'"),
        (["--text-column", "Body"], ("--text-column: no column 'Body' in /", "; its columns are ['Label', 'SMS']")),
        (["--data", "./nowhere"], "data: no such file './nowhere'"),
        (["--clients", "500"], "--clients: 500 clients but only"),  # (errors name the flag, not the setting)
        (["--rank", "0"], "--rank: expected an int >= 1, got 0"),
        (["--epsilon", "0.0001"], "epsilon: client 0"),
        (["--epsilon", "-1"], "epsilon: expected a finite number > 0, got -1.0"),
        (["--rounds", "0"], "rounds: expected an int >= 1, got 0"),
        (["--model", "/nonexistent/model"], "model: no such directory"),
        # the library's argument names as the flags (target_modules is --targets), here and in "a and b" forms
        (["--targets", "nothing_like_this"], "--targets: 'nothing_like_this' matches no module"),
        (["--targets", "classifier"], "--targets and --trainable-modules overlap: "),
        (["--text-column", "SMS", "--label-column", "SMS"],
         "--text-column and --label-column: both are 'SMS'; they must differ"),
        # only what the clients hold trains: a skew that gives every client one class is a one-class task
        (["--clients", "2", "--partition", "label_skew", "--label-proportions", "1,0;1,0", "--rounds", "1"],
         "--label-proportions: the clients hold examples of 1 of the classes ['ham', 'spam'] (['ham'])"),
        # rows of different lengths: numpy's "inhomogeneous shape" named no flag
        (["--clients", "2", "--partition", "label_skew", "--label-proportions", "0.5,0.5;1.0", "--rounds", "1"],
         "--label-proportions: expected one row of C numbers per client, got rows of lengths [2, 1]"),
        # a flag its chosen mode ignores: refused, not silently dropped
        (["--partition", "iid", "--dirichlet-alpha", "0.3"],
         "--dirichlet-alpha: applies only with --partition dirichlet"),
        (["--partition", "iid", "--label-proportions", "0.1,0.9;0.9,0.1;0.5,0.5"],
         "--label-proportions: applies only with --partition label_skew"),
        (["--server-noise-multiplier", "2"], "--server-noise-multiplier: applies only with --aggregator central_dp"),
        (["--optimizer", "adamw", "--momentum", "0.9"], "--momentum: applies only with --optimizer sgd"),
        (["--device", "meta"], "device: 'meta' holds no data"),
        (["--device", "xpu"], "device: 'xpu': "),
        (["--device", "mps"], "--device: 'mps': "),  # (one line: torch's error was a 55-line dispatcher table)
    ],
)
def test_bad_input_gives_a_clear_error(tiny, tmp_path, capsys, extra, expected):
    code, out, err = run_cli(tiny_args(tiny, tmp_path / "o", *extra), capsys)
    assert code == EXIT_USAGE
    for part in (expected,) if isinstance(expected, str) else expected:
        assert part in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize("relative", [True, False])
def test_a_model_path_that_is_a_file_is_refused(tiny, tmp_path, capsys, monkeypatch, relative):
    """--model DIR/config.json: transformers loaded the tokenizer beside it, took the file for a single weights
    file and torch.load()ed it (an UnpicklingError traceback, exit 1)."""
    model = Path(tiny["model"])
    monkeypatch.chdir(model.parent)
    config = f"{model.name}/config.json" if relative else str(model / "config.json")
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "o", "--model", config), capsys)
    assert code == EXIT_USAGE and err.count("\n") == 1, err
    assert f"--model: expected a model directory (or a hub name), got a file {config!r}" in err, err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--out", ""], "--out: expected a directory, got ''"),  # (the run was written into the current directory)
        (["--out", "{tmp}/file/run"], "--out: expected a writable directory, got '{tmp}/file/run' (NotADirectoryError"),
        (["--alpha", "1e308"], "--alpha: expected alpha / r (the adapter scale) between"),
        (["--optimizer", "sgd", "--momentum", "1.5"], "--momentum: expected a number in [0, 1), got 1.5"),
        (["--optimizer", "sgd", "--momentum", "1"], "--momentum: expected a number in [0, 1), got 1.0"),
    ],
)
def test_bad_settings_are_refused_before_the_run_starts(tmp_path, capsys, monkeypatch, extra, expected):
    """Settings refused by the checks before any data or model is loaded, naming the flag."""
    from fedlora_fast.federated import simulation

    monkeypatch.setattr(simulation, "run_simulation", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "file").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code, _, err = run_cli(["train", "--no-progress", "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == EXIT_USAGE and expected.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1, err


def test_a_message_names_flags_only_where_it_begins_with_settings():
    """The library's names of settings at the start of a message ("name: ", "name=value: ", "a and b: ") are
    given as the flags; other text is left alone, as is a message naming something that is not a flag."""
    from fedlora_fast.cli import _as_flag, build_parser

    parser = build_parser()
    cases = {
        "num_clients: 500 clients": "--clients: 500 clients",
        "target_modules: 'x' matches no module": "--targets: 'x' matches no module",
        "label_names: expected distinct classes": "--labels: expected distinct classes",
        "target_modules='all-linear': cannot adapt": "--targets='all-linear': cannot adapt",
        "trainable_modules: no per-sample gradient rule": "--trainable-modules: no per-sample gradient rule",
        "test_fraction=0.99: leaves an empty split": "--test-fraction=0.99: leaves an empty split",
        "dirichlet_alpha=0.01: could not give": "--dirichlet-alpha=0.01: could not give",
        "text_column and label_column: both are 'a'": "--text-column and --label-column: both are 'a'",
        "target_modules and trainable_modules overlap: ['c']": "--targets and --trainable-modules overlap: ['c']",
        # unchanged: a name not at the start, a name that is no flag, prose
        "the target_modules: x": "the target_modules: x",
        "alpha and beta: x": "alpha and beta: x",
        "text_column and label_column differ": "text_column and label_column differ",
        "resume, overwrite: pass one": "resume, overwrite: pass one",
        "seed is 3: target_modules: x": "seed is 3: target_modules: x",
    }
    assert {m: _as_flag(m, parser, "train") for m in cases} == cases


def test_an_out_path_that_is_a_file_is_refused_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    from fedlora_fast.federated import simulation

    monkeypatch.setattr(simulation, "run_simulation", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "f"), capsys)
    assert code == EXIT_USAGE and f"--out: '{tmp_path / 'f'}' is a file" in err and err.count("\n") == 1, err


def test_a_warning_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """A warning during the run is printed as one line, not Python's file:line plus the echoed source line;
    the process's own warning display is restored afterwards."""
    import warnings

    from fedlora_fast.federated import simulation

    def run(*a, **k):
        warnings.warn("delta 0.3 is large", UserWarning)
        raise ValueError("stop here")

    monkeypatch.setattr(simulation, "run_simulation", run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        before = warnings.showwarning
        code, _, err = run_cli(tiny_args(tiny, tmp_path / "o"), capsys)
        restored = warnings.showwarning is before  # (catch_warnings itself restores it only on exit)
    assert code == EXIT_USAGE and err.splitlines() == ["fedlora-fast: warning: delta 0.3 is large",
                                                       "fedlora-fast train: error: stop here"], err
    assert restored


def test_labels_that_are_not_classes(tiny, tmp_path, capsys):
    bad = tmp_path / "reg.csv"
    bad.write_text("text,score\n" + "".join(f"example {i},{i * 0.37:.2f}\n" for i in range(40)))
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "o", "--data", str(bad), "--label-column", "score"), capsys)
    assert code == EXIT_USAGE and "--label-column: labels must be classes" in err and "Traceback" not in err


def test_a_field_over_the_csv_limit_and_declared_classes_missing_from_the_data_are_usage_errors(tiny, tmp_path, capsys):
    """A field over the reader's 16 Mi limit raised csv.Error, a traceback past the CLI's handler (the
    process-wide limit stayed changed). Classes given by --labels but absent from a simulation's data made a
    one-class task (test accuracy 1.0): fewer than 2 present in the training split is refused."""
    import csv

    from fedlora_fast.data import FIELD_LIMIT

    huge = tmp_path / "huge.csv"
    huge.write_text("text,label\n" + "".join(f"m {i},{'ab'[i % 2]}\n" for i in range(40)) + "x" * (FIELD_LIMIT + 5)
                    + ",a\n")
    limit = csv.field_size_limit()
    csv.field_size_limit(1234)  # (whatever the last reader left, the process-wide limit must come back)
    try:
        code, _, err = run_cli(tiny_args(tiny, tmp_path / "o1", "--data", str(huge)), capsys)
        assert csv.field_size_limit() == 1234
    finally:
        csv.field_size_limit(limit)
    assert code == EXIT_USAGE and "Traceback" not in err and "line 42" in err and "field larger than" in err, err
    ham = tmp_path / "ham.csv"
    ham.write_text("text,label\n" + "".join(f"message {i},ham\n" for i in range(60)))
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "o2", "--data", str(ham), "--labels", "ham,spam"), capsys)
    assert code == EXIT_USAGE and "--labels: the training split holds examples of 1 of the classes" in err, err
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "o3", "--labels", "ham,spam,other", "--partition", "label_skew",
                                     "--label-proportions", "0.1,0.8,0.1;0.9,0.1,0;0.5,0.5,0"), capsys)
    assert code == EXIT_USAGE and "--label-proportions: class id(s) [2] have no example" in err, err


def test_a_declared_class_without_examples_is_named_in_a_warning(tiny, tmp_path, caplog):
    """--labels with a class the data never holds (a 3-class head for 2 classes present) runs, with a warning
    naming the class that is never trained nor tested."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fedlora_fast.federated.simulation"):
        code = main(tiny_args(tiny, tmp_path / "o", "--labels", "ham,spam,other", "--rounds", "1"))
    assert code == 0
    assert "classes without a training example: ['other']; without a test example: ['other']" in caplog.text


def test_a_run_without_noise_says_so_and_writes_strict_json(tiny, tmp_path, capsys):
    """--noise-multiplier 0: no privacy. final.noise says "none", no seeded-noise note is printed, and the
    infinite epsilon is null in metrics.json and in the adapter's metadata (strict JSON: no Infinity)."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(tiny_args(tiny, out, "--noise-multiplier", "0", "--rounds", "1"), capsys)
    assert code == 0, err
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["noise"].startswith("none") and final["epsilon"] is None
    assert "note: the DP noise was seeded" not in stdout
    meta = json.loads((out / "adapter" / "fedlora_fast.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert meta["user"]["epsilon"] is None and meta["user"]["noise"] == final["noise"]


def test_a_run_whose_only_noise_is_the_servers_says_it_was_seeded(tiny, tmp_path, capsys):
    """--noise-multiplier 0 with central_dp: the server's user-level noise is the run's only DP noise, and it
    is drawn from the run's seed. final.noise said "none" and no note was printed; it now begins "seeded",
    names the server's noise, and the final line gives the server's epsilon."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(tiny_args(tiny, out, "--noise-multiplier", "0", "--rounds", "1", "--aggregator",
                                          "central_dp", "--server-noise-multiplier", "0.5"), capsys)  # fmt: skip
    assert code == 0, err
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["noise"].startswith("seeded from the run's seed") and "only the server's user-level noise" in final["noise"]
    assert "note: the DP noise was seeded" in stdout
    assert f"server (user-level) epsilon {final['server_privacy']['epsilon']:.3f}" in stdout


def test_train_writes_metrics_curves_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(tiny_args(tiny, out, "--epsilon", "6", "--delta", "1e-4"), capsys)
    assert code == 0, err
    assert "round 1/2 | acc" in stdout and "final: test accuracy" in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["epsilon"] == 6.0 and len(m["rounds"]) == 2
    for key in ("accuracy", "loss", "epsilon", "bytes_up", "bytes_down", "seconds"):
        assert key in m["rounds"][0]
    final = m["final"]
    assert final["delta"] == 1e-4 and final["epsilon"] <= 6.0 + 1e-9
    assert {"noise_multiplier", "sample_rate", "steps", "epsilon"} <= set(final["clients"][0])
    # seeded noise (the default: reproducible) is said next to epsilon, in metrics.json, the adapter and the output
    assert final["noise"].startswith("seeded from the run's seed") and "note: the DP noise was seeded" in stdout
    meta = json.loads((out / "adapter" / "fedlora_fast.json").read_text())
    assert meta["user"]["noise"] == final["noise"], meta
    # which logit is which class, and the head's size to load the base with, from adapter/ alone
    assert meta["user"]["label_names"] == m["data"]["label_names"] == ["ham", "spam"], meta
    assert meta["user"]["num_labels"] == 2, meta
    assert (out / "curves.png").stat().st_size > 0
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # a second run into the same directory must not silently overwrite it
    code, _, err = run_cli(tiny_args(tiny, out), capsys)
    assert code == EXIT_USAGE and "--resume" in err
    code, _, err = run_cli(tiny_args(tiny, out, "--resume", "--overwrite"), capsys)
    assert code == EXIT_USAGE and "resume, overwrite: pass one" in err
    # resuming a finished run rewrites the same final metrics
    code, _, err = run_cli(tiny_args(tiny, out, "--epsilon", "6", "--delta", "1e-4", "--resume"), capsys)
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["final"]["accuracy"] == final["accuracy"] and again["final"]["epsilon"] == final["epsilon"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_is_a_usage_error(tiny, tmp_path, capsys):
    code, _, err = run_cli(tiny_args(tiny, tmp_path / "o", "--device", "cuda"), capsys)
    assert code == EXIT_USAGE and "device: 'cuda', but this machine's PyTorch sees no CUDA device" in err
    assert "Traceback" not in err


def test_module_entry_point_help():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "fedlora_fast", "train", "--help"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0
    for flag in ("--epsilon", "--noise-multiplier", "--resume", "--method", "--aggregator", "--label-column"):
        assert flag in res.stdout
    text = " ".join(res.stdout.split())  # argparse wraps the help
    assert "TSV is read WITHOUT quoting" in text and "org/name" in text, text
    # defaults as typed: none printed twice or as None, lists comma-joined
    assert "(default: None)" not in text and "(default: query,value)" in text and "['" not in text, text
    assert text.count("(default: the packaged all-MiniLM-L6-v2)") == 1


def test_an_interrupt_names_resume_only_where_a_round_was_checkpointed(tmp_path, capsys, monkeypatch):
    """Ctrl-C: --resume is the hint only if a checkpoint exists (before the first round completes, --resume
    would fail with "no checkpoint")."""
    import fedlora_fast.federated.simulation as sim

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run_simulation", interrupted)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress"], capsys)
    assert code == 130 and "interrupted before a round completed (no checkpoint): rerun without --resume" in err
    out.mkdir(exist_ok=True)  # (the writability check made it)
    (out / "checkpoint.safetensors").write_bytes(b"")
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress"], capsys)
    assert code == 130 and "rerun with --resume to continue" in err


def test_an_interrupt_of_an_overwrite_before_its_first_checkpoint_leaves_the_previous_run(tmp_path, capsys,
                                                                                          monkeypatch):
    """--overwrite removes the previous run only once the new one is built: interrupted before that run's first
    checkpoint, the checkpoint there is the previous run's (--resume would continue that one, not this); after
    it, the new run's own (--resume continues it)."""
    import fedlora_fast.federated.simulation as sim

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"previous run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run_simulation", interrupted)
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress", "--overwrite"], capsys)
    assert code == 130 and "--resume" not in err, err
    assert f"interrupted before this run checkpointed a round; the previous run in {out} is untouched: rerun with " \
           "--overwrite to replace it" in err, err
    assert (out / "checkpoint.safetensors").read_bytes() == b"previous run"

    def interrupted_after_a_round(*args, **kwargs):  # a new checkpoint, written aside and renamed over the old
        (out / "new").write_bytes(b"this run, round 1")
        os.replace(out / "new", out / "checkpoint.safetensors")
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run_simulation", interrupted_after_a_round)
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress", "--overwrite"], capsys)
    assert code == 130 and "rerun with --resume to continue" in err, err
    # an --out holding a previous run's outputs but no checkpoint: neither --resume nor a plain rerun would work
    (out / "checkpoint.safetensors").unlink()
    (out / "metrics.json").write_text("{}")
    monkeypatch.setattr(sim, "run_simulation", interrupted)
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress", "--overwrite"], capsys)
    assert code == 130 and "interrupted before this run checkpointed a round: rerun with --overwrite" in err, err


def test_a_frozen_new_head_is_saved_with_the_adapter(tiny, tmp_path, capsys):
    """--trainable-modules '': the classifier head the base checkpoint lacks (drawn from the seed) stays frozen,
    and the adapter must still carry it: without it every peft load drew its own head (another model than the
    one evaluated)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

    headless = tmp_path / "headless"  # a base checkpoint without the task's head, as the packaged MiniLM
    BertModel.from_pretrained(tiny["model"]).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(headless)
    out = tmp_path / "frozen_head"
    code, _, err = run_cli(tiny_args(tiny, out, "--rounds", "1", "--trainable-modules", "", "--model", str(headless)),
                           capsys)
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"], config
    ids = torch.tensor([[2, 7, 11, 5, 3]])
    logits = []
    for seed in (0, 1):  # torch's RNG at load time must not matter
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(headless, num_labels=2)
        logits.append(PeftModel.from_pretrained(base, str(out / "adapter")).eval()(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
