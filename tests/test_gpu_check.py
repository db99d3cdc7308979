"""scripts/gpu_check.py (`make gpu-check`): its CPU part passes here, with one SKIP line per CUDA
part, and it fails loudly (a FAIL line, a non-zero exit) when two runs that must be equal differ."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers_zygote as zygote
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from gpu_check import compare_main  # noqa: E402
from gpu_check import main as gpu_check_main  # noqa: E402
from gpu_check_lib import CheckFailed, Launcher, Report  # noqa: E402
from gpu_check_measure import compare_states  # noqa: E402

from growrun.train.outputs import save_checkpoint  # noqa: E402

CPU_PASSES = ["machine", "methods/tiny", "methods/none", "resume/sigterm", "resume/sigkill", "throughput"]
CUDA_SKIPS = ["methods/cuda", "resume/nondeterministic", "proposal", "throughput/nondeterministic", "ddp"]


def lines(stdout: str, status: str) -> dict[str, str]:
    """{check: text} of the `STATUS check: text` lines."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith(status + " "):
            name, _, text = line[len(status) + 1:].partition(": ")
            found[name] = text
    return found


def forked(argv: list[str], *, stderr, **popen) -> zygote.Process:
    """subprocess.Popen of `python -m growrun ARGS` or `python -c SOURCE ARGS`, forked from the
    test zygote (tests/helpers_zygote.py) instead of a fresh interpreter's ~7 s start-up."""
    assert argv[0] == sys.executable and (argv[1:3] == ["-m", "growrun"] or argv[1] == "-c"), argv
    return zygote.Process(argv[3:], stderr=zygote.STDOUT if stderr == subprocess.STDOUT else stderr,
                          source=argv[2] if argv[1] == "-c" else None, **popen)


def test_cpu_part_passes_and_skips_each_cuda_part_once(tmp_path, monkeypatch, capsys):
    """`gpu_check.py --quick --device cpu`, run in this process; its runs are real processes."""
    out = tmp_path / "record.json"
    monkeypatch.setattr(Launcher, "popen", staticmethod(forked))
    monkeypatch.chdir(tmp_path)
    code = gpu_check_main(["--quick", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    stdout, said = captured.out, captured.out + captured.err
    assert code == 0, said[-4000:]
    passed, skipped = lines(stdout, "PASS"), lines(stdout, "SKIP")
    assert not lines(stdout, "FAIL"), said[-4000:]
    assert set(passed) == set(CPU_PASSES), said[-4000:]
    assert set(skipped) == set(CUDA_SKIPS), said[-4000:]
    for name in CUDA_SKIPS:  # exactly one line each
        assert sum(line.startswith(f"SKIP {name}:") for line in stdout.splitlines()) == 1
    if not torch.cuda.is_available():
        assert all(text == "no CUDA device" for text in skipped.values()), skipped
    assert "bit-identical" in passed["resume/sigterm"] and "bit-identical" in passed["resume/sigkill"]
    assert stdout.splitlines()[-1].startswith(f"gpu-check: {len(CPU_PASSES)} PASS, 0 FAIL, {len(CUDA_SKIPS)} SKIP")
    record = json.loads(out.read_text())
    assert {c["name"]: c["status"] for c in record["checks"]} == \
        {**dict.fromkeys(CPU_PASSES, "PASS"), **dict.fromkeys(CUDA_SKIPS, "SKIP")}
    assert record["machine"]["torch"] == torch.__version__ and "cuda.matmul.allow_tf32" in record["machine"]["tf32"]
    speed = next(c["details"] for c in record["checks"] if c["name"] == "throughput")
    assert speed["images_per_s"] > 0 and 0 < speed["growth_share"] < 1


def fake_run(run_dir: Path, model: dict, growth_rows: str) -> Path:
    save_checkpoint(run_dir / "checkpoints" / "last.pt",
                    {"arch": {"name": "mlp", "hidden": [3]}, "trainer": {"step": 8}, "model": model})
    (run_dir / "growth.csv").write_text("event,step,site,added,stats_seconds\n" + growth_rows)
    return run_dir


def test_a_difference_fails_loudly(tmp_path, capsys):
    torch.manual_seed(0)
    model = {"fc1.weight": torch.randn(3, 4), "fc1.bias": torch.randn(3), "bn.num_batches_tracked": torch.tensor(8)}
    changed = {k: v.clone() for k, v in model.items()}
    changed["fc1.weight"][1, 2] += 1e-6
    same = compare_states(model, {k: v.clone() for k, v in model.items()})
    assert same["equal"] and same["max_abs"] == 0 and not same["problems"]
    diff = compare_states(model, changed)
    assert not diff["equal"] and diff["differing"] == ["fc1.weight"]
    assert diff["max_abs"] == pytest.approx(abs(float(changed["fc1.weight"][1, 2]) - float(model["fc1.weight"][1, 2])))
    assert "fc1.weight: 1 of 12 elements differ (first at (1, 2)" in diff["problems"][0]
    assert not compare_states(model, {**model, "fc1.bias": torch.zeros(4)})["equal"]  # another shape
    assert not compare_states(model, {k: v for k, v in model.items() if k != "fc1.bias"})["equal"]  # a missing key

    # the command line: a FAIL line naming the tensor and exit 1 (a real process); identical runs
    # (timing columns aside): PASS and 0; a growth.csv row that differs: FAIL (in this process)
    rows = "1,4,fc1,2,0.5\n"
    a = fake_run(tmp_path / "a", model, rows)
    # `python scripts/gpu_check.py --compare A B`, forked from the warm zygote
    proc = zygote.run(["--compare", str(a), str(fake_run(tmp_path / "b", changed, rows))], cwd=tmp_path,
                      timeout=300, source=zygote.script_source(SCRIPTS / "gpu_check.py"))
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL compare: fc1.weight: 1 of 12 elements differ"), \
        proc.stdout + proc.stderr
    same_run = fake_run(tmp_path / "c", {k: v.clone() for k, v in model.items()}, rows.replace("0.5", "0.7"))
    assert compare_main(a, same_run) == 0 and capsys.readouterr().out.startswith("PASS compare: bit-identical")
    assert compare_main(a, fake_run(tmp_path / "d", model, "1,4,fc1,1,0.5\n")) == 1
    assert capsys.readouterr().out.startswith("FAIL compare: growth.csv: 1 of 1 rows differ (first row 1, columns added 2 vs 1)")


def test_a_check_that_raises_or_gives_no_result_is_a_failure(capsys):
    report = Report()
    with report.check("a"):
        raise CheckFailed("weights differ")
    with report.check("b"):
        raise RuntimeError("CUDA error: an illegal memory access")
    with report.check("c"):
        pass  # no result given
    with report.check("d") as out:
        out["pass"] = "1 == 1"
    assert capsys.readouterr().out.splitlines() == [
        "FAIL a: weights differ", "FAIL b: RuntimeError: CUDA error: an illegal memory access",
        "FAIL c: the check ended without a result", "PASS d: 1 == 1"]
    assert [r.name for r in report.failed] == ["a", "b", "c"] and report.counts() == {"PASS": 1, "FAIL": 3, "SKIP": 0}
