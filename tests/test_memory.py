"""The memory a build needs against what the machine (or its container) has."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from vlm_export.memory import available_bytes, fp32_weight_bytes, reset_peak
from vlm_export.progress import MeasuredProgress, Progress


def _fp32_bytes_of(model) -> int:
    return 4 * sum(p.numel() for p in model.state_dict().values() if p.is_floating_point())


def test_fp32_weights_are_read_from_the_checkpoint_headers(tiny_model_dir, tmp_path):
    """safetensors: counted from the headers, whatever dtype they were saved in (a build loads fp32);
    PyTorch .bin: from the files' sizes and the config's dtype."""
    from transformers import LlavaForConditionalGeneration

    src = tiny_model_dir("llava-llama")
    model = LlavaForConditionalGeneration.from_pretrained(src)
    want = _fp32_bytes_of(model)
    assert fp32_weight_bytes(src) == want
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert fp32_weight_bytes(tmp_path / "bf16") == want  # half the bytes on disk, the same in fp32
    (tmp_path / "bin").mkdir()  # an older checkpoint: a pickled state dict in fp16, its config saying so
    torch.save(model.to(torch.float16).state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text('{"model_type": "llava", "torch_dtype": "float16"}')
    assert abs(fp32_weight_bytes(tmp_path / "bin") - want) < 0.02 * want  # pickle framing on top of the data
    (tmp_path / "empty").mkdir()
    assert fp32_weight_bytes(tmp_path / "empty") is None
    (tmp_path / "broken").mkdir()
    for damaged in (b"\x05", b"\xff" * 8 + b"{}", (20).to_bytes(8, "little") + b"[1, 2",
                    (6).to_bytes(8, "little") + b"[1, 2]", (9).to_bytes(8, "little") + b'{"a": 1}'):
        (tmp_path / "broken" / "model.safetensors").write_bytes(damaged)
        assert fp32_weight_bytes(tmp_path / "broken") is None  # loading says what is wrong with it


def _meminfo(folder, available_kb: int, swap_free_kb: int = 0):
    path = folder / "meminfo"
    path.write_text(f"MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   {available_kb} kB\n"
                    f"SwapTotal:       {swap_free_kb} kB\nSwapFree:        {swap_free_kb} kB\n")
    return str(path)


def test_available_memory_is_the_kernels_or_the_containers_limit(tmp_path):
    meminfo = _meminfo(tmp_path, 20_000_000, swap_free_kb=1_000_000)
    none = tmp_path / "no-cgroup"
    assert available_bytes(meminfo, str(none)) == 21_000_000 * 1024  # free swap counts
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")  # no limit
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    assert available_bytes(meminfo, str(v2)) == 21_000_000 * 1024
    (v2 / "memory.max").write_text(f"{8 << 30}\n")  # a container with 8 GiB, 3 GiB used of which 1 GiB page cache
    (v2 / "memory.stat").write_text(f"anon {2 << 30}\nfile {1 << 30}\ninactive_file {1 << 30}\n")
    assert available_bytes(meminfo, str(v2)) == 6 << 30
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert available_bytes(meminfo, str(v1)) == 3 << 30
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert available_bytes(meminfo, str(v1)) == 21_000_000 * 1024
    assert available_bytes(str(tmp_path / "not-linux"), str(none)) is None


def test_calibration_budget_follows_the_memory_a_build_can_get(monkeypatch):
    """GPTQ's and the int8 ranking's sample budget: a quarter of what ``available_bytes`` says (a
    container's limit obeyed), within 256 MiB..8 GiB."""
    from vlm_export.precision import probe

    for available, budget in ((6 << 30, 1536 << 20), (512 << 20, 256 << 20), (64 << 30, 8 << 30), (None, 1 << 30)):
        monkeypatch.setattr(probe, "available_bytes", lambda: available)
        assert probe.default_budget() == budget, available


def test_each_build_step_gets_its_own_time_and_peak_memory():
    """The peak is reset as a step starts (a step after a costly one is not charged for it); an outer
    step's peak keeps its inner steps'; the summary names the step that held the peak."""
    if not reset_peak():
        pytest.skip("the peak resident memory cannot be reset here (not Linux)")
    steps = MeasuredProgress(Progress())
    with steps.step("outer"):
        with steps.step("big"):
            block = np.ones(50_000_000)  # 400 MB, every page touched
            del block  # a large block goes back to the kernel at once
        with steps.step("small"):
            small = np.ones(1000)
            del small
    costs = {c.step: c for c in steps.costs}
    assert [c.step for c in steps.costs] == ["big", "small", "outer"]
    assert [costs[s].depth for s in ("big", "small", "outer")] == [1, 1, 0]
    assert costs["big"].peak_bytes - costs["small"].peak_bytes > 350e6
    assert costs["outer"].peak_bytes >= costs["big"].peak_bytes
    summary = steps.summary()
    assert summary["peak_step"] == "big" and summary["peak_bytes"] == max(c.peak_bytes for c in steps.costs)
    assert summary["seconds"] == costs["outer"].seconds  # inner steps are not counted twice


@pytest.mark.parametrize("available_share, refused", [(0.5, True), (1.2, False)])
def test_a_model_the_machine_cannot_hold_is_refused_before_loading(tiny_model_dir, tmp_path, run_cli, monkeypatch,
                                                                   available_share, refused):
    """A machine with less memory than the fp32 weights: one line before anything is loaded or written
    (the kernel would kill the build minutes in). With more than the weights but less than a build's
    peak: a note, and the build goes on."""
    import vlm_export.build as build

    src = tiny_model_dir("llava-llama")
    weights = fp32_weight_bytes(src)
    monkeypatch.setattr(build, "available_bytes", lambda: int(build.PROCESS_BASE_BYTES + weights * available_share))
    out = tmp_path / "out"
    if refused:
        result = run_cli("build", str(src), "--out", str(out))
        assert_one_line_error(result, "in fp32", "of memory available", "build it on a machine with about")
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    else:
        notes = []
        progress = build.Progress()
        monkeypatch.setattr(progress, "note", notes.append)
        build.check_memory(src, progress)
        assert len(notes) == 1 and "may run out of memory" in notes[0], notes
