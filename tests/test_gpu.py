"""Checks that need an NVIDIA GPU (skipped elsewhere); benchmarks/gpu_checks.sh runs them with the GPU benchmarks."""

import copy

import pytest
import torch

import regrow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")  # the GPU machine has the real torchvision, so no stand-in is needed
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _removed(report):
    return {g["name"]: g["units_after"] for g in report.to_dict()["groups"]}


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv3_small_050"])
def test_structural_pruning_chooses_on_cuda_what_it_chooses_on_the_cpu(name):
    """Same weights, same budget: the same groups and widths on both devices, the check passing on CUDA with
    TF32 on (the caller's flags are put back), and no device-side assert from any probe."""
    dense = _timm(name)
    x = torch.randn(2, 3, 96, 96)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    on_cpu, on_gpu = copy.deepcopy(dense), copy.deepcopy(dense).cuda()
    # round_to stated: its default follows the hardware (16 on AVX-512 CPUs, 8 on CUDA)
    opts = {"pattern": "channel", "macs": 0.5, "keep_dense": False, "round_to": 8}
    cpu = regrow.prune(on_cpu, example_inputs=x, **opts).structure
    gpu = regrow.prune(on_gpu, example_inputs=x.cuda(), **opts).structure
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert gpu.equivalence.passed
    assert abs(gpu.macs_ratio - 0.5) <= 0.01 and gpu.macs_ratio == pytest.approx(cpu.macs_ratio)
    assert _removed(gpu) == _removed(cpu)
    with torch.inference_mode():
        on_gpu(x.cuda())  # the CUDA context is still healthy


def test_a_run_on_cuda_in_bf16_with_2_4_acceleration_reports_what_it_measured(tmp_path):
    overrides = [
        "device=cuda",
        "prune.pattern=2:4",
        "prune.sparsity=null",
        "prune.ignore=[0.weight]",
        "model.train.epochs=1",
        "recover.epochs=1",
        "recover.precision=bf16",
        "accelerate.enabled=true",
    ]
    report = regrow.run("demo", overrides=overrides, out_dir=tmp_path / "run", progress=False)
    assert report.recovery["details"]["compute"]["precision"] == "bf16"
    acc = report.prune["acceleration"]
    assert acc["layers"] and acc["speed"] is not None
    assert report.prune["speed"]["device"].startswith("cuda")
    assert "## 2:4 on sparse tensor cores" in (tmp_path / "run" / "report.md").read_text()
