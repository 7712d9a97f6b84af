"""Graphs whose weights live in an external data file (every graph past 1.8 GB): written page-aligned
by save_graph, and fused without loading the weights into memory (export/fuse.py reads the few it
rewrites from the file, spills the packed projections to a scratch file and copies everything into
the fused graph's own data file). The fused graph must be the one fusing in memory gives."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vlm_export.errors import ExportError
from vlm_export.export import graph_info
from vlm_export.export.fuse import fuse_decoder
from vlm_export.export.graph_info import EXTERNAL_DATA_ALIGNMENT, read_tensor, save_graph, uses_external_data


def _external_copy(src: Path, dst: Path) -> Path:
    """``src`` re-saved by onnx itself with every tensor of 1 KB or more in ``<name>.data``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load(os.fspath(src)), os.fspath(dst), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=dst.name + ".data", size_threshold=1024)
    return dst


def _step_feeds(session: ort.InferenceSession, past: int = 5, new: int = 3) -> dict[str, np.ndarray]:
    """A decode call with ``past`` cached positions and ``new`` tokens, random values."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        dims = {"batch": 1, "sequence": new, "total_sequence": past + new, "past_sequence": past, "image_tokens": 2}
        shape = [d if isinstance(d, int) else dims.get(d, past) for d in i.shape]
        if i.name == "attention_mask":
            feeds[i.name] = np.ones(shape, np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + new, dtype=np.int64)[None]
        elif "int" in i.type:
            feeds[i.name] = rng.integers(0, 8, shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(path: Path, feeds=None):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = feeds or _step_feeds(session)
    return session.run(None, feeds), feeds


def _assert_same_tensors(got: Path, want: Path) -> None:
    """The graphs at ``got`` and ``want`` hold the same initializers, value for value, wherever each
    keeps its bytes (in the graph or in its data file)."""
    def tensors(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(os.fspath(path), load_external_data=False)
        return {t.name: read_tensor(t, path.parent) for t in model.graph.initializer}

    a, b = tensors(got), tensors(want)
    assert set(a) == set(b)
    for name, value in b.items():
        np.testing.assert_array_equal(a[name], value, err_msg=name)


@pytest.fixture(scope="module")
def decoder(tiny_build) -> Path:
    build = tiny_build("llava-llama").path
    return build / "graphs" / "lm_decoder.onnx"


def test_a_decoder_with_external_weights_fuses_to_the_in_memory_result(decoder, tmp_path, monkeypatch):
    external = _external_copy(decoder, tmp_path / "src" / "lm_decoder.onnx")
    in_memory, streamed = tmp_path / "a" / "fused.onnx", tmp_path / "b" / "fused.onnx"
    # under the threshold the fused graph is one file, as the in-memory pass writes it
    one_file = fuse_decoder(external, tmp_path / "c" / "fused.onnx")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["fused.onnx"]
    monkeypatch.setattr(graph_info, "EXTERNAL_DATA_THRESHOLD", 1000)  # as a decoder past 1.8 GB is written
    assert fuse_decoder(external, streamed).fusions == one_file.fusions
    monkeypatch.undo()
    assert fuse_decoder(decoder, in_memory).fusions == one_file.fusions
    # the streamed one keeps its weights outside the graph, in its own file, nothing left behind
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    model = onnx.load(os.fspath(streamed), load_external_data=False)
    big = [t for t in model.graph.initializer if uses_external_data(t)]
    assert len(big) > 10 and all(e.value == "fused.onnx.data" for t in big for e in t.external_data if e.key == "location")
    offsets = [int(e.value) for t in big for e in t.external_data if e.key == "offset"]
    assert all(o % EXTERNAL_DATA_ALIGNMENT == 0 for o in offsets)  # ONNX Runtime can map each tensor
    # every weight equals the in-memory fused graph's, and so do the answers
    _assert_same_tensors(tmp_path / "c" / "fused.onnx", in_memory)
    _assert_same_tensors(streamed, in_memory)
    want, feeds = _run(in_memory)
    got, _ = _run(streamed, feeds)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    # the source graph and its data are untouched
    np.testing.assert_array_equal(_run(external, feeds)[0][0], _run(decoder, feeds)[0][0])


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_weight_only_reads_an_external_decoder_one_weight_at_a_time(decoder, tmp_path, monkeypatch, rounding):
    """w4 of a decoder kept in an external data file: its fp32 weights are never loaded whole (onnx's
    loader of external data is not called; each weight is read from the file when it is quantized,
    the rest copied file to file), and the result is the in-memory conversion's, tensor for tensor."""
    from vlm_export.precision.convert import PrecisionOptions, to_weight_only

    external = _external_copy(decoder, tmp_path / "src" / "lm_decoder.onnx")
    session = ort.InferenceSession(os.fspath(decoder), providers=["CPUExecutionProvider"])
    feeds = [_step_feeds(session, past=p, new=n) for p, n in ((0, 6), (3, 4))]
    options = PrecisionOptions(weight_rounding=rounding)
    in_memory = to_weight_only(decoder, tmp_path / "a" / "w4.onnx", 4, options, feeds)

    def whole(*args, **kwargs):
        raise AssertionError("the decoder's external data was loaded whole")

    monkeypatch.setattr(onnx, "load_external_data_for_model", whole)
    streamed = to_weight_only(external, tmp_path / "b" / "w4.onnx", 4, options, feeds)
    monkeypatch.undo()
    assert streamed.details == in_memory.details and streamed.details["rounding"]["method"] == rounding
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["w4.onnx"]  # it fits in one file
    _assert_same_tensors(tmp_path / "b" / "w4.onnx", tmp_path / "a" / "w4.onnx")
    want, _ = _run(tmp_path / "a" / "w4.onnx", feeds[0])
    got, _ = _run(tmp_path / "b" / "w4.onnx", feeds[0])
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


