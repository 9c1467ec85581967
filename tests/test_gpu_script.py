"""benchmarks/gpu.py (issue 19 item 5): argument parsing and the no-CUDA exit, quickly and without a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu = _module()


def test_defaults_are_the_issue_plan(tmp_path):
    a = gpu.parse(["run", "--data", str(tmp_path)])
    assert a.batches == [4096, 16384, 65536] and a.precisions == ["fp32", "bf16"]
    assert a.device == "cuda" and a.preset == "paper" and a.score_rows == 1_000_000 and a.cpu_reference
    a = gpu.parse(["run", "--data", str(tmp_path), "--batches", "512,1024", "--precisions", "bf16",
                   "--set", "model.hidden=[8]", "--no-cpu-reference", "--device", "cpu"])
    assert a.batches == [512, 1024] and a.precisions == ["bf16"] and a.overrides == ["model.hidden=[8]"]
    assert not a.cpu_reference and a.device == "cpu"


@pytest.mark.parametrize("bad", [["--batches", "0"], ["--batches", "a,b"], ["--precisions", "fp16"]])
def test_bad_arguments_are_refused(tmp_path, bad):
    with pytest.raises(SystemExit) as e:
        gpu.parse(["run", "--data", str(tmp_path), *bad])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gpu.parse([])  # a subcommand is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_no_cuda_exits_with_a_clear_message(tmp_path, capsys):
    assert gpu.main(["check"]) == gpu.NO_CUDA_EXIT
    assert gpu.main(["run", "--data", str(tmp_path)]) == gpu.NO_CUDA_EXIT  # before touching the data
    err = capsys.readouterr().err
    assert err.count("CUDA is not available") == 2 and "Nothing was measured" in err
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DATA": str(tmp_path / "d")},
                       timeout=120)
    assert r.returncode == gpu.NO_CUDA_EXIT and "CUDA is not available" in r.stderr and r.stdout == ""
    assert not (tmp_path / "d").exists()  # no data generated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_check_passes_with_cuda(capsys):
    assert gpu.main(["check"]) == 0
    assert "CUDA device" in capsys.readouterr().out
