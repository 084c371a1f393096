"""Models larger than the device: placement plan, block-wise perplexity, onloaded quantization."""

from __future__ import annotations

import pytest
import torch

from harness.evals.ppl import blockwise_window_nlls, window_nlls
from harness.inputs.models import tiny_bloom, tiny_llama
from harness.inputs.placement import (
    PlacementError,
    gpu_device_map,
    module_bytes,
    plan_placement,
)
from harness.run.pipeline import run_one
from methods.arch import ModelSpec
from tests.conftest import TINY_QUICK

CPU = torch.device("cpu")


@pytest.mark.parametrize("build", [tiny_llama, tiny_bloom])
def test_blockwise_perplexity_equals_whole_model(build):
    torch.manual_seed(0)
    model = build().eval()
    spec = ModelSpec.from_model(model, "tiny")
    windows = torch.randint(0, model.config.vocab_size, (3, 24))
    whole = window_nlls(model, windows)
    blockwise = blockwise_window_nlls(model, spec, windows, CPU)
    torch.testing.assert_close(blockwise, whole, rtol=1e-5, atol=1e-6)
    # the model is left as it was: blocks back in place, forward unchanged
    torch.testing.assert_close(window_nlls(model, windows), whole)


def test_plan_placement_auto_device_offload_and_errors():
    model = tiny_llama()
    spec = ModelSpec.from_model(model, "tiny")
    total = module_bytes(model)
    gib = 2**30
    assert plan_placement(model, spec, "auto", CPU).path == "device"     # CPU: unlimited
    small = plan_placement(model, spec, "auto", CPU, budget_gb=total * 0.7 / gib)
    assert small.path == "offload" and small.largest_block_bytes < total
    with pytest.raises(PlacementError, match="placement.mode=offload"):
        plan_placement(model, spec, "device", CPU, budget_gb=total * 0.7 / gib)
    with pytest.raises(PlacementError, match=r"needs? .* MiB and the budget is"):
        plan_placement(model, spec, "offload", CPU,
                       budget_gb=small.largest_block_bytes * 0.5 / gib)
    with pytest.raises(PlacementError, match="use one of"):
        plan_placement(model, spec, "everywhere", CPU)
    for bad in ("abc", 0, -1):
        with pytest.raises(PlacementError, match="placement.device_memory_gb"):
            plan_placement(model, spec, "auto", CPU, budget_gb=bad)


def test_gpu_device_map_spreads_blocks_over_fake_gpus():
    model = tiny_llama(num_layers=4)
    spec = ModelSpec.from_model(model, "tiny")
    per_gpu = int(module_bytes(model) * 0.8)
    device_map = gpu_device_map(model, spec, n_gpus=2, per_gpu_bytes=per_gpu)
    assert set(device_map.values()) == {0, 1}
    with pytest.raises(PlacementError, match="does not fit 2 GPU"):
        gpu_device_map(model, spec, n_gpus=2, per_gpu_bytes=per_gpu // 4)


@pytest.mark.parametrize("method", ["gptq", "fptq"])
def test_offloaded_job_gives_the_same_codes_and_perplexity(compose_cfg, method):
    """A device budget smaller than the model: quantized block by block and evaluated block
    by block, with the numbers of the on-device job."""
    common = [*TINY_QUICK, f"method={method}", "bits=w4a8", "calib.n_samples=4",
              "calib.seqlen=64", "cache=off"]
    on_device = run_one(compose_cfg(*common, "placement.mode=device"))
    offloaded = run_one(compose_cfg(*common, "placement.mode=auto", "force=true",
                                    "placement.device_memory_gb=0.0002"))
    assert on_device.status == offloaded.status == "ok", (on_device.error, offloaded.error)
    assert offloaded.provenance["model_info"]["placement"]["path"] == "offload"
    assert on_device.provenance["model_info"]["placement"]["path"] == "device"
    assert offloaded.provenance["eval"]["ppl_ptb"]["blockwise"] is True
    assert offloaded.metrics["ppl_ptb"] == pytest.approx(on_device.metrics["ppl_ptb"], rel=1e-5)
    assert offloaded.config_hash == on_device.config_hash     # placement is not identity


def test_block_larger_than_budget_fails_with_the_memory_it_needs(compose_cfg):
    rec = run_one(compose_cfg(*TINY_QUICK, "method=rtn", "bits=w4a16",
                              "placement.mode=offload", "placement.device_memory_gb=0.00001"))
    assert rec.status == "failed"
    assert "need" in rec.error and "placement.device_memory_gb" in rec.error


def test_concurrent_jobs_lease_distinct_gpus(tmp_path):
    """Four jobs of a sweep on a node with two (fake) GPUs: at most two run at once and
    never two on one GPU; each GPU serves jobs in turn."""
    import threading
    import time

    from harness.run.devices import lease_gpu

    fake = ["0", "1"]
    holding: dict[str, int] = {"0": 0, "1": 0}
    seen: list[str] = []
    peak = [0]
    lock = threading.Lock()

    def job():
        with lease_gpu(fake, tmp_path / "locks", poll_s=0.01) as gpu:
            with lock:
                holding[gpu] += 1
                seen.append(gpu)
                peak[0] = max(peak[0], sum(holding.values()))
                assert holding[gpu] == 1, f"two jobs on GPU {gpu}"
            time.sleep(0.05)
            with lock:
                holding[gpu] -= 1

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == ["0", "0", "1", "1"] and peak[0] == 2


def test_no_gpu_no_lease(tmp_path):
    from harness.run.devices import lease_gpu
    with lease_gpu([], tmp_path) as gpu:
        assert gpu is None


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    from harness.run.devices import visible_gpus
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """tiny-llama saved as a sharded safetensors checkpoint with its tokenizer."""
    from harness.inputs.models import tiny_tokenizer
    path = tmp_path / "tiny-ckpt"
    tiny_llama().save_pretrained(path, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_disk_placement_reads_blocks_on_demand_with_the_same_numbers(compose_cfg,
                                                                     tiny_checkpoint, method):
    assert (tiny_checkpoint / "model.safetensors.index.json").is_file()   # sharded
    common = [*TINY_QUICK[1:], "model=local", f"model.source.path={tiny_checkpoint}",
              "model.dtype=float32", "model.group_size=32", f"method={method}", "bits=w4a8",
              "calib.n_samples=4", "calib.seqlen=64", "cache=off"]
    in_memory = run_one(compose_cfg(*common, "placement.mode=device"))
    on_disk = run_one(compose_cfg(*common, "placement.mode=disk", "force=true"))
    assert in_memory.status == on_disk.status == "ok", (in_memory.error, on_disk.error)
    assert on_disk.provenance["model_info"]["placement"]["path"] == "disk"
    n_blocks = 2
    assert on_disk.provenance["block_store"]["writes"] == n_blocks       # each block once
    assert on_disk.metrics["ppl_ptb"] == pytest.approx(in_memory.metrics["ppl_ptb"], rel=1e-5)
    assert on_disk.metrics["avg_bits_linear"] == in_memory.metrics["avg_bits_linear"]


def test_disk_placement_refuses_whole_model_steps(compose_cfg, tiny_checkpoint):
    rec = run_one(compose_cfg(*TINY_QUICK[1:], "model=local",
                              f"model.source.path={tiny_checkpoint}", "model.dtype=float32",
                              "method=rtn", "bits=w4a16", "placement.mode=disk",
                              "save_checkpoint=true"))
    assert rec.status == "skipped" and "placement.mode=disk" in rec.error