class _LinearInBf16(torch.nn.Module):
    """Two weights big enough for the data file, and bfloat16 arithmetic (the export's own rewrite
    of the proto must still run when the weights never enter it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(self.a(x).bfloat16().exp().float().tanh())


def test_a_stage_past_the_threshold_is_exported_without_copying_its_weights(tmp_path, monkeypatch):
    """Past the 2 GB limit an export writes the module's tensors straight to the data file, one at a
    time: the in-memory proto of the whole graph (``ONNXProgram.model_proto``, a copy of every weight)
    is never made, and the graph is the one the in-memory path writes."""
    from vlm_export.adapters.base import Stage
    from vlm_export.contract import IMAGE, StageSpec, TensorSpec
    from vlm_export.export.onnx_export import export_stage

    spec = StageSpec("toy", IMAGE, (TensorSpec("x", "float32", ("rows", 64)),),
                     (TensorSpec("y", "float32", ("rows", 64)),))
    stage = Stage(spec, _LinearInBf16(), (torch.ones(2, 64),))
    one_file = export_stage(stage, tmp_path / "a")
    assert sorted(p.name for p in one_file.parent.iterdir()) == ["toy.onnx"]

    def whole_proto(self):
        raise AssertionError("the whole graph was made in memory")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "model_proto", property(whole_proto))
    monkeypatch.setattr(graph_info, "EXTERNAL_DATA_THRESHOLD", 1000)
    streamed = export_stage(stage, tmp_path / "b")
    monkeypatch.undo()
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["toy.onnx", "toy.onnx.data"]
    model = onnx.load(os.fspath(streamed), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    assert len(external) == 2  # the two 64 x 64 weights; the biases (256 bytes) stay in the graph
    assert all(int(e.value) % EXTERNAL_DATA_ALIGNMENT == 0 for t in external for e in t.external_data
               if e.key == "offset")
    _assert_same_tensors(streamed, one_file)
    x = {"x": np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)}
    want, got = _run(one_file, x)[0][0], _run(streamed, x)[0][0]
    np.testing.assert_array_equal(got, want)  # bfloat16 computed in fp32 by both, same dims
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["rows", ""]


def test_large_graphs_are_saved_with_page_aligned_external_data(decoder, tmp_path, monkeypatch):
    """Past the threshold the weights leave the proto - counted from the tensors, not by protobuf
    serialising the whole model (ModelProto.ByteSize), which peaks at ~4x the model's size."""
    model = onnx.load(os.fspath(decoder))
    assert graph_info.weight_bytes(model) > 0.9 * decoder.stat().st_size
    monkeypatch.setattr(graph_info, "EXTERNAL_DATA_THRESHOLD", graph_info.weight_bytes(model) - 1)
    path = save_graph(model, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size > path.stat().st_size * 5
    want, feeds = _run(decoder)
    for a, b in zip(want, _run(path, feeds)[0]):
        np.testing.assert_array_equal(a, b)
    # saving again over the graph whose data it reads would destroy them: refused
    reloaded = onnx.load(os.fspath(path), load_external_data=False)
    with pytest.raises(ExportError, match="would overwrite the external data its own weights are read from"):
        save_graph(reloaded, path, source_dir=tmp_path)
    assert data.stat().st_size > path.stat().st_size * 5


def test_graphs_below_the_threshold_are_one_file_written_one_tensor_at_a_time(decoder, tmp_path):
    """One file, without protobuf serialising the whole model (~5x its weights in memory): the model
    without its initializers, then each initializer as an occurrence of the graph field of its own,
    which onnx, ONNX Runtime and the checker merge back into the same model."""
    model = onnx.load(os.fspath(decoder))
    model.metadata_props.add(key="written", value="after the graph field")  # a field numbered past it
    path = save_graph(model, tmp_path / "one.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx"]
    again = onnx.load(os.fspath(path))
    assert again == model and len(again.graph.initializer) > 10
    assert again.SerializeToString() == model.SerializeToString()  # the same canonical bytes once merged
    onnx.checker.check_model(os.fspath(path), full_check=True)
    want, feeds = _run(decoder)
    for a, b in zip(want, _run(path, feeds)[0]):
        np.testing.assert_array_equal(a, b)


def test_a_truncated_data_file_is_one_clear_error(decoder, tmp_path):
    external = _external_copy(decoder, tmp_path / "src" / "lm_decoder.onnx")
    data = external.with_name(external.name + ".data")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(ExportError, match="ends before tensor"):
        fuse_decoder(external, tmp_path / "out" / "fused.onnx")
    assert not (tmp_path / "out" / "fused.onnx.spill").exists()
