"""One preallocated KV buffer written in place (contract.scheme.SlotBatch): the fused decoder graph
reads each row's length from the attention mask, so its past and present can be one buffer bound
through IO binding; the scheduler keeps its running rows in slots of it. Real tiny builds on ONNX
Runtime: the answers equal the path that copies the cache every step (DecodeBatch)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from vlm_export.contract.scheme import KV_IN_PLACE, DecodeBatch, SlotBatch
from vlm_export.errors import RunnerError
from vlm_export.runtime.generate import GenerationConfig, GenerationResult, Scheduler
from vlm_export.runtime.load import open_build
from vlm_export.runtime.runners import OrtRunner


@pytest.fixture(scope="module")
def pipe(tiny_build):
    return open_build(tiny_build("llava-llama").path, threads=2)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 1000, n).tolist() for n in lengths]


def _run(pipe, prompts, new_tokens, kv_in_place, max_batch, **kw):
    """Every request through one scheduler: (token ids per request, the logits of every step, the
    (slot, row id) pairs the slot path used, the most slots its buffer had)."""
    s = Scheduler(pipe, max_batch=max_batch, kv_in_place=kv_in_place, **kw)
    assert s.kv_in_place is kv_in_place
    ids = [s.submit(p, pipe.scheme.empty_image_input(), GenerationConfig(max_new_tokens=n, ignore_eos=True))
           for p, n in zip(prompts, new_tokens)]
    tokens, logits, tenants, slots = {}, [], set(), 0
    while not s.idle:
        for row, event in s.step():
            assert not isinstance(event, Exception), event
            if isinstance(event, GenerationResult):
                tokens[row] = event.token_ids
        if s.logits is not None:
            logits.append(s.logits.copy())
        if isinstance(s.batch, SlotBatch):
            tenants |= {(int(slot), row.id) for slot, row in zip(s.batch.slots, s.running)}
            slots = max(slots, len(s.batch.lengths))
    return [tokens[i] for i in ids], logits, tenants, slots


def _in_place_equals_copying(pipe, prompts, new_tokens) -> tuple[set, int]:
    """Every request through the in-place scheduler and the copying one (3 rows at most, prompts left-padded into
    one prefill): the same greedy tokens and every step's logits. Returns the in-place run's (slot, row id) pairs
    and the most slots its buffer had."""
    runs = {mode: _run(pipe, prompts, new_tokens, mode, max_batch=3, max_prefill_padding=1.0)
            for mode in (False, True)}
    (tokens, logits, _, _), (in_place_tokens, in_place_logits, tenants, slots) = runs[False], runs[True]
    assert in_place_tokens == tokens and [len(t) for t in tokens] == list(new_tokens)
    assert len(in_place_logits) == len(logits)
    for step, (want, got) in enumerate(zip(logits, in_place_logits)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"step {step}")
    return tenants, slots


def test_the_fused_graph_runs_in_place_and_the_standard_one_does_not(tiny_build, pipe, tmp_path):
    build = tiny_build("llava-llama")
    graphs = build.manifest["graphs"]["lm_decoder"]
    fused = onnx.load(build.path / graphs["forms"]["fused"]["file"], load_external_data=False)
    assert {p.key: p.value for p in fused.metadata_props}.get(KV_IN_PLACE) == "1"
    assert pipe.kv_in_place and pipe.decoder.kv_in_place
    # the standard graph (TensorRT's) and a fused graph without the mark (older builds) keep the copying path
    assert not open_build(build.path, threads=2, form="standard").kv_in_place
    del fused.metadata_props[:]
    onnx.save(fused, tmp_path / "unmarked.onnx")
    assert not OrtRunner("lm_decoder", tmp_path / "unmarked.onnx", threads=1).kv_in_place


def test_one_step_writes_each_row_at_its_own_length(pipe):
    """The kernel contract the slot path relies on (ONNX Runtime 1.32's GroupQueryAttention, CPU):
    past and present bound to one buffer are written in place, row b's new K/V at column length_b
    only, its attention over [0, length_b] only (stale columns after it are never read), an idle
    slot (all-zero mask) left as it is. Its logits equal the copying path's on the same caches."""
    scheme = pipe.scheme
    prompts = _prompts((9, 4))
    _, state = pipe.prefill_batch(prompts, [scheme.empty_image_input()] * 2)
    slots = SlotBatch.empty().join(state, reserve=[64, 64])
    slots = slots.join(pipe.prefill_batch(_prompts((6,), 1), [scheme.empty_image_input()])[1], reserve=[64])
    slots = slots.keep([0, 2])  # slot 1 is idle: its row left
    rng = np.random.default_rng(0)
    for name, buffer in slots.caches.items():  # stale values after every row's length and in the idle slot
        for slot, length in enumerate(slots.lengths):
            buffer[slot, :, length:] = rng.standard_normal(buffer[slot, :, length:].shape)
    before = {n: b.copy() for n, b in slots.caches.items()}
    tokens = np.array([11, 12])
    first_feeds = scheme.slot_step_feeds(slots, tokens)
    out, bound = pipe.decode_in_place(first_feeds)

    reference = state.keep([0])  # the same rows on the copying path: row 0 of the first prefill, then the third
    third = pipe.prefill_batch(_prompts((6,), 1), [scheme.empty_image_input()])[1]
    reference = reference.join(third)
    want = pipe.decode(scheme.step_feeds(reference, tokens))
    np.testing.assert_allclose(out["logits"][slots.slots, -1], scheme.next_logits(want), atol=1e-5, rtol=0)
    present = dict(zip(scheme.past_names, scheme.present_names))
    for name, buffer in slots.caches.items():
        for row, slot in enumerate(slots.slots):
            length = slots.lengths[slot]
            np.testing.assert_array_equal(buffer[slot, :, :length], before[name][slot, :, :length])
            np.testing.assert_allclose(buffer[slot, :, length], want[present[name]][row, :, -1], atol=1e-5)
            np.testing.assert_array_equal(buffer[slot, :, length + 1:], before[name][slot, :, length + 1:])
        np.testing.assert_array_equal(buffer[1], before[name][1])  # the idle slot
    # the next step on the same buffers reuses their binding and still writes them in place, and
    # its other tokens reach the decoder; the previous call's feed arrays are left as they were
    slots = slots.advanced(bound)
    next_tokens = np.array([13, 14])
    again, rebound = pipe.decode_in_place(scheme.slot_step_feeds(slots, next_tokens), slots.bound)
    assert rebound is bound
    want = pipe.decode(scheme.step_feeds(scheme.advance(reference, want), next_tokens))
    np.testing.assert_allclose(again["logits"][slots.slots, -1], scheme.next_logits(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(first_feeds["input_ids"][slots.slots, 0], tokens)


def test_scheduler_in_place_equals_the_copying_path(pipe):
    """Greedy tokens and every step's logits equal the copying path's: three prompts of different
    lengths left-padded into one prefill, two rows joining mid-generation into the slots of rows
    that left (never more slots than max_batch), and a row that runs its buffer to the build's
    max_sequence (prompt + max new tokens = 256)."""
    max_sequence = pipe.limits.max_sequence
    prompts = _prompts((11, 4, 7, 9, max_sequence - 40))
    new_tokens = (12, 5, 9, 7, 40)
    tenants, slots = _in_place_equals_copying(pipe, prompts, new_tokens)
    assert slots == 3  # the buffer never grew past max_batch rows
    rows_per_slot = {}
    for slot, row in tenants:
        rows_per_slot.setdefault(slot, set()).add(row)
    assert max(len(r) for r in rows_per_slot.values()) >= 2, tenants  # a slot was reused


def test_cancel_frees_a_slot_for_the_next_row(pipe):
    s = Scheduler(pipe, max_batch=2, kv_in_place=True)
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    first, second, third = (s.submit(p, pipe.scheme.empty_image_input(), config) for p in _prompts((5, 8, 6)))
    s.step()
    s.step()
    assert isinstance(s.batch, SlotBatch) and s.batch.rows == 2 and third in [r.id for r in s.queued]
    slot_of = {row.id: int(slot) for row, slot in zip(s.running, s.batch.slots)}
    freed = slot_of[first]
    assert s.cancel(first)
    s.step()  # the third row joins into the freed slot, the buffer stays at two slots
    assert [r.id for r in s.running] == [second, third]
    assert list(s.batch.slots) == [slot_of[second], freed] and len(s.batch.lengths) == 2


def test_slot_batch_join_keep_and_growth():
    """numpy only: a prefill's right-aligned rows (holes included) land left-aligned in free slots,
    a leaving row frees its slot, and growing (more rows, a longer reserve) keeps every row's values."""
    rng = np.random.default_rng(0)
    mask = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 1]])  # the third row has a hole
    cache = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    state = DecodeBatch({"k": cache}, mask, mask.sum(axis=1), growing=("k",))
    slots = SlotBatch.empty().join(state, reserve=[10, 10, 10])
    assert slots.capacity == SlotBatch.CAPACITY_STEP and list(slots.slots) == [0, 1, 2]
    assert list(slots.positions) == [3, 2, 3]
    np.testing.assert_array_equal(slots.caches["k"][2, :, :3], cache[2][:, [0, 2, 3]])
    np.testing.assert_array_equal(slots.step_mask(), [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    slots = slots.keep([2, 0])
    assert list(slots.slots) == [2, 0] and list(slots.lengths) == [3, 0, 3]
    np.testing.assert_array_equal(slots.step_mask(), [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(slots.by_slot(np.array([7, 9]), -1), [9, -1, 7])
    kept = slots.caches["k"][[2, 0], :, :3].copy()
    # two rows join: one into the free slot 1, one into a new slot 3; the longer reserve grows the capacity
    more = DecodeBatch({"k": cache[:2]}, mask[:2], mask[:2].sum(axis=1), growing=("k",))
    grown = slots.join(more, reserve=[100, 5])
    assert list(grown.slots) == [2, 0, 1, 3] and grown.capacity == 2 * SlotBatch.CAPACITY_STEP
    np.testing.assert_array_equal(grown.caches["k"][[2, 0], :, :3], kept)
    np.testing.assert_array_equal(grown.caches["k"][3, :, :2], cache[1][:, 2:])
    # rows whose positions run behind their columns (M-RoPE's images) keep that offset through the steps
    behind = SlotBatch.empty().join(DecodeBatch({"k": cache}, mask, np.array([1, 2, 4]), growing=("k",)), [10] * 3)
    assert list(behind.positions) == [1, 2, 4] and list(behind.lengths[behind.slots]) == list(mask.sum(axis=1))
    assert list(behind.advanced().keep([2, 0]).positions) == [5, 2]
    np.testing.assert_array_equal(behind.step_mask().sum(axis=1), mask.sum(axis=1)[np.argsort(behind.slots)] + 1)


def test_fixed_state_is_kept_per_slot():
    """numpy only: state that does not grow (a cross-attention scheme's image K/V, padded along its
    own axis) follows its row into a slot; a later row with a wider one widens every slot with zeros
    (the scheme's masks hide them), a new slot gets its own, and the growing buffers stay as they were."""
    rng = np.random.default_rng(1)
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    k = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    image_kv = rng.standard_normal((2, 5, 6)).astype(np.float32)  # [rows, images x tokens, ...]: axis 1 padded
    state = DecodeBatch({"k": k, "x": image_kv}, mask, mask.sum(axis=1), growing=("k",), padded={"x": 1})
    slots = SlotBatch.empty().join(state, reserve=[8, 8])
    assert set(slots.growing_buffers) == {"k"} and slots.capacity == SlotBatch.CAPACITY_STEP
    np.testing.assert_array_equal(slots.caches["x"], image_kv)
    slots = slots.keep([1])  # slot 0 is free again
    wider = rng.standard_normal((2, 9, 6)).astype(np.float32)
    more = DecodeBatch({"k": k, "x": wider}, mask, mask.sum(axis=1), growing=("k",), padded={"x": 1})
    joined = slots.join(more, reserve=[8, 8])
    assert list(joined.slots) == [1, 0, 2] and joined.caches["x"].shape == (3, 9, 6)
    np.testing.assert_array_equal(joined.caches["x"][1, :5], image_kv[1])
    assert not joined.caches["x"][1, 5:].any()
    np.testing.assert_array_equal(joined.caches["x"][[0, 2]], wider)
    np.testing.assert_array_equal(joined.caches["k"][1, :, :3], k[1])
    assert joined.position_nbytes == k[0].nbytes // 3 and set(joined.row_caches(0)) == {"k"}
    with pytest.raises(ValueError, match="cannot join"):
        joined.join(DecodeBatch({"k": k}, mask, mask.sum(axis=1), growing=("k",)), reserve=[8, 8])


def test_in_place_buffers_must_be_contiguous(pipe):
    scheme = pipe.scheme
    _, state = pipe.prefill_batch(_prompts((5,)), [scheme.empty_image_input()])
    slots = SlotBatch.empty().join(state, reserve=[16])
    feeds = scheme.slot_step_feeds(slots, np.array([3]))
    name = scheme.past_names[0]
    feeds[name] = np.asfortranarray(feeds[name])
    with pytest.raises(RunnerError, match="writeable C-contiguous"):
        pipe.decode_in_place(feeds)


def test_kv_shared_layers_in_place_equal_the_copying_path(tiny_build):
    """Gemma 4's KV-shared layers read the K/V their producers' kernels write (export/attention_fuse.py's
    readers): on one buffer of slots, rows of different lengths - longer than the 8-token window of the sliding
    layers - joining as others leave give the copying path's tokens and logits at every step."""
    pipe = open_build(tiny_build("gemma4-causal").path, threads=2)
    assert pipe.kv_in_place
    prompts = _prompts((23, 5, 14, 31, 9), seed=1)
    new_tokens = (10, 4, 12, 6, 9)
    tenants, _ = _in_place_equals_copying(pipe, prompts, new_tokens)
    assert len({row for _, row in tenants}) == len(prompts)


@pytest.mark.parametrize("window", [None, 3])
def test_a_shared_layers_mask_is_made_row_by_row(window):
    """The mask a KV-shared layer reads on the shared buffer (``attention_fuse._row_bias``), run by ONNX Runtime:
    row b's query i sits at column T_b - sequence + i (T_b its last real column + 1) and sees the real keys at or
    before it, within the window; an idle slot (no real column) sees nothing."""
    import onnxruntime as ort
    from onnx import helper

    from vlm_export.export.attention_fuse import _row_bias

    mask = np.array([[1, 1, 0, 1, 1, 1, 0, 0],    # a hole, T = 6
                     [0, 0, 1, 1, 1, 1, 1, 1],    # left padding, T = 8
                     [0, 0, 0, 0, 0, 0, 0, 0]],   # an idle slot
                    np.int64)
    sequence = 2
    nodes, bias = _row_bias("attention_mask", "q", window, np.float32, "test")
    graph = helper.make_graph(nodes, "row_bias", [
        helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, ["batch", 4, "sequence", 8])],
        [helper.make_tensor_value_info(bias, onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)  # a decoder's
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"attention_mask": mask, "q": np.zeros((3, 4, sequence, 8), np.float32)})[0]
    assert got.shape == (3, 1, sequence, 8)
    for b, row in enumerate(mask):
        total = max((j + 1 for j in range(8) if row[j]), default=0)
        for i in range(sequence):
            column = total - sequence + i
            seen = [bool(row[j]) and 0 <= column - j < (window or 99) for j in range(8)]
            assert [v == 0 for v in got[b, 0, i]] == seen, (b, i)
            assert all(v == np.finfo(np.float32).min for v, s in zip(got[b, 0, i], seen) if not s)
