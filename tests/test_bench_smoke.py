"""The benchmarks run at toy size so they cannot rot: bench/step.py, its harness, the other bench scripts.

Timings here mean nothing (toy shapes, one round); what is checked is that every variant builds, trains
what it should, and that the results file, plot and memory probe have the promised form.
"""

import contextlib
import gc
import json
import math
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch

from fedlora_fast.testing import spy_kept_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import harness  # noqa: E402
import step  # noqa: E402


def _run(args, env=None, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
    return proc


def test_step_smoke_all_variants(tmp_path, capsys):
    """Every variant runs one step of a tiny BERT; the JSON row and the plot have the documented form."""
    out, png = tmp_path / "step.json", tmp_path / "step.png"
    step.main(["--smoke", "--no-mem", "--json", str(out), "--plot", str(png)])  # in-process: no import cost
    printed = capsys.readouterr().out
    row = json.loads(out.read_text())
    for key in ("device", "model", "n", "T", "r"):
        assert key in row, f"results row lacks {key!r}: {sorted(row)}"
    assert (row["model"], row["n"], row["T"], row["r"]) == ("bert-tiny", 2, 8, 8)
    assert row["variants"] == list(step.VARIANTS)
    trained = set()
    for name in step.VARIANTS:
        t = row[f"{name}_s"]
        assert math.isfinite(t) and t > 0, f"{name}: median time {t}"
        if name == "floor":
            assert row["floor_trainable"] == 0 and row["floor_updated"] is None
        else:
            # a step that trained nothing would time too fast: every trainable tensor must have moved
            assert row[f"{name}_updated"] == 1.0, f"{name}: only {row[f'{name}_updated']} of its tensors changed"
            trained.add(row[f"{name}_trainable"])
    assert len(trained) == 1, f"variants train different numbers of scalars: {trained}"
    assert "ffa_dp_flat / floor" in printed, "the ratio table was not printed"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    step.main(["--markdown", str(out)])  # the README table from the results file
    table = capsys.readouterr().out
    assert all(f"| `{name}` |" in table for name in step.VARIANTS), table


def test_step_smoke_llama_and_backend_pin(tmp_path):
    """The Llama-style model (the CUDA default, here tiny on CPU), an op backend pinned per variant, profiling."""
    out = tmp_path / "step.json"
    prof = tmp_path / "prof"
    step.main(["--smoke", "--no-mem", "--model", "llama-tiny", "--json", str(out), "--profile", str(prof),
               "--variants", "floor,ffa_dp_flat@torch,peft_opacus"])
    row = json.loads(out.read_text())
    # the profiler labels each phase of a step; the floor has no update phase
    assert set(row["floor_profile_phases_ms"]) == {"forward", "backward"}
    assert set(row["ffa_dp_flat_torch_profile_phases_ms"]) == {"forward", "backward", "update"}
    assert all(v > 0 for v in row["peft_opacus_profile_phases_ms"].values())
    assert (prof / "ffa_dp_flat_torch.txt").read_text().startswith("# ffa_dp_flat_torch")
    assert row["variants"] == ["floor", "ffa_dp_flat_torch", "peft_opacus"]
    assert row["ffa_dp_flat_torch_updated"] == 1.0 and row["peft_opacus_updated"] == 1.0
    assert "partial" not in row  # only a run cut short is marked partial
    assert row["ffa_dp_flat_torch_trainable"] == row["peft_opacus_trainable"] > 0


@pytest.mark.parametrize("spec", ["floor,opacus_magic", "peft_lora@native", "ffa_nodp@cuda_magic", "ffa_dp_flat+turbo",
                                  "peft_lora+keep", "ffa_dp_flat@triton+keep+turbo", "ffa_dp_flat@torch+keep",
                                  "ffa_dp_flat+keep+keep", "ffa_dp_flat+keep@triton", "ffa_dp_flat+keep+cache",
                                  "ffa_dp_flat@native+cache"])
def test_step_rejects_bad_variant(spec, capsys):
    with pytest.raises(SystemExit):
        step.parse_args(["--smoke", "--variants", spec])
    assert spec.split(",")[-1].split("@")[-1] in capsys.readouterr().err


def test_step_cache_option_steps_on_the_cached_weight(tmp_path, monkeypatch):
    """``+cache``: FEDLORA_FAST_KEEP_MERGED=cache around that variant only (the GEMM left to auto): its
    backwards run on the cached W', which each step's update of B makes the next forward re-merge, and the
    trained result is the plain variant's to the bit (same seeds)."""
    from fedlora_fast.kernels import ffa_linear as K

    used = spy_kept_weight(monkeypatch)
    monkeypatch.delenv(K.GEMM_ENV_VAR, raising=False)
    monkeypatch.delenv(K.KEEP_ENV_VAR, raising=False)
    out = tmp_path / "step.json"
    step.main(["--smoke", "--no-mem", "--model", "llama-tiny", "--n", "2", "--T", "4", "--json", str(out),
               "--variants", "floor,ffa_dp_flat@triton+cache"])
    row = json.loads(out.read_text())
    assert row["variants"] == ["floor", "ffa_dp_flat_triton_cache"], row["variants"]
    assert row["ffa_dp_flat_triton_cache_updated"] == 1.0
    assert ("cache", True) in used and ("cache", False) not in used, set(used)
    assert os.environ.get(K.KEEP_ENV_VAR) is None


def test_step_keep_option_sets_its_variable_around_its_own_steps(tmp_path, monkeypatch):
    """``+keep``: FEDLORA_FAST_KEEP_MERGED=1 around that variant's build and steps only (here with the merged
    GEMM pinned, so its backwards run on the forward's kept W' and the plain variant's never do), its own
    result key, and the memory child takes the option too."""
    from fedlora_fast.kernels import ffa_linear as K

    used = spy_kept_weight(monkeypatch)
    monkeypatch.setenv(K.GEMM_ENV_VAR, "merged")
    monkeypatch.delenv(K.KEEP_ENV_VAR, raising=False)
    out = tmp_path / "step.json"
    step.main(["--smoke", "--no-mem", "--model", "llama-tiny", "--n", "2", "--T", "4", "--json", str(out),
               "--variants", "floor,ffa_dp_flat@triton,ffa_dp_flat@triton+keep"])
    row = json.loads(out.read_text())
    assert row["variants"] == ["floor", "ffa_dp_flat_triton", "ffa_dp_flat_triton_keep"], row["variants"]
    assert row["ffa_dp_flat_triton_keep_updated"] == 1.0 and row["ffa_dp_flat_triton_keep_ratio_to_floor"] > 0
    assert ("1", True) in used and ("1", False) not in used and (None, True) not in used, set(used)
    assert os.environ.get(K.KEEP_ENV_VAR) is None
    assert step.variant_options("ffa_dp_flat@triton+keep") == ["keep"] and step.variant_options("floor") == []
    # the fresh-process memory probe builds and steps the variant with the option too (here in-process)
    used.clear()
    step.main(["--smoke", "--model", "llama-tiny", "--n", "2", "--T", "4", "--mem-child", "ffa_dp_flat@triton+keep"])
    assert ("1", True) in used and ("1", False) not in used, set(used)
    # the graph variant captures inside its build (eagerly off CUDA, where it checks against an eager step):
    # the option is set there too
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    model, head = step.build_model("llama-tiny", torch.device("cpu"), torch.float32)
    batch = step.make_batch(model, 3, 4, torch.device("cpu"))
    used.clear()
    fn, info = step.build_spec("ffa_dp_flat_graph+keep", model, head, batch, r=4)
    assert ("1", True) in used and ("1", False) not in used, set(used)
    # a global setting would make the plain variants keep too: refused
    monkeypatch.setenv(K.KEEP_ENV_VAR, "1")
    with pytest.raises(SystemExit, match="FEDLORA_FAST_KEEP_MERGED='1' is set in the environment"):
        step.parse_args(["--smoke", "--variants", "ffa_dp_flat,ffa_dp_flat+keep"])
    assert harness.machine_info("cpu")["fedlora_fast_env"][K.KEEP_ENV_VAR] == "1"


def test_step_graph_variant_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        step.parse_args(["--smoke", "--device", "cpu", "--variants", "floor,ffa_dp_flat_graph"])
    assert "ffa_dp_flat_graph needs --device cuda" in capsys.readouterr().err


def test_step_graph_variant_plumbing_on_cpu(capsys):
    """Off CUDA the graph variant's GraphedAccumulator runs eagerly: its check against an eager accumulate
    is exact and every trainable tensor is updated (the CLI itself refuses the variant without CUDA)."""
    model, head = step.build_model("llama-tiny", torch.device("cpu"), torch.float32)
    batch = step.make_batch(model, 3, 8, torch.device("cpu"))
    fn, info = step.build_variant("ffa_dp_flat_graph", model, head, batch, r=4, backend="torch")
    assert info["graph_check"]["max_abs_diff"] <= 1e-6 * max(info["graph_check"]["scale"], 1.0), info
    fn()
    fn()
    assert info["updated"]() == 1.0
    assert "replayed clipped sum vs eager" in capsys.readouterr().out


def test_step_graph_sizes_on_cpu(tmp_path, capsys):
    """--graph-sizes: one accumulator with every size, each size's cost and the fit (eager off CUDA)."""
    out = tmp_path / "step.json"
    step.main(["--smoke", "--no-mem", "--model", "llama-tiny", "--n", "4", "--variants", "floor",
               "--graph-sizes", "4,1,2", "--json", str(out)])  # fmt: skip
    got = json.loads(out.read_text())["graph_sizes"]
    assert got["graph"] is False and got["sizes"] == [1, 2, 4]
    assert all(v > 0 for v in got["ms_per_micro_batch"].values()), got
    assert math.isfinite(got["fixed_ms"]) and math.isfinite(got["per_row_ms"]), got
    assert "micro-batch cost by size (eager)" in capsys.readouterr().out
    for bad in ("0,1", "5", "a,b"):
        with pytest.raises(SystemExit):
            step.parse_args(["--smoke", "--n", "4", "--graph-sizes", bad])
        assert "--graph-sizes" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_step_graph_variant_replays_the_eager_clipped_sum(tmp_path):
    """The CUDA-graph step (GraphedAccumulator) on a tiny Llama: the replayed clipped sum equals an eager step's, and every
    trainable tensor is updated by the graphed steps."""
    out = tmp_path / "step.json"
    step.main(["--smoke", "--device", "cuda", "--no-mem", "--model", "llama-tiny", "--json", str(out),
               "--variants", "ffa_dp_flat,ffa_dp_flat_graph", "--graph-sizes", "2,1"])
    row = json.loads(out.read_text())
    assert row["ffa_dp_flat_graph_updated"] == 1.0
    assert row["graph_sizes"]["graph"] is True and row["graph_sizes"]["sizes"] == [1, 2]
    check = row["ffa_dp_flat_graph_graph_check"]
    assert check["max_abs_diff"] <= 1e-5 * max(check["scale"], 1.0), check


def test_step_keeps_the_rounds_done_when_cut(tmp_path, monkeypatch):
    """A run stopped by its time cap after a round (gpu_session.sh's steps) has already written that round:
    a partial row with each variant's times so far and the paired ratios, marked as partial."""
    out = tmp_path / "step.json"
    real = harness.time_interleaved

    class Cut(Exception):
        pass

    def cut_after_first_round(fns, *, on_round=None, **kw):
        def then_stop(k, this_round):
            on_round(k, this_round)
            raise Cut  # what the cap's SIGTERM amounts to

        return real(fns, on_round=then_stop, **kw)

    monkeypatch.setattr(harness, "time_interleaved", cut_after_first_round)
    with pytest.raises(Cut):
        step.main(["--smoke", "--no-mem", "--model", "llama-tiny", "--json", str(out),
                   "--variants", "floor,ffa_dp_flat@torch"])
    row = json.loads(out.read_text())
    assert row["partial"] == {"rounds_done": 1, "rounds": 1}, row.get("partial")
    assert row["variants"] == ["floor", "ffa_dp_flat_torch"] and row["machine"]["date"].endswith("Z")
    for key in row["variants"]:
        assert len(row[f"{key}_times_s"]) == 1 and row[f"{key}_s"] > 0, row
    assert row["ffa_dp_flat_torch_ratio_to_floor"] > 0 and row["ffa_dp_flat_torch_trainable"] > 0


def test_step_memory_child():
    """The per-variant fresh-process memory probe prints one JSON line with a plausible peak."""
    proc = _run(["bench/step.py", "--smoke", "--mem-child", "ffa_dp_flat"], env=None)
    mem = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert mem["mem_mb"] > 50, mem  # a process with torch loaded is far above 50 MiB
    assert 0 <= mem["mem_step_mb"] <= mem["mem_mb"], mem
    assert "fresh process" in mem["mem_method"]


def test_measure_peak_memory_sees_a_transient_allocation():
    """A 128 MiB tensor that lives only inside the step must show up in the step's peak."""

    def fn():
        t = torch.ones(32 * 2**20)  # 128 MiB float32
        return float(t[0])

    mem = harness.measure_peak_memory(fn, device="cpu", calls=1)
    if "NOT reset" in mem["mem_method"]:
        pytest.skip(f"this kernel does not let the RSS peak be reset: {mem['mem_method']}")
    assert mem["mem_step_mb"] >= 120, mem


def test_capture_cuda_graph_warms_up_then_captures_once():
    """harness.capture_cuda_graph under the torch.cuda stand-ins: ``warmup`` eager runs, then one captured."""
    from fedlora_fast.testing import StandInCudaGraphs

    calls = []
    with StandInCudaGraphs() as stand_ins:
        harness.capture_cuda_graph(lambda: calls.append(stand_ins.capturing), warmup=3)
        assert calls == [False, False, False, True] and stand_ins.captures == 1
        harness.capture_cuda_graph(lambda: calls.append(stand_ins.capturing), warmup=0)
        assert calls[4:] == [True] and stand_ins.captures == 2


def test_time_interleaved_rotates_and_counts():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.time_interleaved(fns, device="cpu", reps=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # order rotated each round
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="reps"):
        harness.time_interleaved(fns, device="cpu", reps=0)
    with pytest.raises(ValueError, match="clock"):
        harness.time_interleaved(fns, device="cpu", clock="sundial")


def test_cpu_clock_ignores_sleeping():
    """clock='cpu' counts CPU work, not time spent off the CPU (what other jobs on a shared box cause)."""
    import time

    times = harness.time_interleaved({"nap": lambda: time.sleep(0.2)}, device="cpu", reps=1, warmup=0, clock="cpu")
    assert times["nap"][0] < 0.1, times
    wall = harness.time_interleaved({"nap": lambda: time.sleep(0.2)}, device="cpu", reps=1, warmup=0)
    assert wall["nap"][0] >= 0.2, wall


def test_paired_ratio():
    # load doubles in round 2: the per-round ratio stays 2, the ratio of medians would not
    assert harness.paired_ratio([2.0, 4.0, 2.2], [1.0, 2.0, 1.1]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equally long"):
        harness.paired_ratio([1.0], [1.0, 2.0])


def test_write_json_is_atomic_and_complete(tmp_path):
    path = tmp_path / "sub" / "r.json"
    harness.write_json(str(path), {"a": 1, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind
    info = harness.machine_info("cpu")
    assert info["versions"]["torch"] == torch.__version__ and info["date"].endswith("Z")


def test_bench_ffa_linear_smoke():
    """The op microbenchmarks (owned by the native-backend engineer) at toy size."""
    path = os.path.join(BENCH, "bench_ffa_linear.py")
    if not os.path.exists(path):
        pytest.skip("bench/bench_ffa_linear.py does not exist yet")
    _run(["-m", "pytest", path, "-q", "-p", "no:cacheprovider", "--benchmark-disable"],
         env={"FEDLORA_FAST_BENCH_SMOKE": "1"})


def test_ghost_bench_smoke(tmp_path):
    """bench/ghost.py at toy size: its check passes, both cases' rows hold time and memory ratios."""
    out = tmp_path / "ghost.json"
    proc = _run(["bench/ghost.py", "--shape", "3", "4", "37", "5", "--reps", "1", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["lm_head", "embedding"]
    for r in rows:
        assert r["check_rel_err"] < 1e-4 and r["time_ratio_ghost_to_dense"] > 0 and r["mem_ratio_ghost_to_dense"] >= 0
    assert "ghost/dense time" in proc.stdout


def test_chacha20_bench_smoke(tmp_path):
    """bench/chacha20.py at toy size: its check passes and the row holds every variant's time and ratios."""
    out = tmp_path / "chacha20.json"
    proc = _run(["bench/chacha20.py", "--n", "20001", "--reps", "1", "--out", str(out)])
    (row,) = json.load(open(out))["rows"]
    assert row["n"] == 20001 and row["check_max_abs_err"] < 1e-12 and row["ratio_chacha20_to_philox"] > 0
    assert all(row[f"{v}_s"] > 0 for v in ("chacha20", "urandom", "philox")), row
    assert "chacha20/philox" in proc.stdout


def test_gpu_layer_smoke():
    """The Triton layer benchmark (owned by the Triton engineer) in its smoke mode, where it has one."""
    path = os.path.join(BENCH, "gpu_layer.py")
    if not os.path.exists(path):
        pytest.skip("bench/gpu_layer.py does not exist yet")
    with open(path, encoding="utf-8") as f:
        if "--smoke" not in f.read():
            pytest.skip("bench/gpu_layer.py has no --smoke mode yet")
    _run([path, "--smoke"])


def _layer_row_with_peer(tmp_path, monkeypatch, make_peer) -> tuple[int, dict]:
    """``gpu_layer.main``'s exit code and its one smoke row (floor, ours, the peer), with ``make_peer`` in place of
    ``make_peft_opacus``."""
    import gpu_layer

    monkeypatch.setattr(gpu_layer, "make_peft_opacus", make_peer)
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    out = tmp_path / "layer.json"
    code = gpu_layer.main(["--smoke", "--json", str(out), "--variants", "floor,ffa_flat[auto],peft_opacus"])
    return code, json.loads(out.read_text())["rows"][0]


def test_gpu_layer_a_variant_that_cannot_be_built_fails_the_row(tmp_path, monkeypatch):
    """peft/opacus missing on the machine (or a CUDA graph that cannot be captured) is a failure of the row,
    not a quiet omission: the JSON would otherwise read correct=True without the peer's ratio."""

    def missing(*args):
        raise ImportError("No module named 'opacus'")

    code, row = _layer_row_with_peer(tmp_path, monkeypatch, missing)
    assert code == 1 and row["correct"] is False and "opacus" in row["failed"]["peft_opacus"], row.get("failed")
    assert set(row["times_ms"]) == {"floor", "ffa_flat[auto]"} and row["ratio_to_floor"] > 0

    def unsupported(*args):  # any other failure to build it (a torch/opacus mismatch) had ended the whole bench
        raise NotImplementedError("opacus: layer type not supported")

    code, row = _layer_row_with_peer(tmp_path, monkeypatch, unsupported)
    assert code == 1 and row["correct"] is False, row.get("failed")
    assert row["failed"]["peft_opacus"] == "NotImplementedError: opacus: layer type not supported"
    assert set(row["times_ms"]) == {"floor", "ffa_flat[auto]"} and row["ratio_to_floor"] > 0


def test_gpu_layer_a_failing_variant_costs_only_its_own_numbers(tmp_path, monkeypatch):
    """A variant that raises is reported (row["failed"], correct=False, exit 1); the others are still timed."""
    import gpu_layer

    def broken(base, x, g, r, alpha, train_A):
        def step():
            raise RuntimeError("boom")

        return gpu_layer.Variant("peft_opacus", base, x, g, step)

    code, row = _layer_row_with_peer(tmp_path, monkeypatch, broken)
    assert code == 1 and row["correct"] is False and "boom" in row["failed"]["peft_opacus"], row.get("failed")
    assert set(row["times_ms"]) == {"floor", "ffa_flat[auto]"} and row["ratio_to_floor"] > 0
    assert row["floor_drift"] == row["times_ms"]["floor"]["full_ms_again"] / row["times_ms"]["floor"]["full_ms"]
    rounds = row["interleaved_full_ms"]  # --smoke: one round of the variants that ran
    assert set(rounds) == {"floor", "ffa_flat[auto]"} and all(len(v) == 1 for v in rounds.values()), rounds
    assert row["ratio_to_floor_interleaved"] == rounds["ffa_flat[auto]"][0] / rounds["floor"][0]
    # the headline is the interleaved ratio; the one-after-another timing is kept beside it
    sequential = row["times_ms"]["ffa_flat[auto]"]["full_ms"] / row["times_ms"]["floor"]["full_ms"]
    assert row["ratio_to_floor"] == row["ratio_to_floor_interleaved"] and row["ratio_to_floor_sequential"] == sequential
    assert "ratio_to_peft_opacus_interleaved" not in row  # peft_opacus failed: no ratio to it
    # auto mixes GEMM paths per op: it is the headline, never the "best pinned" one
    assert row["best_ffa"] is None and "ratio_to_floor_best_pinned" not in row, row
    assert [c["gemm"] for c in row["checks"]] == ["triton"]  # what auto runs off CUDA


def test_gpu_layer_launch_variants_are_auto_with_that_launch_mode(tmp_path, monkeypatch):
    """ffa_flat[direct] / ffa_flat[jit]: the default GEMM choice with FEDLORA_FAST_LAUNCH=direct / jit set around
    their own calls only (the others launch in the default mode), and their ratios to the floor in the row,
    interleaved where rounds ran."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    seen = []
    real_run = K._run
    monkeypatch.setattr(K, "_run", lambda *a, **kw: (seen.append(os.environ.get(K.LAUNCH_ENV_VAR)),
                                                     real_run(*a, **kw))[1])
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    monkeypatch.delenv(K.LAUNCH_ENV_VAR, raising=False)
    out = tmp_path / "layer.json"
    code = gpu_layer.main(["--smoke", "--json", str(out), "--variants",
                           "floor,ffa_flat[auto],ffa_flat[direct],ffa_flat[jit]"])
    row = json.loads(out.read_text())["rows"][0]
    assert code == 0 and row["correct"] and row["ours"] == "ffa_flat[auto]", row
    assert {"direct", "jit", None} <= set(seen) and os.environ.get(K.LAUNCH_ENV_VAR) is None, set(seen)
    rounds = row["interleaved_full_ms"]
    for mode in ("direct", "jit"):
        assert row[f"ratio_to_floor_{mode}"] == rounds[f"ffa_flat[{mode}]"][0] / rounds["floor"][0]
        assert row[f"ratio_to_floor_{mode}_sequential"] == (row["times_ms"][f"ffa_flat[{mode}]"]["full_ms"]
                                                            / row["times_ms"]["floor"]["full_ms"])
        assert gpu_layer.gemms_to_check(["floor", f"ffa_flat[{mode}]"], "cuda") == list(K.AUTO_CANDIDATES)
    assert row["best_ffa"] is None  # not a pinned GEMM path


def test_gpu_layer_keep_variant_is_auto_with_the_kept_weight(tmp_path, monkeypatch):
    """ffa_flat[keep]: the GEMM choice of ffa_flat[auto] with FEDLORA_FAST_KEEP_MERGED=1 set around its own calls
    only, its ratio to the floor in the row (interleaved where rounds ran), and the paths auto may take checked.
    With the merged GEMM pinned (auto is the Triton GEMM off CUDA), its backward runs on the kept W' and
    ffa_flat[auto]'s never does."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    seen, used = [], spy_kept_weight(monkeypatch)
    real_run = K._run
    monkeypatch.setattr(K, "_run", lambda *a, **kw: (seen.append(os.environ.get(K.KEEP_ENV_VAR)),
                                                     real_run(*a, **kw))[1])
    real_check = gpu_layer.check_ops

    def check_then_forget(*args, **kw):  # the float64 checks run first and set the variable themselves (their
        got = real_check(*args, **kw)  # lookups are asserted below): what follows is the timed variants' alone
        seen.clear()
        used.clear()
        return got

    monkeypatch.setattr(gpu_layer, "check_ops", check_then_forget)
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    monkeypatch.setenv(K.GEMM_ENV_VAR, "merged")
    monkeypatch.delenv(K.KEEP_ENV_VAR, raising=False)
    out = tmp_path / "layer.json"
    code = gpu_layer.main(["--smoke", "--json", str(out), "--variants", "floor,ffa_flat[merged],ffa_flat[keep]"])
    row = json.loads(out.read_text())["rows"][0]
    assert code == 0 and row["correct"], row
    assert {"1", None} <= set(seen) and os.environ.get(K.KEEP_ENV_VAR) is None, set(seen)
    assert ("1", True) in used and ("1", False) not in used and (None, True) not in used, set(used)
    rounds = row["interleaved_full_ms"]
    assert row["ratio_to_floor_keep"] == rounds["ffa_flat[keep]"][0] / rounds["floor"][0]
    assert row["ratio_to_floor_keep_sequential"] == (row["times_ms"]["ffa_flat[keep]"]["full_ms"]
                                                     / row["times_ms"]["floor"]["full_ms"])
    assert gpu_layer.gemms_to_check(["floor", "ffa_flat[keep]"], "cuda") == [*K.AUTO_CANDIDATES, "merged+keep"]
    # the float64 check ran the merged backward on the kept W' too (the spy above saw only kept ones with "1")
    assert [(c["gemm"], c["ok"]) for c in row["checks"]] == [("merged", True), ("triton", True), ("merged+keep", True)]
    used.clear()  # the check of the kept path, alone: its backwards run on the kept W'
    (check,) = real_check(2, 5, 72, 80, 4, torch.float32, "cpu", [gpu_layer.MERGED_KEPT])
    assert check["ok"] and set(used) == {("1", True)}, (check, used)
    monkeypatch.setenv(K.KEEP_ENV_VAR, "1")  # a global setting would make the other variants keep too: refused
    with pytest.raises(SystemExit, match="FEDLORA_FAST_KEEP_MERGED='1' is set in the environment"):
        gpu_layer.main(["--smoke", "--json", str(out), "--variants", "floor,ffa_flat[keep]"])


def test_gpu_layer_graph_keep_captures_with_the_kept_weight(monkeypatch):
    """ffa_flat[graph_keep] is captured with FEDLORA_FAST_KEEP_MERGED=1 (the replays run what the capture ran),
    ffa_flat[graph] with the default; both are auto-like for the checks and get their ratio keys."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    seen = []
    monkeypatch.setattr(gpu_layer, "_graphed", lambda v: (v.step(), v)[1])  # the capture's warm-up call
    monkeypatch.delenv(K.KEEP_ENV_VAR, raising=False)
    for graph, want in (("graph", None), ("graph_keep", "1"), ("graph_cache", "cache")):
        v = SimpleNamespace(step=lambda: seen.append(os.environ.get(K.KEEP_ENV_VAR)), forward=lambda: None)
        gpu_layer.graph_variant(v, graph)
        assert seen.pop() == want, graph
    assert os.environ.get(K.KEEP_ENV_VAR) is None
    assert gpu_layer.gemms_to_check(["floor", "ffa_flat[graph_keep]"], "cuda") == [*K.AUTO_CANDIDATES, "merged+keep"]
    assert "ratio_to_floor_graph_keep" in gpu_layer.DEFINITIONS
    assert gpu_layer.gemms_to_check(["ffa_flat[graph_cache]"], "cuda") == [*K.AUTO_CANDIDATES, "merged+cache"]
    assert "ratio_to_floor_graph_cache" in gpu_layer.DEFINITIONS


def test_gpu_layer_cache_variant_times_the_cached_weight(tmp_path, monkeypatch):
    """ffa_flat[cache]: FEDLORA_FAST_KEEP_MERGED=cache around its own calls only. Its layer's W' is merged in
    full once (the warm-up) and only checked in every timed step after (B does not change between them),
    its backwards run on it; the row has its ratio, the full merge's time (merge_ms) and the float64 check of
    the cached path (the forward made, then checked)."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    merges, used = [], spy_kept_weight(monkeypatch)
    real_run = K._run

    def run(fn, *a, **kw):
        if fn is K._merge_kernel:
            merges.append((os.environ.get(K.KEEP_ENV_VAR), kw["CHECK"]))
        return real_run(fn, *a, **kw)

    monkeypatch.setattr(K, "_run", run)
    real_check, real_time = gpu_layer.check_ops, gpu_layer.time_merge

    def check_then_forget(*args, **kw):  # the float64 checks' merges and lookups: asserted below on their own
        got = real_check(*args, **kw)
        merges.clear()
        used.clear()
        return got

    def time_then_forget(*args, **kw):  # merge_ms's full merges (outside any variant: no setting)
        before = len(merges)
        got = real_time(*args, **kw)
        assert len(merges) > before and set(merges[before:]) == {(None, False)}, merges[before:]
        del merges[before:]
        return got

    monkeypatch.setattr(gpu_layer, "check_ops", check_then_forget)
    monkeypatch.setattr(gpu_layer, "time_merge", time_then_forget)
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    monkeypatch.delenv(K.GEMM_ENV_VAR, raising=False)
    monkeypatch.delenv(K.KEEP_ENV_VAR, raising=False)
    out = tmp_path / "layer.json"
    code = gpu_layer.main(["--smoke", "--json", str(out), "--variants", "floor,ffa_flat[auto],ffa_flat[cache]"])
    row = json.loads(out.read_text())["rows"][0]
    assert code == 0 and row["correct"], row
    assert merges[0] == ("cache", False) and merges[1:] and set(merges[1:]) == {("cache", True)}, merges
    assert ("cache", True) in used and ("cache", False) not in used and (None, True) not in used, set(used)
    gc.collect()  # (the variants hold their layers in reference cycles: closures)
    assert os.environ.get(K.KEEP_ENV_VAR) is None and not K._MERGED_CACHE  # freed with the variant's layer
    rounds = row["interleaved_full_ms"]
    assert row["ratio_to_floor_cache"] == rounds["ffa_flat[cache]"][0] / rounds["floor"][0]
    assert row["merge_ms"] > 0
    assert [(c["gemm"], c["ok"]) for c in row["checks"]] == [("triton", True), ("merged+cache", True)]
    assert "y[re-merged]" in row["checks"][1]["details"] and "y" in row["checks"][1]["details"]
    # where the cache cannot apply (a GEMM pinned globally to another path), [cache] fails instead of timing it
    monkeypatch.setenv(K.GEMM_ENV_VAR, "triton")
    code = gpu_layer.main(["--smoke", "--json", str(out), "--variants", "floor,ffa_flat[cache]"])
    row = json.loads(out.read_text())["rows"][0]
    assert code == 1 and "did not apply" in row["failed"]["ffa_flat[cache]"], row.get("failed")


def test_gpu_layer_kernel_time_ratios():
    """ratio_to_floor_kernel_time: each profiled variant's summed kernel time over the floor's; a failed profile
    (a row with no time) is left out, and without a usable floor profile there is none."""
    import gpu_layer

    def table(*us):
        return [{"kernel": f"k{i}", "us_per_step": u, "calls_per_step": 1.0} for i, u in enumerate(us)]

    failed = [{"kernel": "profile failed: RuntimeError()", "us_per_step": 0.0, "calls_per_step": 0}]
    got = gpu_layer.kernel_time_ratios({"floor": table(700.0, 700.0), "ffa_flat[auto]": table(700.0, 700.0, 140.0),
                                        "peft_opacus": table(1400.0, 1500.0, 100.0), "ffa_flat[merged]": failed})
    assert got == {"ffa_flat[auto]": 1.1, "peft_opacus": 3000.0 / 1400.0}, got
    assert gpu_layer.kernel_time_ratios({"floor": failed, "ffa_flat[auto]": table(1.0)}) == {}
    assert gpu_layer.kernel_time_ratios({"ffa_flat[auto]": table(1.0)}) == {}
    assert "ratio_to_floor_kernel_time" in gpu_layer.DEFINITIONS


def test_gpu_layer_kernel_table_sums_to_the_step(monkeypatch):
    """kernel_table keeps the largest kernels and one row summing the rest: its us_per_step add up to the
    profiled step's kernel time (what kernel_time_ratios divides)."""
    import torch.profiler

    import gpu_layer

    events = [SimpleNamespace(key=f"k{i}", self_device_time_total=float(10 * (i + 1)), count=3) for i in range(5)]

    class FakeProfile:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    got = gpu_layer.kernel_table(lambda: None, steps=3, top=2)
    assert [k["kernel"] for k in got] == ["k4", "k3", "(3 more kernels)"], got
    assert sum(k["us_per_step"] for k in got) == sum(e.self_device_time_total for e in events) / 3
    assert got[-1]["calls_per_step"] == 3.0 and len(gpu_layer.kernel_table(lambda: None, steps=3, top=12)) == 5


def test_gpu_layer_interleave_rotates_the_order():
    import gpu_layer

    seen = []
    variants = {k: SimpleNamespace(step=lambda k=k: seen.append(k)) for k in ("a", "b", "c")}
    got = gpu_layer.interleave(variants, torch.device("cpu"), 1, 3)
    assert set(got) == {"a", "b", "c"} and all(len(v) == 3 for v in got.values())
    # bench_ms on CPU: one untimed call, then `reps` (1) timed one, per measurement
    assert seen[::2] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"] and seen[::2] == seen[1::2], seen


def test_gpu_layer_checks_every_path_auto_may_time():
    """The headline (ffa_flat[auto] / [graph]) times whichever GEMM path auto picks: on CUDA every candidate is
    checked against float64, not only the pinned variants listed."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    assert gpu_layer.gemms_to_check(["floor", "ffa_flat[auto]"], "cuda") == list(K.AUTO_CANDIDATES)
    assert gpu_layer.gemms_to_check(["ffa_flat[graph]", "ffa_flat[cublas]"], "cuda") == \
        ["cublas"] + [c for c in K.AUTO_CANDIDATES if c != "cublas"]
    assert gpu_layer.gemms_to_check(["ffa_flat[auto]"], "cpu") == ["triton"]
    assert gpu_layer.gemms_to_check(["ffa_flat[merged]", "ffa_flat[reference]"], "cuda") == ["merged"]
    assert gpu_layer.gemms_to_check(["floor", "peft_opacus"], "cuda") == ["triton"]


def test_gpu_layer_check_ops_records_a_failing_gemm_and_checks_the_others(monkeypatch):
    """check_ops builds the inputs and references once and checks every GEMM path on them; a path that raises
    is recorded ({"ok": False, "error": ...}) instead of ending the layer benchmark."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K
    from fedlora_fast.reference import MODE_PER_SAMPLE

    real = K.ffa_linear_fwd

    def fwd(*args, **kwargs):
        if os.environ.get(K.GEMM_ENV_VAR) == "cublas":
            raise RuntimeError("no cuBLAS today")
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "ffa_linear_fwd", fwd)
    checks = gpu_layer.check_ops(2, 5, 72, 80, 4, torch.bfloat16, torch.device("cpu"), ["triton", "cublas", "triton"])
    assert [c["gemm"] for c in checks] == ["triton", "cublas", "triton"]
    assert checks[1]["ok"] is False and "RuntimeError: no cuBLAS today" in checks[1]["error"], checks[1]
    assert checks[0]["ok"] and "error" not in checks[0], checks[0]
    assert checks[0]["details"] == checks[2]["details"]  # the same inputs and references for every path
    assert {"y", "u", f"dx[mode={MODE_PER_SAMPLE}]", f"nuB[mode={MODE_PER_SAMPLE}]"} <= set(checks[0]["details"])


def test_gpu_layer_sweep_correct_ignores_a_failing_cublas_baseline(tmp_path, monkeypatch):
    """cuBLAS's U pass is a reference point: its failure (e.g. a torch without mm's out_dtype) leaves the sweep
    correct; a config of ours that fails does not."""
    import gpu_layer

    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")  # main() sets it: undone after the test
    monkeypatch.setattr(gpu_layer, "OUTER_SWEEP", [(32, 32, 4, 2, 1, False)])
    monkeypatch.setattr(gpu_layer, "U_SWEEP", [(32, 32, 4, 3, False, False)])
    monkeypatch.setattr(gpu_layer, "MERGE_SWEEP", [(64, 128, 4, None)])
    monkeypatch.setattr(gpu_layer, "u_cublas_baselines", lambda *a, **k: [
        {"config": {"cublas_terms": 3}, "baseline": True, "error": "TypeError: out_dtype"}])
    out = tmp_path / "sweep.json"
    assert gpu_layer.main(["--smoke", "--sweep-only", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["correct"] is True and row["sweep_u"][-1]["baseline"], row["sweep_u"]
    monkeypatch.setattr(gpu_layer, "sweep_u", lambda *a, **k: [{"config": {"BLOCK_M": 32}, "error": "compile"}])
    assert gpu_layer.main(["--smoke", "--sweep-only", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["rows"][0]["correct"] is False
    monkeypatch.undo()  # a merge config of ours that fails to compile is a fault too
    monkeypatch.setenv("FEDLORA_FAST_BACKEND", "triton")
    monkeypatch.setattr(gpu_layer, "OUTER_SWEEP", [(32, 32, 4, 2, 1, False)])
    monkeypatch.setattr(gpu_layer, "U_SWEEP", [(32, 32, 4, 3, False, False)])
    monkeypatch.setattr(gpu_layer, "sweep_merge", lambda *a, **k: [{"config": {"BLOCK_O": 64}, "error": "compile"}])
    assert gpu_layer.main(["--smoke", "--sweep-only", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["rows"][0]["correct"] is False


def test_gpu_layer_outer_sweep_smoke(monkeypatch):
    """The one-pass kernel's config sweep (CUDA in the bench) through the interpreter at toy size: every
    config runs, with its time and its error against float64 (PROMOTE > 1 and PACK included)."""
    import gpu_layer

    monkeypatch.setattr(gpu_layer, "OUTER_SWEEP", [(32, 32, 4, 2, 1, False), (16, 32, 4, 2, 3, False),
                                                   (16, 32, 4, 2, 2, True), (16, 32, 4, 2, 1, True, True)])
    rows = gpu_layer.sweep_outer(2, 37, 40, 3, torch.bfloat16, torch.device("cpu"), reps=1)
    assert [(r["config"]["PROMOTE"], r["config"]["PACK"], r["config"]["PRESPLIT"]) for r in rows] == [
        (1, False, False), (3, False, False), (2, True, False), (1, True, True)]
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["ms_nov"] > 0 and r["rel_err_P"] < 1e-5 and r["rel_err_nu"] < 1e-5, r


def test_gpu_layer_u_sweep_smoke(monkeypatch):
    """The U pass's config sweep through the interpreter at toy size: every config runs, packed or not,
    split in the loop or once ahead (PRESPLIT_W)."""
    import gpu_layer

    monkeypatch.setattr(gpu_layer, "U_SWEEP", [(32, 32, 4, 3, False, False), (16, 32, 4, 3, True, False),
                                               (32, 32, 4, 3, False, True), (16, 32, 4, 3, True, True)])
    rows = gpu_layer.sweep_u(2, 7, 45, 5, torch.bfloat16, torch.device("cpu"), reps=1)
    assert [(r["config"]["PACK_W"], r["config"]["PRESPLIT_W"]) for r in rows] == [
        (False, False), (True, False), (False, True), (True, True), (False, False), (False, False)]
    # the last two: the shipped config with K unsplit / in halves, beside the rule's choice (14 rows: one
    # program, which splits under the interpreter); choose_blocks never ships them
    assert [(r.get("split_k"), r.get("rule")) for r in rows[-2:]] == [(1, 2), (2, 2)], rows[-2:]  # K 45 > 32
    assert [r["split_taken"] for r in rows] == [2, 2, 2, 2, 1, 2], rows  # 14 rows: one program at 16 or 32
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["rel_err_U"] < 1e-5, r
    assert gpu_layer.choose_blocks([{"sweep_u": rows[-2:]}])["narrow"] is None


def test_gpu_layer_merge_sweep_smoke(monkeypatch):
    """The merge kernel's (W' = W + s B A) config sweep through the interpreter at a shape with tails in both
    dims: every config runs, timed, within half an ulp of float64 (beyond the low-rank product's error); a
    merged weight that is wrong (here: the adapter dropped) is recorded over the bound and never chosen."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setattr(gpu_layer, "MERGE_SWEEP", [(64, 128, 4, None), (32, 64, 4, 2), (16, 32, 4, None)])
    for dtype in (torch.bfloat16, torch.float16):
        rows = gpu_layer.sweep_merge(70, 45, 5, dtype, torch.device("cpu"), reps=1)
        assert [r["config"] for r in rows] == [dict(BLOCK_O=64, BLOCK_I=128, num_warps=4),
                                               dict(BLOCK_O=32, BLOCK_I=64, num_warps=4, num_stages=2),
                                               dict(BLOCK_O=16, BLOCK_I=32, num_warps=4)]
        for r in rows:
            assert "error" not in r, r
            assert r["ms"] > 0 and r["w_gbps"] > 0 and r["ab_bytes_per_w_byte"] > 0, r
            assert math.isfinite(r["ulp_err_W"]) and r["ulp_err_W"] <= gpu_layer.MERGE_ULP_BOUND, r
            assert 0 < r["rel_err_W"] < 1e-2, r
    assert gpu_layer.choose_blocks([{"sweep_merge": rows}])["merge"] is not None
    # the sweep really launches the config it names: a tile the kernel cannot take fails as that config's error
    monkeypatch.setattr(gpu_layer, "MERGE_SWEEP", [(64, 128, 4, None), (48, 32, 4, None)])  # 48: no power of 2
    rows = gpu_layer.sweep_merge(70, 45, 5, torch.bfloat16, torch.device("cpu"), reps=1)
    assert "error" not in rows[0] and "error" in rows[1], rows
    monkeypatch.setattr(K, "_merged_weight", lambda w, A, B, s: w.clone())  # the adapter lost: far off
    rows = gpu_layer.sweep_merge(70, 45, 5, torch.bfloat16, torch.device("cpu"), reps=1)
    assert all(r["ulp_err_W"] > 10 * gpu_layer.MERGE_ULP_BOUND for r in rows), rows
    assert gpu_layer.choose_blocks([{"sweep_merge": rows}])["merge"] is None


def test_gpu_layer_sweeps_fail_a_config_that_leaves_outputs_unwritten(monkeypatch):
    """A config that writes only part of its output must fail its accuracy check even where the allocator
    hands back the previous config's buffer, still holding correct values (CUDA's caching allocator does):
    the accuracy call's outputs start as NaN."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    real = K._merged_weight

    def half_written(w, A, B, s):  # W' in a buffer from the kernels' allocator, only its first half written
        exact = real(w, A, B, s)
        buf = K._alloc(exact.shape, exact.dtype, exact.device)
        if not buf.isnan().any():
            buf.copy_(exact)  # what a reused buffer would hold after a correct config of the same shape
        half = exact.shape[1] // 2
        buf[:, :half] = exact[:, :half]
        return buf

    monkeypatch.setattr(K, "_merged_weight", half_written)
    monkeypatch.setattr(gpu_layer, "MERGE_SWEEP", [(64, 128, 4, None)])
    rows = gpu_layer.sweep_merge(70, 45, 5, torch.bfloat16, torch.device("cpu"), reps=1)
    assert not rows[0]["ulp_err_W"] <= gpu_layer.MERGE_ULP_BOUND, rows  # NaN: never within the bound
    assert gpu_layer.choose_blocks([{"sweep_merge": rows}])["merge"] is None


def test_gpu_layer_a_config_too_big_for_the_gpu_does_not_fit_and_is_no_fault(monkeypatch):
    """A sweep config this GPU lacks the shared memory for (Triton's OutOfResources) is recorded as not
    fitting: never chosen, and not an error of the run (a sweep on a smaller GPU must not exit 1 for it)."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    real = K._merged_weight

    def small_gpu(w, A, B, s):
        if K._blocks("merge", w.device).get("LOOP_I", 1) > 1:
            raise K.OutOfResources(131072, 101376, "shared memory")
        return real(w, A, B, s)

    monkeypatch.setattr(K, "_merged_weight", small_gpu)
    monkeypatch.setattr(gpu_layer, "MERGE_SWEEP", [(64, 128, 4, None), (64, 128, 4, 3, 4)])
    rows = gpu_layer.sweep_merge(70, 45, 5, torch.bfloat16, torch.device("cpu"), reps=1)
    assert "error" not in rows[0] and rows[1].get("does_not_fit") and "OutOfResources" in rows[1]["error"], rows
    assert gpu_layer.choose_blocks([{"sweep_merge": rows}])["merge"] == rows[0]["config"]
    assert gpu_layer.sweep_row_correct({"sweep_merge": rows})
    broken = gpu_layer.sweep_error(RuntimeError("PassManager::run failed"))  # a compile failure is a fault
    assert "does_not_fit" not in broken and not gpu_layer.sweep_row_correct({"sweep_merge": rows + [broken]})


def test_gpu_layer_sweep_only_smoke(tmp_path):
    """--sweep-only: the sweeps alone (the short GPU step that decides kernel configs), with a results file."""
    import gpu_layer

    out = tmp_path / "sweep.json"
    proc = _run([os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--sweep-only", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["correct"] and len(row["sweep_outer"]) == len(gpu_layer.OUTER_SWEEP) == 24, row
    assert len(row["sweep_u"]) == len(gpu_layer.U_SWEEP) + 2 == 12, row  # + the shipped config, K unsplit / in halves
    assert [sw.get("split_k") for sw in row["sweep_u"][-2:]] == [1, 2], row["sweep_u"][-2:]
    assert len(row["sweep_merge"]) == len(gpu_layer.MERGE_SWEEP) == 19, row
    for sw in row["sweep_merge"]:
        assert "error" not in sw, sw
        assert sw["ms"] > 0 and 0 <= sw["ulp_err_W"] <= gpu_layer.MERGE_ULP_BOUND and sw["rel_err_W"] > 0, sw
        assert sw["ulp_err_W_strict"] >= sw["ulp_err_W"], sw  # the same error without the TF32 allowance
    assert [sw["config"] for sw in row["sweep_merge"]] == [gpu_layer.merge_config(*c) for c in gpu_layer.MERGE_SWEEP]
    assert "## outer" in proc.stdout and "## U" in proc.stdout
    assert proc.stdout.count("## merge n=2 out=80 in=72 ") == 19, proc.stdout


def test_choose_blocks_takes_the_fastest_config_that_holds_the_bound_everywhere():
    import gpu_layer

    def entry(name, ms, err, **extra):
        return {"config": {"name": name}, "ms": ms, "rel_err_P": err, "rel_err_nu": err, "rel_err_U": err, **extra}

    rows = [
        {"sweep_outer": [entry("default", 3.0, 1e-7), entry("fast", 1.0, 1e-7), entry("inexact", 0.5, 1e-5),
                         entry("broken", 0.1, 0.0, error="compile")],
         "sweep_u": [entry("default", 1.0, 1e-7), entry("fast_here", 0.1, 1e-7)]},
        {"sweep_outer": [entry("default", 3.0, 1e-7), entry("fast", 1.5, 1e-7), entry("inexact", 0.5, 1e-7),
                         entry("broken", 0.1, 0.0)],
         "sweep_u": [entry("default", 1.0, 1e-7), entry("fast_here", 5.0, 1e-7)]},
    ]
    # "inexact" missed the bound at one shape, "broken" failed at one: neither may be shipped
    assert gpu_layer.choose_blocks(rows) == {"outer": {"name": "fast"}, "narrow": {"name": "default"}, "merge": None}
    rows[0]["sweep_outer"] = [entry("only_here", 0.1, 1e-7)]  # a config swept at one shape only: not chosen
    rows[1]["sweep_outer"] = [entry("elsewhere", 0.2, 1e-6)]
    assert gpu_layer.choose_blocks(rows)["outer"] is None
    assert gpu_layer.choose_blocks([]) == {"outer": None, "narrow": None, "merge": None}
    # the pass is timed with V and without (merged's): a config fast with V but slow without loses
    rows = [{"sweep_outer": [entry("with_v", 1.0, 1e-7, ms_nov=5.0), entry("both", 2.0, 1e-7, ms_nov=2.0)]}]
    assert gpu_layer.choose_blocks(rows)["outer"] == {"name": "both"}
    # cuBLAS's U pass is a reference point in the sweep, not a config of ours: never shipped, however fast
    cublas = dict(entry("cublas", 0.01, 1e-7), config={"cublas_terms": 3}, baseline=True)
    rows = [{"sweep_u": [entry("default", 1.0, 1e-7), cublas]}, {"sweep_u": [entry("default", 1.0, 1e-7), cublas]}]
    assert gpu_layer.choose_blocks(rows)["narrow"] == {"name": "default"}
    # the packed configs' error on an H100 (3.7e-6, under the test guard's 4e-6): fast, not shipped
    rows = [{"sweep_outer": [entry("default", 1.0, 2.7e-7), entry("packed", 0.9, 3.7e-6)]}]
    assert gpu_layer.choose_blocks(rows)["outer"] == {"name": "default"}
    # the merged weight's error is in half-ulps of W's dtype (bound 1), not relative: 0.9 passes, 1.5 does not;
    # it is judged over the rows that swept it (once per shape, not per token count)
    def merge(name, ms, ulp):
        return {"config": {"name": name}, "ms": ms, "ulp_err_W": ulp, "rel_err_W": 1e-3}

    rows = [{"sweep_merge": [merge("shipped", 0.3, 0.8), merge("wide", 0.1, 0.9), merge("sloppy", 0.05, 1.5)]},
            {"sweep_u": [entry("default", 1.0, 1e-7)]}]
    assert gpu_layer.choose_blocks(rows) == {"outer": None, "narrow": {"name": "default"}, "merge": {"name": "wide"}}


def test_the_first_swept_config_is_the_shipped_one():
    """OUTER_SWEEP's, U_SWEEP's and MERGE_SWEEP's first entries are the kernels' CUDA blocks (a sweep cut short
    still times what ships, and a ratio to 'the first' means the shipped config)."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    bt, ba, warps, stages, promote, pack, *presplit = gpu_layer.OUTER_SWEEP[0]
    assert K._CUDA_BLOCKS["outer"] == dict(BLOCK_T=bt, BLOCK_A=ba, num_warps=warps, num_stages=stages,
                                           PROMOTE=promote, PACK=pack, PRESPLIT=bool(presplit and presplit[0]))
    bm, bk, warps, stages, pack_w, presplit_w = gpu_layer.U_SWEEP[0]
    assert K._CUDA_BLOCKS["narrow"] == dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=1, num_warps=warps, num_stages=stages,
                                            PACK_W=pack_w, PRESPLIT_W=presplit_w)
    shipped = K._blocks("merge", torch.device("cuda"), torch.bfloat16, O=4096, I=11008)  # no CUDA needed
    assert gpu_layer.merge_config(*gpu_layer.MERGE_SWEEP[0]) == shipped == K._CUDA_BLOCKS["merge"]
    wide = K._blocks("merge", torch.device("cuda"), torch.bfloat16, O=4096, I=11008, RANK=64)  # 16 < r <= 64
    assert wide != shipped and wide == gpu_layer.merge_config(*gpu_layer.MERGE_SWEEP[-1])
    assert len(set(gpu_layer.MERGE_SWEEP)) == len(gpu_layer.MERGE_SWEEP) >= 4  # distinct candidates to time


def test_gpu_layer_blocks_from_a_sweep_file(tmp_path):
    """--blocks-from: the sweep file's choice is applied for the run and recorded in its results."""
    sweep, out = tmp_path / "sweep.json", tmp_path / "layer.json"
    _run([os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--sweep-only", "--json", str(sweep)])
    _run([os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--blocks-from", str(sweep), "--json", str(out),
          "--variants", "floor,ffa_flat[auto]"])
    applied = json.loads(out.read_text())["blocks_applied"]
    assert set(applied) == {"outer", "narrow", "merge"} and "PACK" in applied["outer"] and "PACK_W" in applied["narrow"]
    assert set(applied["merge"]) >= {"BLOCK_O", "BLOCK_I", "num_warps"}, applied["merge"]


def test_gpu_layer_sweeps_selects_the_sweeps(tmp_path):
    """--sweeps merge: only the merged-weight sweep runs (the short GPU step when only it is in question), and
    --blocks-from that file changes the merge config alone; an unknown sweep name is refused by name."""
    sweep, out = tmp_path / "sweep.json", tmp_path / "layer.json"
    proc = _run([os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--sweep-only", "--sweeps", "merge",
                 "--json", str(sweep)])
    rows = json.loads(sweep.read_text())["rows"]
    assert rows and all("sweep_u" not in row and "sweep_outer" not in row for row in rows), rows
    assert sum(1 for row in rows if "sweep_merge" in row) == len({(row["in"], row["out"]) for row in rows})
    assert "## U" not in proc.stdout and "## outer" not in proc.stdout and "## merge" in proc.stdout
    _run([os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--blocks-from", str(sweep), "--json", str(out),
          "--variants", "floor,ffa_flat[auto]"])
    assert set(json.loads(out.read_text())["blocks_applied"]) == {"merge"}
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--sweep-only",
                          "--sweeps", "merge,tma"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--sweeps" in bad.stderr and "'merge,tma'" in bad.stderr, bad.stderr
    alone = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_layer.py"), "--smoke", "--sweeps", "merge"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)  # no sweep to choose from
    assert alone.returncode == 2 and "--sweep-only or --sweep-outer" in alone.stderr, alone.stderr


def test_launch_overhead_smoke(tmp_path):
    """bench/launch.py (host cost per launch, by path) on CPU: every row is measured or names its failure;
    under the interpreter the Triton rows run too, and the compiled-launcher row fails with its reason; the
    rows named by --profile are profiled right after their own timing."""
    out = tmp_path / "launch.json"
    proc = _run([os.path.join(BENCH, "launch.py"), "--calls", "2", "--rounds", "1", "--json", str(out),
                 "--profile", "layer_step,layer_step_ps,nope,layer_step_dp", "--profile-calls", "2", "--profile-top", "5"],
                env={"TRITON_INTERPRET": "1"})
    row = json.loads(out.read_text())
    # --profile: the named row under cProfile, its own functions listed with per-call counts; a wrong name says so
    ps = row["profiles"]["layer_step_ps"]
    assert ps.startswith("== profile layer_step_ps: 2 calls") and "-- by own time" in ps, ps
    assert "-- by cumulative time" in ps and "launch.py" in ps and "(layer_step_ps)" in ps, ps
    assert row["profiles"]["nope"].startswith("== profile nope: no such row here (rows: torch_add"), row["profiles"]
    assert "== profile layer_step_ps" in proc.stdout and "== profile nope: no such row" in proc.stdout
    # each row profiled right after its own timing, in its state: the plain layer step before the DP engine
    # attaches to that model, the DP step after; none of them fails, nor do the rows timed after them
    for name in ("layer_step", "layer_step_dp"):
        assert "failed" not in row["profiles"][name] and "(per call" in row["profiles"][name], row["profiles"][name]
    assert row["layer_gemm"] == "triton"  # the op rows' pin, kept for the layer rows as in the earlier runs
    us = row["us_per_call"]
    for name in ("torch_add", "ffa_fwd", "ffa_bwd", "gemm_jit", "spec_key", "floor_step", "layer_step", "layer_step_ps",
                 "layer_step_dp", "layer_step_dp_graphed"):
        assert isinstance(us[name], float) and us[name] > 0, (name, us[name])
    assert us["gemm_compiled"].startswith("failed: RuntimeError"), us["gemm_compiled"]
    assert row["device_type"] == "cpu" and row["shape"] == "2,8,128,256,16"


def test_ncu_layer_smoke(tmp_path):
    """bench/ncu_layer.py (one step of our kernels for Nsight Compute) at toy size through the interpreter,
    with the configs of a sweep file as gpu_session.sh passes them."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"rows": [{
        "r": 4, "dtype": "float32",  # the step's rank, and its dtype on the CPU
        "sweep_outer": [{"config": {"BLOCK_T": 64, "BLOCK_A": 128, "num_warps": 4, "num_stages": 2, "PROMOTE": 1,
                                    "PACK": True}, "ms": 1.0, "rel_err_P": 1e-7, "rel_err_nu": 1e-7}],
        "sweep_u": []}]}))  # fmt: skip
    proc = _run([os.path.join(BENCH, "ncu_layer.py"), "--tokens", "2x5", "--shape", "72x80", "--r", "4",
                 "--blocks-from", str(sweep)], env={"TRITON_INTERPRET": "1"})
    assert "per-sample dB (2, 80, 4), norms (2,) finite=True" in proc.stdout, proc.stdout
    assert "kernel configs from" in proc.stdout and "'PACK': True" in proc.stdout, proc.stdout


def _session_stubs(tmp_path, timeout_stub: str) -> dict:
    """bin/ with a stub `python` (and, where given, `timeout` and a fake-clock `date`) for bench/gpu_session.sh."""
    import stat

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {"python": '#!/bin/bash\ncase "$*" in\n  *pytest\\ *) echo "[gw0] [ 1%] PASSED tests/t.py::test_a"; '
                       'echo "[gw1] [ 2%] FAILED tests/t.py::test_b"; exec sleep 60;;\nesac\nexit 0\n'}
    if timeout_stub:
        (tmp_path / "clock").write_text("0")
        stubs["date"] = f'#!/bin/bash\nif [ "${{1:-}}" = "+%s" ]; then cat {tmp_path}/clock; else echo fake-date; fi\n'
        stubs["timeout"] = timeout_stub.replace("CLOCK", str(tmp_path / "clock"))
    for name, text in stubs.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod((bin_ / name).stat().st_mode | stat.S_IEXEC)
    out, packed = tmp_path / "out", tmp_path / "R"
    packed.mkdir()
    knobs = ("_S", "_ARGS", "_VARIANTS", "_SIZES", "TEST_FILES", "TEST_WORKERS")  # the script's, from the caller
    env = {k: v for k, v in os.environ.items() if not k.endswith(knobs)}
    return {**env, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python"),
            "OUT": str(out), "TAR_TO": str(packed / "gs.tgz"), "PACK_EVERY_S": "0"}


# the fake `timeout -k K CAP CMD...`: advances the fake clock by what the step needs (NEED_<step>), or by its
# cap (plus the kill's grace K where GRACE=1: a step that ignores TERM) when it needs more; 1 s for the rest
_FAKE_TIMEOUT = r"""#!/bin/bash
[ "$1" = "-k" ] && { k=$2; shift 2; }
cap=$1; shift
case "$*" in
  *pytest_timeout*) d=1;; *" -m pytest "*) d=$NEED_TEST;; *sweep-only*) d=$NEED_SWEEP;; *gpu_layer.py*) d=$NEED_LAYER;;
  *graph-sizes*) d=$NEED_GRAPH;; *ncu_layer*) d=$NEED_NCU;; *launch.py*) d=$NEED_LAUNCH;; *step.py*) d=$NEED_STEP;;
  *ghost.py*) d=$NEED_GHOST;;
  *) d=1;;
esac
if (( d > cap )); then d=$((cap + k * GRACE)); r=124; else r=0; fi
echo $(( $(cat CLOCK) + d )) > CLOCK
echo "$*" >> CLOCK.cmds
exit $r
"""


def test_gpu_session_default_test_files_hold_the_never_run_data_parallel_gpu_test():
    """The next GPU call's TEST_K names "nccl" for data parallel's first NCCL run, but the test lives in
    tests/test_dp_group.py, which the default TEST_FILES left out: the call would have passed without it."""
    import re

    script = open(os.path.join(BENCH, "gpu_session.sh"), encoding="utf-8").read().replace("\\\n", " ")
    files = re.search(r"^TEST_FILES=\$\{TEST_FILES:-([^}]*)\}", script, re.M).group(1).split()
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in files), files
    held = [f for f in files if re.search(r"^def test_\w*nccl\w*\(", open(os.path.join(ROOT, f)).read(), re.M)]
    assert held == ["tests/test_dp_group.py"], files


def test_gpu_session_budget_gives_every_step_its_cap(tmp_path):
    """bench/gpu_session.sh on a fake clock (the default caps and BUDGET_S=570): with every step running to
    its cap, each of the 7 steps gets at least its cap; when each also takes the kill's 5 s grace, the last
    step (launch) is the one skipped; time that early steps leave unused goes to the later ones."""
    import re

    env = _session_stubs(tmp_path, _FAKE_TIMEOUT)
    (tmp_path / "bin" / "ncu").write_text("#!/bin/bash\n")
    (tmp_path / "bin" / "ncu").chmod(0o755)

    def session(grace=0, extra=None, **need):
        (tmp_path / "clock").write_text("0")
        steps = ("TEST", "SWEEP", "LAYER", "GRAPH", "STEP", "NCU", "LAUNCH", "GHOST")
        needs = {f"NEED_{k}": str(need.get(k, 999)) for k in steps}
        proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_session.sh")],
                              env={**env, **needs, "GRACE": str(grace), **(extra or {})}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        caps = {int(m[1]): int(m[2]) for m in re.finditer(r"^== (\d)/8 .*, (-?\d+)s \(at", proc.stdout, re.M)}
        skipped = {int(m[1]) for m in re.finditer(r"^== (\d)/8 [^\n]*\n-- skipped", proc.stdout, re.M)}
        if "GHOST_S" not in (extra or {}):  # (step 8, the ghost bench, is opt-in: cap 0 by default)
            assert 8 in skipped and caps[8] == 0, proc.stdout
            skipped.discard(8)
        done = int(re.search(r"^== done at \+(\d+)s", proc.stdout, re.M)[1])
        assert sorted(caps) == list(range(1, 9)), proc.stdout
        return caps, skipped, done, proc.stdout

    defaults = dict(enumerate([165, 85, 130, 70, 45, 30, 15], 1))
    caps, skipped, done, log = session()
    assert not skipped and all(caps[i] >= c for i, c in defaults.items()) and done <= 570, log
    caps, skipped, done, log = session(grace=1)
    assert skipped == {7} and all(caps[i] >= defaults[i] for i in range(1, 6)) and done <= 575, log
    caps, skipped, done, log = session(TEST=100, SWEEP=40)
    assert not skipped and caps[3] > 130 + 60 and done <= 570, log  # what tests and sweeps left, to the layer bench
    # time left after launch.py: the 4k-token launch.py run too (unless LAUNCH_4K_ARGS is set empty or blank);
    # each with its default arguments unless LAUNCH_ARGS / LAUNCH_4K_ARGS say otherwise
    cmds = tmp_path / "clock.cmds"

    def launches(extra=None, **need):
        cmds.write_text("")
        caps, skipped, done, log = session(extra=extra, **need)
        assert done <= 570, log
        return [line.split("launch.py", 1)[1].split() for line in cmds.read_text().splitlines() if "launch.py" in line]

    tiny, at_4k = launches(STEP=1, NCU=1, LAUNCH=5)
    assert tiny[tiny.index("--profile") + 1] == "layer_step_ps,layer_step_ps_direct,layer_step_dp", tiny
    assert at_4k[at_4k.index("--shape") + 1] == "8,512,4096,4096,16" and "--layer-gemm" in at_4k, at_4k
    assert at_4k[at_4k.index("--layer-gemm") + 1] == "auto" and "--profile" in at_4k, at_4k
    for blank in ("", " "):
        assert len(launches(STEP=1, NCU=1, LAUNCH=5, extra={"LAUNCH_4K_ARGS": blank})) == 1
    (tiny,) = launches(STEP=1, NCU=1, LAUNCH=5, extra={"LAUNCH_ARGS": "", "LAUNCH_4K_ARGS": ""})
    assert tiny == ["--json", str(tmp_path / "out" / "launch.json")], tiny  # no --profile
    (_, at_4k) = launches(STEP=1, NCU=1, LAUNCH=5, extra={"LAUNCH_4K_ARGS": "--shape 4,512,64,64,8"})
    assert at_4k[-2:] == ["--shape", "4,512,64,64,8"], at_4k
    assert len(launches()) == 1  # no time left for it
    # a sweep file an earlier call left in $OUT (a warm machine) is never applied: only this call's sweep
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "sweep.json").write_text('{"stale": true}')
    cmds.write_text("")
    session(extra={"SWEEP_S": "0"})
    layer = [line for line in cmds.read_text().splitlines() if "gpu_layer.py" in line and "sweep-only" not in line]
    assert layer and not any("--blocks-from" in line for line in layer), layer
    assert not (tmp_path / "out" / "sweep.json").exists()
    # step 8 (opt-in): the ghost bench on what the others leave, on CUDA, then the noise-draw bench
    cmds.write_text("")
    caps, skipped, done, log = session(extra={"GHOST_S": "20"}, TEST=100, SWEEP=40, GHOST=5)
    assert not skipped and caps[8] >= 20 and done <= 570, log
    ran = cmds.read_text().splitlines()
    assert any("ghost.py --device cuda" in line for line in ran), ran
    assert any("chacha20.py --device cuda" in line for line in ran), ran


def test_gpu_session_a_kill_keeps_what_was_done(tmp_path):
    """Stopped by an outer `timeout` in the middle of a step, bench/gpu_session.sh packs $OUT into TAR_TO at
    once: the archive holds the console (session.log) and the running step's log so far (the failed test)."""
    import tarfile

    env = _session_stubs(tmp_path, "")
    os.makedirs(env["OUT"])
    with open(os.path.join(env["OUT"], "junit_cuda.xml"), "w") as f:  # an earlier session's, on a reused machine
        f.write("stale")
    proc = subprocess.run(["timeout", "-k", "5", "6", "bash", os.path.join(BENCH, "gpu_session.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 124 and "stopped at" in proc.stdout, proc.stdout + proc.stderr
    with tarfile.open(env["TAR_TO"]) as tar:
        names = set(tar.getnames())
        tests = tar.extractfile("./tests_cuda.log").read().decode()
        session = tar.extractfile("./session.log").read().decode()
    assert {"./tests_cuda.log", "./session.log"} <= names and "./junit_cuda.xml" not in names, names
    (old,) = [d for d in os.listdir(tmp_path) if d.startswith("out.old.")]  # moved aside, not lost
    assert os.listdir(tmp_path / old / "out") == ["junit_cuda.xml"]
    assert "FAILED tests/t.py::test_b" in tests and "== 1/8 CUDA tests" in session, (tests, session)
    assert os.listdir(os.path.dirname(env["TAR_TO"])) == ["gs.tgz"]  # no half-written archive left beside it


def test_graph_host_smoke(capsys):
    """bench/graph_host.py (host cost of a graphed DP step, replay stubbed) on a tiny Llama: both paths run
    (the graphed one through the stand-in capture), and torch.cuda is restored afterwards."""
    import graph_host

    real = torch.cuda.CUDAGraph
    out = graph_host.main(["--smoke"])
    assert out["graphed"] > 0 and out["eager"] > 0 and out["check"] > 0, out
    assert torch.cuda.CUDAGraph is real
    assert "per step" in capsys.readouterr().out


def test_failures_are_logged_as_they_happen_and_a_self_skipped_case_is_no_error(tmp_path):
    """tests/conftest.py: with FEDLORA_FAST_FAILURE_LOG set (bench/gpu_session.sh), each failure's traceback is
    written when it happens (an H100 run cut by its cap on 2026-11-26 lost every traceback: pytest prints them
    at the end); and a fixture's teardown sees that its test skipped itself (``poisoned`` errored on every
    case a test skips on CUDA)."""
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.fixture\n"
        "def needs_work(request):\n"
        "    calls = []\n"
        "    yield calls\n"
        "    ran = getattr(request.node, 'rep_call', None)\n"
        "    if ran is not None and ran.skipped:\n"
        "        return\n"
        "    assert calls, 'nothing done'\n"
        "def test_skips(needs_work):\n"
        "    pytest.skip('not on this device')\n"
        "def test_fails():\n"
        "    assert 1 == 2, 'boom'\n"
    )
    log = tmp_path / "failures.log"
    env = {**os.environ, "FEDLORA_FAST_FAILURE_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_x.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert "1 failed, 1 skipped" in proc.stdout and "error" not in proc.stdout.splitlines()[-1], proc.stdout
    text = log.read_text()
    assert "test_x.py::test_fails (call)" in text and "boom" in text and "test_skips" not in text, text
    assert text.count("(call)") == 1, text
    # an xdist worker writes nothing: its controller replays the report and writes it (once)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                    str(tmp_path / "test_x.py")], cwd=tmp_path, env={**env, "PYTEST_XDIST_WORKER": "gw0"},
                   capture_output=True, text=True, timeout=300)  # fmt: skip
    assert log.read_text() == text


def test_apply_blocks_is_what_every_cuda_launch_of_that_kind_takes(monkeypatch):
    """``--blocks-from``: the sweep's chosen config is what the kernels launch for that kind at every rank (the
    rank rules, e.g. the merge's 128 x 64 tile above r = 16, must not replace a config swept at r = 64), with
    the stage cap still applied; other kinds and CPU launches keep the kernels' own rules."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setattr(K, "_blocks", K._blocks)  # restored after the test
    real = K._blocks
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    chosen = dict(BLOCK_O=32, BLOCK_I=256, num_warps=4)
    assert gpu_layer.apply_blocks({"merge": chosen, "outer": None}) == {"merge": chosen}
    for r in (16, 64):
        launch = K._merge_launch(cuda, torch.bfloat16, r, 4096, 11008)
        assert (launch["BLOCK_O"], launch["BLOCK_I"], launch["num_warps"]) == (32, 256, 4), (r, launch)
    assert real("merge", cuda, torch.bfloat16, O=4096, I=11008, RANK=64)["BLOCK_O"] == 128  # the rule it overrides
    assert K._blocks("outer", cuda, torch.bfloat16, RANK=64, V_RANK=0) == real("outer", cuda, torch.bfloat16,
                                                                               RANK=64, V_RANK=0)
    assert K._blocks("merge", cpu, O=40, I=300) == real("merge", cpu, O=40, I=300)
    try:
        K._LAUNCH.stage_cap = 2
        assert K._blocks("merge", cuda, torch.bfloat16)["num_stages"] == 2
    finally:
        K._LAUNCH.stage_cap = None
    assert "num_stages" not in K._blocks("merge", cuda, torch.bfloat16)


def test_kernel_sweep_timing_queues_each_call_behind_the_flush_and_a_spin(monkeypatch):
    """The sweeps time kernels by GPU time: each call is issued after the L2 flush and a spin kernel are queued,
    between its own two events, and only the last event is waited for (the host never drains the queue, so
    the spin covers the host's issue time); off CUDA ``kernel_ms`` is ``bench_ms``."""
    import gpu_layer

    log = []

    class Event:
        def __init__(self):
            self.i = len([e for e in log if e.startswith("event")])
            log.append(f"event{self.i}")

        def record(self):
            log.append(f"record{self.i}")
            self.t = 0.5 * len(log)

        def synchronize(self):
            log.append(f"sync{self.i}")

        def elapsed_time(self, end):
            return end.t - self.t

    times = gpu_layer.queued_times(lambda: log.append("fn"), 2, lambda: log.append("flush"),
                                   lambda: log.append("spin"), Event)
    assert log == ["flush", "spin", "event0", "event1", "record0", "fn", "record1",
                   "flush", "spin", "event2", "event3", "record2", "fn", "record3", "sync3"], log
    assert times == [1.0, 1.0]  # end - start: the call between them
    calls = []
    monkeypatch.setattr(gpu_layer, "bench_ms", lambda fn, device, reps: calls.append((fn, device, reps)) or 7.0)
    fn = lambda: None  # noqa: E731
    assert gpu_layer.kernel_ms(fn, torch.device("cpu"), 3) == 7.0 and calls == [(fn, torch.device("cpu"), 3)]


def test_kernel_ms_spins_twice_the_host_issue_time(monkeypatch):
    """On CUDA (faked here) ``kernel_ms`` spins ``2 x`` the slowest of three host issues + 0.05 ms before each
    timed call, capped at ``_SLEEP_CAP_MS``, and returns the median of the per-call event times."""
    import time as _time

    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    spins, elapsed = [], iter(range(10**6))

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = next(elapsed)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 9.0 if end.t % 8 == 7 else 2.0  # every 4th call 9 ms: the median ignores the outliers

    monkeypatch.setattr(K, "_sleep_cycles_per_ms", lambda device: 1000.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", spins.append, raising=False)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(8, dtype=torch.int8))
    cuda = torch.device("cuda")
    guarded = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: guarded.append(d) or contextlib.nullcontext())
    monkeypatch.setattr(K, "_SLEEP_CAP_MS", 8.0)  # (a short cap: the test sleeps the host time ~60 times)
    for host_ms, expected_ms in ((2.0, 2 * 2.0 + 0.05), (6.0, 8.0)):
        spins.clear()
        ms = gpu_layer.kernel_ms(lambda h=host_ms: _time.sleep(h / 1e3), cuda, 1)
        assert ms == 2.0
        assert len(set(spins)) == 1 and len(spins) == 5 + 50, len(spins)  # 100 ms of 2 ms calls after 5
        # at least the issue time asked for (a slower box only lengthens it), never past the cap
        assert expected_ms * 1000.0 <= spins[0] <= 8.0 * 1000.0, (host_ms, spins[0])
    assert guarded == [cuda, cuda]  # the spin and the events on the kernels' device


def test_blocks_from_a_file_swept_at_another_rank_or_dtype_is_not_applied(tmp_path, monkeypatch, capsys):
    """``blocks_from_file`` applies a sweep file's choice only where it was swept at the run's rank and dtype
    (``apply_blocks`` answers it at every rank): otherwise it says so and the shipped configs run."""
    import gpu_layer

    from fedlora_fast.kernels import ffa_linear as K

    monkeypatch.setattr(K, "_blocks", K._blocks)  # restored after the test
    real = K._blocks
    merge = {"config": {"BLOCK_O": 32, "BLOCK_I": 256, "num_warps": 4}, "ms": 1.0, "ulp_err_W": 0.5}
    path = tmp_path / "sweep.json"
    cuda = torch.device("cuda")
    for rows in ([{"r": 16, "dtype": "bfloat16", "sweep_merge": [merge]}],
                 [{"r": 64, "dtype": "float32", "sweep_merge": [merge]}],
                 [{"r": 64, "dtype": "bfloat16", "sweep_merge": [merge]}, {"r": 16, "dtype": "bfloat16"}]):
        path.write_text(json.dumps({"rows": rows}))
        assert gpu_layer.blocks_from_file(str(path), 64, "bfloat16") is None
        assert "NOT applied" in capsys.readouterr().out
        assert K._blocks is real
    path.write_text(json.dumps({"rows": [{"r": 64, "dtype": "bfloat16", "sweep_merge": [merge]}]}))
    assert gpu_layer.blocks_from_file(str(path), 64, "bfloat16") == {"merge": merge["config"]}
    assert K._merge_launch(cuda, torch.bfloat16, 64, 4096, 11008)["BLOCK_I"] == 256


def test_harness_env_var_sets_for_the_block_and_restores(monkeypatch):
    """harness.env_var (how the benches switch backend, GEMM and launch path): set inside, restored after,
    also when the block raises; unset again where it was unset; None leaves the value as it is."""
    name = "FEDLORA_FAST_TEST_ENV_VAR"
    monkeypatch.delenv(name, raising=False)
    with harness.env_var(name, "a"):
        assert os.environ[name] == "a"
    assert name not in os.environ
    monkeypatch.setenv(name, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with harness.env_var(name, "b"):
            assert os.environ[name] == "b"
            raise RuntimeError("boom")
    assert os.environ[name] == "old"
    with harness.env_var(name, None):
        assert os.environ[name] == "old"
        os.environ[name] = "changed inside"
    assert os.environ[name] == "old"
