"""bench/paper.py (the paper's LoRA vs FFA-LoRA experiment) at toy size, so it cannot rot.

A random 1-layer BERT (hidden 16) with the packaged MiniLM tokenizer on 400 rows of the bundled SMS data,
one seed, two epsilons, two lrs: the numbers mean nothing; checked are the protocol (lr chosen on validation
only, validation and test disjoint, every client within its epsilon), the bytes, and the output files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedlora_fast.data import BUNDLED_SMS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import paper  # noqa: E402

from conftest import tiny_bert_run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bert_run(tmp_path_factory.mktemp("paper_tiny"), 800)


def toy_args(tiny, out, *extra):
    return ["--model", tiny["model"], "--data", tiny["data"], "--seeds", "0", "--epsilons", "inf", "3",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "6", "--max-length", "16",
            "--lrs", "1e-2", "5e-2", "--max-test", "60", "--max-val", "40", "--out", str(out), "--name", "paper_toy",
            "--quiet", *extra]


def test_paper_smoke(tiny, tmp_path):
    res = paper.main(toy_args(tiny, tmp_path))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"paper_toy.json", "paper_toy.md", "paper_toy.png"} <= files, files
    saved = json.loads((tmp_path / "paper_toy.json").read_text())
    assert saved["table"] == res["table"] and saved["wall_seconds"] > 0

    # every (method, eps, lr) ran once on the single seed; the chosen lr is the best on validation
    runs = saved["runs"]
    assert sorted((r["method"], str(r["epsilon"]), r["lr"]) for r in runs) == sorted(
        (m, e, lr) for m in ("lora", "ffa") for e in ("inf", "3.0") for lr in (1e-2, 5e-2))
    for m in ("lora", "ffa"):
        for e in ("inf", "3.0"):
            cands = [r for r in runs if r["method"] == m and str(r["epsilon"]) == e]
            best = max(cands, key=lambda r: (r["val"]["accuracy"], -r["val"]["loss"]))
            assert saved["selected"][m][e]["lr"] == best["lr"]
            row = next(t for t in res["table"] if t["method"] == m and str(t["epsilon"]) == e)
            assert row["test_accuracy_mean"] == best["test"]["accuracy"] and row["test_accuracy_std"] == 0.0

    for r in runs:
        assert r["config"]["method"] == r["method"] and r["config"]["lr"] == r["lr"]
        assert r["config"]["label_proportions"] == [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
        assert 0.0 <= r["test"]["accuracy"] <= 1.0 and 0.0 <= r["test"]["balanced_accuracy"] <= 1.0
        sigmas = [c["noise_multiplier"] for c in r["clients"]]
        if r["epsilon"] == "inf":
            assert sigmas == [0.0, 0.0, 0.0] and r["config"]["epsilon"] is None
        else:
            assert min(sigmas) > 0 and 0 < r["epsilon_spent"] <= 3.0 * (1 + 1e-6), r["epsilon_spent"]
        assert r["clients"][0]["steps"] == 2 * 2

    # FFA-LoRA uploads B (+ head) only: LoRA's A and B are more than that, by A's size
    up = {t["method"]: t["payload_up_per_round"] for t in res["table"]}
    assert up["lora"] > up["ffa"] > 0

    md = (tmp_path / "paper_toy.md").read_text()
    assert "| LoRA |" in md and "| FFA-LoRA |" in md and "ε = ∞" in md and "ε = 3" in md


def test_validation_is_carved_from_train_and_disjoint_from_test(tiny, tmp_path):
    # Row numbers make every text unique (the SMS data has duplicate messages), so sets tell rows apart.
    lines = BUNDLED_SMS.read_text(encoding="utf-8").splitlines()[:401]
    rows = [lines[0]] + [f"{lab}\t{i} {txt}" for i, (lab, txt) in enumerate(l.split("\t", 1) for l in lines[1:])]
    (tmp_path / "u.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = paper.build_parser().parse_args(toy_args(tiny, tmp_path, "--data", str(tmp_path / "u.tsv")))
    d = paper.prepare_data(args)
    tr, va, te = (set(d[k].texts) for k in ("train", "val", "test"))
    assert len(va) == len(d["val"]) == 40 and len(te) == len(d["test"]) == 60
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert min(d["val"].class_counts()) > 0 and min(d["test"].class_counts()) > 0


@pytest.mark.parametrize("extra, needle", [
    (["--epsilons", "0"], "--epsilons"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--tune-seeds", "2"], "--tune-seeds"),
])
def test_bad_arguments_name_the_flag(tiny, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit):
        paper.main(toy_args(tiny, tmp_path, *extra))
    assert needle in capsys.readouterr().err


def test_merge_tabulates_per_method_parts(tiny, tmp_path):
    """Two processes (one per method) merged give the table of the whole grid; a missing run is named."""
    a = paper.main(toy_args(tiny, tmp_path, "--methods", "lora", "--name", "part_lora", "--lrs", "1e-2",
                            "--epsilons", "inf"))
    b = paper.main(toy_args(tiny, tmp_path, "--methods", "ffa", "--name", "part_ffa", "--lrs", "1e-2",
                            "--epsilons", "inf"))
    m = paper.main(toy_args(tiny, tmp_path, "--lrs", "1e-2", "--epsilons", "inf", "--name", "merged", "--merge",
                            str(tmp_path / "part_lora.json"), str(tmp_path / "part_ffa.json")))
    assert [t["method"] for t in m["table"]] == ["lora", "ffa"]
    assert m["table"][0]["test_accuracy_mean"] == a["table"][0]["test_accuracy_mean"]
    assert m["table"][1]["test_accuracy_mean"] == b["table"][0]["test_accuracy_mean"]
    assert m["wall_seconds"] > 0 and (tmp_path / "merged.md").exists()
    with pytest.raises(SystemExit, match="no run for"):
        paper.main(toy_args(tiny, tmp_path, "--lrs", "1e-2", "--epsilons", "inf", "--seeds", "0", "1",
                            "--name", "merged2", "--merge", str(tmp_path / "part_lora.json"), str(tmp_path / "part_ffa.json")))


def test_resume_skips_done_runs_and_refuses_other_settings(tiny, tmp_path):
    base = ["--methods", "ffa", "--lrs", "1e-2", "--epsilons", "inf", "--name", "res"]
    first = paper.main(toy_args(tiny, tmp_path, *base))
    again = paper.main(toy_args(tiny, tmp_path, *base, "--resume"))
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in first["runs"]]  # nothing re-ran
    assert again["table"] == first["table"]
    with pytest.raises(SystemExit, match="other settings"):
        paper.main(toy_args(tiny, tmp_path, *base, "--resume", "--rounds", "3"))
