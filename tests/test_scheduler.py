"""The step scheduler over a batch of sequences: the state's layout (rows aligned on the right,
masked padding on the left), a padded batch step equal to each row stepping alone, and batched
generation equal to one-at-a-time generation."""
from __future__ import annotations

import numpy as np
import pytest

from vlm_export.contract import DecodeBatch
from vlm_export.errors import InputError
from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, Scheduler, generate, generate_batch
from vlm_export.runtime.load import open_build


def _batch(rows: int, length: int, fill: float) -> DecodeBatch:
    cache = np.full((rows, 2, length, 3), fill, dtype=np.float32)
    return DecodeBatch({"k": cache}, np.ones((rows, length), np.int64), np.full(rows, length, np.int64), ("k",))


def test_decode_batch_aligns_rows_on_the_right_and_trims_on_leave():
    joined = _batch(1, 5, 1.0).join(_batch(2, 2, 2.0))
    assert joined.rows == 3 and joined.length == 5
    assert joined.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    assert joined.positions.tolist() == [5, 2, 2]
    assert (joined.caches["k"][1, :, :3] == 0).all() and (joined.caches["k"][1, :, 3:] == 2).all()
    short = joined.keep([2, 1])  # the long row left: its columns go with it
    assert short.length == 2 and short.mask.tolist() == [[1, 1], [1, 1]]
    assert short.caches["k"].shape == (2, 2, 2, 3) and (short.caches["k"] == 2).all()


@pytest.fixture(scope="module")
def pipe(tiny_build):
    return open_build(tiny_build("llava-llama").path)


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    from PIL import Image

    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("chelsea", "coffee")]


def test_padded_batch_step_equals_each_row_alone(pipe, photos):
    """Rows of different lengths in one decode step (left-padded, masked) give each row the
    logits and cache it gets alone."""
    scheme = pipe.scheme
    long_ids = pipe.prompt_ids("Describe this picture in detail, please.", 1)
    short_ids = pipe.prompt_ids("Hi", 0)
    image = pipe.encode_images(pipe.pixel_values(photos[:1]))
    _, a = pipe.prefill(long_ids, image)
    _, b = pipe.prefill(short_ids, scheme.empty_image_input())
    tokens = np.array([11, 12])
    together = pipe.decode(scheme.step_feeds(a.join(b), tokens))
    for row, state in enumerate((a, b)):
        alone = pipe.decode(scheme.step_feeds(state, tokens[row:row + 1]))
        np.testing.assert_allclose(scheme.next_logits(together)[row], scheme.next_logits(alone)[0], atol=1e-4)
        width = state.length + 1  # the row's real columns are the last ones of the padded batch
        np.testing.assert_allclose(together["present.1.key"][row, :, -width:], alone["present.1.key"][0], atol=1e-5)


def test_batch_generation_equals_one_at_a_time(pipe, photos):
    greedy = GenerationConfig(max_new_tokens=12)
    requests = [
        GenerationRequest("What animal is in the picture?", (photos[0],), greedy),
        GenerationRequest("Write a short story about a robot who learns to paint.", (), GenerationConfig(max_new_tokens=20)),
        GenerationRequest("What is in the cup?", (photos[1],), GenerationConfig(max_new_tokens=5)),
        GenerationRequest("What do these two pictures have in common?", tuple(photos),
                          GenerationConfig(max_new_tokens=16, temperature=1.2, seed=3)),
        GenerationRequest("Hi", (), GenerationConfig(max_new_tokens=9, stop=("e",))),
        GenerationRequest("Name a colour.", (photos[1],), greedy),
    ]
    alone = [generate(pipe, r.prompt, r.images, r.config) for r in requests]
    finished = []
    batched = generate_batch(pipe, requests, max_batch=3, on_result=lambda i, r: finished.append(i))
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [(r.text, r.finish_reason, r.prompt_tokens) for r in batched] == \
        [(r.text, r.finish_reason, r.prompt_tokens) for r in alone]
    assert sorted(finished) == list(range(len(requests))) and finished != sorted(finished)  # rows left as they ended


def test_scheduler_keeps_to_max_batch_and_checks_requests_up_front(pipe):
    scheduler = Scheduler(pipe, max_batch=2)
    for prompt in ("One", "Two", "Three"):
        scheduler.submit(pipe.prompt_ids(prompt, 0), pipe.scheme.empty_image_input(), GenerationConfig(max_new_tokens=4))
    scheduler.step()
    assert len(scheduler.running) == 2 and len(scheduler.queued) == 1 and scheduler.batch.rows == 2
    list(scheduler.run())
    assert scheduler.idle and scheduler.batch is None
    with pytest.raises(InputError, match="image placeholders"):
        scheduler.submit(pipe.prompt_ids("Look", 1), pipe.scheme.empty_image_input(), GenerationConfig())
    with pytest.raises(InputError, match="max_sequence"):
        generate_batch(pipe, [GenerationRequest("Hi"), GenerationRequest("Hi", (), GenerationConfig(max_new_tokens=4000))])
