"""The step scheduler over a batch of sequences: the state's layout (rows aligned on the right,
masked padding on the left), a padded batch step equal to each row stepping alone, and batched
generation equal to one-at-a-time generation."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from vlm_export.contract import DecodeBatch
from vlm_export.errors import InputError, RunnerError
from vlm_export.runtime.generate import (DEFAULT_MAX_PREFILL_PADDING, GenerationConfig, GenerationRequest,
                                        GenerationResult, Scheduler, TokenEvent, generate, generate_batch,
                                        generate_ids, prepare_request)
from vlm_export.runtime.load import open_build
from conftest import a_word_spelt_in, pipeline_failing_on, recorded_notes  # noqa: E402


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


# ---- batched prefill: new prompts of different lengths, left-padded, in ONE decoder call ----------
MIXED = [("Describe this picture in detail, please, and name every colour you see.", 1),
         ("Hi", 0),
         ("What do these two pictures have in common?", 2),
         ("Write a short story about a robot who learns to paint.", 0)]


def _mixed_requests(pipe, photos):
    """(prompt ids, image input) for prompts of different lengths, with and without images."""
    return [prepare_request(pipe, prompt, photos[:min(n, pipe.limits.max_images)], GenerationConfig(max_new_tokens=6))
            for prompt, n in MIXED]


@pytest.mark.parametrize("name", ["llava-llama", "prefix-llama", "blip2-opt", "instructblip-llama"])
def test_batched_left_padded_prefill_equals_one_by_one(tiny_build, photos, name):
    """One prefill call for four prompts of different lengths (images mixed in) gives every row
    the logits, cache and greedy tokens it gets alone, and the padding's cache slots hold zeros."""
    pipe = open_build(tiny_build(name).path)
    requests = _mixed_requests(pipe, photos)
    lengths = [len(ids) for ids, _ in requests]
    assert len(set(lengths)) == len(lengths)  # really different lengths: padding in every row but the longest
    logits, state = pipe.prefill_batch([ids for ids, _ in requests], [image for _, image in requests])
    assert state.rows == 4 and state.length == max(lengths) and state.positions.tolist() == lengths
    assert state.mask.sum(axis=1).tolist() == lengths
    for name_ in state.growing:
        cache = state.caches[name_]
        assert np.isfinite(cache).all()
        assert (cache[np.broadcast_to((state.mask == 0)[:, None, :, None], cache.shape)] == 0).all()
    for row, (ids, image) in enumerate(requests):
        alone_logits, alone = pipe.prefill(ids, image)
        np.testing.assert_allclose(logits[row], alone_logits, atol=1e-4)
        own = state.keep([row])  # this row's columns only: the shape it has alone
        assert own.mask.tolist() == alone.mask.tolist() and own.positions.tolist() == alone.positions.tolist()
        for cache in alone.caches:
            np.testing.assert_allclose(own.caches[cache], alone.caches[cache], atol=1e-5)

    greedy = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    scheduler = Scheduler(pipe, max_batch=4, max_prefill_padding=1.0)  # any padding: one call
    rows = [scheduler.submit(ids, image, greedy) for ids, image in requests]
    together = {row: e.token_ids for row, e in scheduler.run_raising() if isinstance(e, GenerationResult)}
    assert scheduler.prefill_calls == 1
    assert [together[row] for row in rows] == [generate_ids(pipe, ids, image, greedy) for ids, image in requests]


def test_prefill_keeps_to_its_token_and_padding_bounds(pipe, photos):
    """A step admits prompts up to ``max_prefill_tokens`` (the rest wait for a later step) and
    prefills them longest first, in calls at most ``max_prefill_padding`` padding; the answers do
    not change."""
    requests = _mixed_requests(pipe, photos)
    lengths = [len(ids) for ids, _ in requests]  # 62, 31, 72, 42 with this tokenizer
    bound = sum(lengths[:3])  # the first three fit in one step, the fourth waits
    calls = []

    class Recording(Scheduler):  # the real scheduler, noting the prompt lengths of each prefill call
        def _prefill(self, group):
            calls.append([len(r.prompt_ids) for r in group])
            super()._prefill(group)

    config = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    scheduler = Recording(pipe, max_batch=4, max_prefill_tokens=bound)
    assert scheduler.max_prefill_padding == DEFAULT_MAX_PREFILL_PADDING == 0.15
    rows = [scheduler.submit(ids, image, config) for ids, image in requests]
    scheduler.step()
    assert len(scheduler.running) == 3 and len(scheduler.queued) == 1
    # longest first: 72 and 62 share a call (7% padding); 31 more would make it 24%, so it goes alone
    assert calls == [[lengths[2], lengths[0]], [lengths[1]]]
    for call in calls:
        assert len(call) * max(call) - sum(call) <= 0.15 * len(call) * max(call)
    results = {row: e.token_ids for row, e in scheduler.run_raising() if isinstance(e, GenerationResult)}
    assert calls[2:] == [[lengths[3]]] and scheduler.prefill_calls == 3
    assert [results[row] for row in rows] == [generate_ids(pipe, ids, image, config) for ids, image in requests]
    for bad in ({"max_prefill_tokens": 0}, {"max_prefill_padding": 1.5}):
        with pytest.raises(InputError, match="max_prefill"):
            Scheduler(pipe, **bad)


def test_a_failing_batched_prefill_ends_only_the_row_at_fault(pipe):
    """The batched call fails (an injected fault around the real runner on one prompt): its rows
    are prefilled one by one, the faulty one ends with the error, the others run."""
    faulty = pipeline_failing_on(pipe)
    scheduler = Scheduler(faulty, max_batch=3, max_prefill_padding=1.0)
    config = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    none = pipe.scheme.empty_image_input()
    good = [scheduler.submit(pipe.prompt_ids(p, 0), none, config) for p in ("Tell me a story.", "Hi")]
    bad = scheduler.submit(pipe.prompt_ids("poison", 0), none, config)
    events = {row: e for row, e in scheduler.run() if not isinstance(e, TokenEvent)}
    assert scheduler.prefill_calls == 4  # the batch of three, then each alone
    assert isinstance(events[bad], RunnerError) and "injected" in str(events[bad])
    assert all(isinstance(events[row], GenerationResult) and events[row].completion_tokens == 5 for row in good)


def test_a_sliding_window_decoder_batches_rows_of_any_length(tiny_build, photos):
    """The exporter folds a sliding window into the mask by physical column, counted back from the
    widest row's last one: right on the growing cache (every row's newest token is that column),
    wrong on the shared buffer, where a shorter row ends earlier. The fused decoder applies the
    window in its attention kernel instead, counted back from each row's own length, so it keeps the
    shared buffer, and rows of different lengths (longer than the window) batched give their answers
    alone (they did not when the shared buffer read the exported mask); the build's parity held
    those answers to Hugging Face's generate."""
    import onnx

    from vlm_export.contract.scheme import KV_IN_PLACE
    from vlm_export.manifest import read_manifest

    path = tiny_build("llava-gemma3").path  # a 16-position window on its first layer
    manifest = read_manifest(path)
    assert manifest["scheme"]["geometry"]["sliding_window"] == 16
    assert manifest["scheme"]["geometry"]["windowed_layers"] == [0]
    fused = manifest["graphs"]["lm_decoder"]["forms"]["fused"]["file"]
    assert KV_IN_PLACE in {p.key for p in onnx.load(str(path / fused), load_external_data=False).metadata_props}
    assert "1 of 2 attentions apply their sliding window of 16 tokens in the kernel (local_window_size)" \
        in manifest["graphs"]["lm_decoder"]["fusion"]["notes"]
    assert not manifest["parity"]["failures"]
    pipe = open_build(path)
    requests = [GenerationRequest("What animal is in the picture? Answer in one long sentence.", (photos[0],),
                                  GenerationConfig(max_new_tokens=24)),
                GenerationRequest("Write a short story about a robot who learns to paint.", (),
                                  GenerationConfig(max_new_tokens=24)),
                GenerationRequest("Hi", (), GenerationConfig(max_new_tokens=24))]
    alone = [generate(pipe, r.prompt, r.images, r.config) for r in requests]
    lengths = [r.prompt_tokens for r in alone]
    assert len(set(lengths)) == 3 and max(lengths) - min(lengths) > 16  # the widest row ends past the others' windows
    assert [r.token_ids for r in generate_batch(pipe, requests, max_batch=3)] == [r.token_ids for r in alone]


@pytest.mark.parametrize("penalty, ngram", [(1.3, 0), (0.8, 0), (1.0, 1), (1.0, 2), (1.2, 3)])
def test_the_samplers_penalty_and_ngram_ban_are_hugging_faces(penalty, ngram):
    """The repetition penalty and the no-repeat n-gram rule give, step after step, the logits Hugging
    Face's own logits processors give over the same ids (a prompt with repeats, then each token picked)."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from vlm_export.runtime.generate import Sampler

    rng = np.random.default_rng(0)
    vocab = 12
    context = [3, 5, 3, 5, 7, 1, 3]
    sampler = Sampler(GenerationConfig(repetition_penalty=penalty, no_repeat_ngram_size=ngram), context)
    processors = ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []) + \
        ([NoRepeatNGramLogitsProcessor(ngram)] if ngram else [])
    ids = list(context)
    for _ in range(10):
        logits = rng.normal(size=vocab).astype(np.float32)
        theirs = torch.from_numpy(logits.copy())[None]
        for processor in processors:
            theirs = processor(torch.tensor([ids]), theirs)
        ours = sampler._processed(logits)
        np.testing.assert_array_equal(ours, theirs[0].numpy())
        token = sampler(logits)
        assert token == int(theirs[0].argmax())
        ids.append(token)
    assert ours is not logits  # the batch's own logits are left as the decoder made them


@pytest.mark.parametrize("presence, frequency", [(0.6, 0.0), (0.0, 0.8), (1.5, -0.5), (-1.0, 0.4)])
def test_the_samplers_presence_and_frequency_penalties_are_openais(presence, frequency):
    """OpenAI's penalties as its API reference defines them (a logit less frequency x the times the token
    is in the answer so far, less presence once it is; the prompt not counted), applied after Hugging
    Face's repetition penalty as vLLM does, step after step."""
    import collections

    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from vlm_export.runtime.generate import Sampler

    rng = np.random.default_rng(1)
    vocab, context = 8, [3, 5, 3]
    sampler = Sampler(GenerationConfig(presence_penalty=presence, frequency_penalty=frequency,
                                       repetition_penalty=1.3), context)
    answer: list[int] = []
    for _ in range(16):
        logits = (rng.normal(size=vocab) * 0.5).astype(np.float32)
        expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context + answer]),
                                                         torch.from_numpy(logits.copy())[None])[0].numpy()
        for token, times in collections.Counter(answer).items():
            expected[token] -= frequency * times + presence
        np.testing.assert_allclose(sampler._processed(logits), expected, rtol=0, atol=1e-6)
        answer.append(sampler(logits))
        assert answer[-1] == int(np.argmax(expected))
    assert len(set(answer)) < len(answer)  # tokens came back, so the counts were applied, not only presence
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -2.01}, {"presence_penalty": float("nan")}):
        with pytest.raises(InputError, match=f"{next(iter(bad))} must be in \\[-2, 2\\]"):
            GenerationConfig(**bad)


def test_logprobs_are_the_decoders_log_softmax_and_stream_with_the_text(pipe, photos):
    """Each generated token's log-probability and top alternatives are the log-softmax of the logits a
    prefill of the prompt and the answer so far gives (another path than the decode steps), before the
    penalty; streamed with the events, each once, they are the result's; a stop string's tokens too."""
    from vlm_export.runtime.generate import stream

    prompt, images = "What animal is in the picture?", [photos[0]]
    greedy = generate(pipe, prompt, images, GenerationConfig(max_new_tokens=10, ignore_eos=True))
    stop = pipe.tokenizer.decode(greedy.token_ids[4:6]).strip()
    assert stop, greedy.text
    config = GenerationConfig(max_new_tokens=10, ignore_eos=True, logprobs=True, top_logprobs=3,
                              repetition_penalty=1.3, stop=(stop,))
    *events, result = stream(pipe, prompt, images, config)
    assert result.finish_reason == "stop" and result.text == generate(pipe, prompt, images, replace(
        config, logprobs=False, top_logprobs=0)).text  # asking for them changes nothing else
    assert [entry.token_id for entry in result.logprobs] == result.token_ids
    assert [entry for event in events for entry in event.logprobs] == result.logprobs
    ids, image_input = prepare_request(pipe, prompt, images, config)
    for k, entry in enumerate(result.logprobs):
        logits, _ = pipe.prefill(ids + result.token_ids[:k], image_input)
        z = logits.astype(np.float64)
        want = z - z.max() - np.log(np.exp(z - z.max()).sum())
        assert abs(entry.logprob - want[entry.token_id]) < 1e-4
        assert [t.token_id for t, _ in entry.top] == list(np.argsort(-want)[:3])
        assert np.allclose([p for _, p in entry.top], np.sort(want)[::-1][:3], atol=1e-4)
    # each token's bytes, joined, are the answer's (its text decoded alone: its characters, or U+FFFD)
    assert b"".join(bytes(entry.token.bytes) for entry in result.logprobs) == \
        pipe.tokenizer.decode(result.token_ids).encode()
    assert result.to_dict()["logprobs"][0].keys() == {"token_id", "token", "bytes", "logprob", "top_logprobs"}
    assert generate(pipe, prompt, images, GenerationConfig(max_new_tokens=3)).logprobs is None
    with pytest.raises(InputError, match="top_logprobs needs logprobs"):
        GenerationConfig(top_logprobs=2)
    with pytest.raises(InputError, match="top_logprobs must be an integer in 0..20"):
        GenerationConfig(logprobs=True, top_logprobs=21)


def test_forced_tokens_are_fed_and_every_departure_measured(pipe, photos):
    """Teacher forcing (parity follows a candidate along the reference's tokens with it): the answer is the
    forced tokens whatever the logits say; each step where greedy would have chosen another token is a
    departure whose margin is the two tokens' log-probability difference there; a forced EOS ends the answer;
    rows forced differently in one batch depart as each does alone."""
    prompt, images = "What animal is in the picture?", [photos[0]]
    free = GenerationConfig(max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5)
    own = generate(pipe, prompt, images, free)
    assert own.departures is None and "departures" not in own.to_dict()
    along = generate(pipe, prompt, images, replace(free, forced_tokens=own.token_ids))
    assert along.token_ids == own.token_ids and along.departures == []  # its own tokens: never departs
    # the runner-up forced at step 2: greedy departs there by exactly the log-probability difference
    (best, best_p), (second, second_p) = own.logprobs[2].top[:2]
    swapped = replace(free, forced_tokens=(*own.token_ids[:2], second.token_id))
    got = generate(pipe, prompt, images, swapped)
    assert got.token_ids[:3] == list(swapped.forced_tokens) and len(got.token_ids) == 8
    first = got.departures[0]
    assert (first.index, first.chosen, first.forced) == (2, best.token_id, second.token_id)
    assert abs(first.margin - (best_p - second_p)) < 1e-4 and first.margin > 0
    assert all(d.index > 2 or d is first for d in got.departures)  # unforced steps after it are not departures
    assert got.to_dict()["departures"][0] == {"index": 2, "chosen": best.token_id, "forced": second.token_id,
                                              "margin": first.margin}
    # a forced EOS ends the answer, and where greedy went on, that is a departure too
    eos = pipe.eos_token_ids[0]
    ended = generate(pipe, prompt, images, GenerationConfig(max_new_tokens=8, forced_tokens=(*own.token_ids[:3], eos)))
    assert ended.finish_reason == "eos" and ended.token_ids == own.token_ids[:3]
    assert [(d.index, d.forced) for d in ended.departures] == ([] if own.token_ids[3] == eos else [(3, eos)])
    # rows forced differently, batched, depart as each alone
    requests = [GenerationRequest(prompt, tuple(images), swapped),
                GenerationRequest("Describe it.", tuple(images), replace(free, forced_tokens=own.token_ids[:5]))]
    alone = [generate(pipe, r.prompt, r.images, r.config) for r in requests]
    together = generate_batch(pipe, requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [[(d.index, d.chosen, d.forced) for d in r.departures] for r in together] == \
        [[(d.index, d.chosen, d.forced) for d in r.departures] for r in alone]
    with pytest.raises(InputError, match="9 forced tokens do not fit in max_tokens 8"):
        GenerationConfig(max_new_tokens=8, forced_tokens=[1] * 9)
    with pytest.raises(InputError, match="forced_tokens must be token ids"):
        GenerationConfig(forced_tokens=(-1,))
    with pytest.raises(InputError, match="forced_tokens names token id"):
        generate(pipe, prompt, images, GenerationConfig(max_new_tokens=2, forced_tokens=(10**7,)))


@pytest.mark.parametrize("min_new, min_length", [(3, 0), (0, 10), (2, 9)])
def test_the_samplers_minimum_lengths_and_suppressed_tokens_are_hugging_faces(min_new, min_length):
    """EOS held off until min_new_tokens new tokens and a min_length sequence, tokens suppressed always
    or at the first position: step after step the logits Hugging Face's own processors give."""
    import torch
    from transformers import (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
                              SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor)

    from vlm_export.runtime.generate import Sampler

    rng = np.random.default_rng(2)
    vocab, context, eos = 12, [3, 5, 3, 5, 7], [11, 10]
    config = GenerationConfig(min_new_tokens=min_new, min_length=min_length, suppress_tokens=(2,),
                              begin_suppress_tokens=(4, 6)).with_defaults({})
    sampler = Sampler(config, context, eos)
    processors = [MinLengthLogitsProcessor(min_length, eos),
                  MinNewTokensLengthLogitsProcessor(len(context), min_new, eos),
                  SuppressTokensLogitsProcessor([2]), SuppressTokensAtBeginLogitsProcessor([4, 6], len(context))]
    ids, first_eos = list(context), None
    for step in range(8):
        logits = rng.normal(size=vocab).astype(np.float32)
        logits[[2, 4, 6]] += 8.0  # each would win were it allowed, EOS above all
        logits[10] += 16.0
        theirs = torch.from_numpy(logits.copy())[None]
        for processor in processors:
            theirs = processor(torch.tensor([ids]), theirs)
        np.testing.assert_array_equal(sampler._processed(logits), theirs[0].numpy())
        token = sampler(logits)
        first_eos = step if first_eos is None and token in eos else first_eos
        ids.append(token)
    assert first_eos == max(min_new, min_length - len(context))  # EOS as soon as it is allowed
    assert 2 not in ids[len(context):] and ids[len(context)] not in (4, 6)


def test_the_samplers_sequence_bias_and_bad_words_are_hugging_faces():
    """Sequence biases (one-token and longer, matched against the prompt and the answer so far) and bad
    words (an EOS-only one left out, as HF does): step after step the logits Hugging Face's own
    processors give, in its order (the bias before the repetition penalty); the request's logit bias
    adds to a one-token sequence's."""
    import torch
    from transformers import (NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              SequenceBiasLogitsProcessor)

    from vlm_export.runtime.generate import Sampler

    rng = np.random.default_rng(3)
    vocab, context, eos = 12, [3, 5, 3, 5, 7], [11]
    bias = {(4,): 2.5, (7, 2): 6.0, (5, 7, 9): -4.0, (2, 8): 3.0, (99,): 1.0}  # 99: past the vocabulary, ignored
    bad = [[6], [8, 1], [1, 8, 2], [11]]  # [11] is EOS alone: not banned
    sampler = Sampler(GenerationConfig(sequence_bias=bias, bad_words_ids=bad, repetition_penalty=1.3,
                                       logit_bias={4: -1.0, 0: 0.5}).with_defaults({}), context, eos)
    processors = [SequenceBiasLogitsProcessor({k: v for k, v in bias.items() if 99 not in k}),
                  RepetitionPenaltyLogitsProcessor(1.3), NoBadWordsLogitsProcessor(bad, eos)]
    ids, seen = list(context), set()
    for step in range(40):
        logits = rng.normal(size=vocab).astype(np.float32)
        logits[[2, 8, 9]] += 2.0  # make the sequences come up
        theirs = torch.from_numpy(logits.copy())[None]
        theirs[0, 4] += -1.0  # the request's logit bias on top of the checkpoint's (4,) bias
        theirs[0, 0] += 0.5
        for processor in processors:
            theirs = processor(torch.tensor([ids]), theirs)
        np.testing.assert_allclose(sampler._processed(logits), theirs[0].numpy(), rtol=0, atol=1e-6)
        seen |= {tuple(ids[-2:]), tuple(ids[-3:])}
        token = sampler(logits)
        assert token == int(theirs[0].argmax())
        ids.append(token)
    assert 6 not in ids[len(context):] and all(ids[i:i + 2] != [8, 1] for i in range(len(context), len(ids) - 1))
    assert (7, 2) in {tuple(ids[i:i + 2]) for i in range(len(context) - 1, len(ids) - 1)}  # a biased pair came up
    with pytest.raises(InputError, match="logit_bias values must be in"):
        GenerationConfig(logit_bias={3: 101.0})
    with pytest.raises(InputError, match="logit_bias keys must be token ids"):
        GenerationConfig(logit_bias={"3": 1.0})
    with pytest.raises(InputError, match="bad_words_ids must be sequences of token ids"):
        GenerationConfig(bad_words_ids=[[]])


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 1.0, 0.2), (40, 0.8, 0.05), (3, 0.3, 0.5),
                                               (1, 1.0, 0.0), (0, 1.0, 1.0), (100000, 1.0, 0.0)])
def test_the_samplers_top_k_top_p_and_min_p_are_hugging_faces(top_k, top_p, min_p):
    """What a sampled token is drawn from = Hugging Face's warpers in its generate's order (temperature,
    top-k, top-p, min-p) on the same logits: the same tokens kept, the same probabilities; and every
    token sampled is one of them."""
    import torch
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from vlm_export.runtime.generate import Sampler

    rng = np.random.default_rng(top_k + int(100 * min_p))
    logits = (rng.standard_normal(500) * 3).astype(np.float32)
    logits[[7, 8]] = logits.max() + 1  # a tie at the top: both kept by top-k 1 and min-p 1, as HF keeps them
    config = GenerationConfig(temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p, seed=1)
    warpers = [TemperatureLogitsWarper(0.7)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
        ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    for warper in warpers:
        scores = warper(None, scores)
    expected = torch.softmax(scores, -1)[0].numpy()
    sampler = Sampler(config)
    got = sampler.distribution(logits)
    kept = set(np.flatnonzero(got))
    if top_p < 1 and len(kept & {7, 8}) == 1:
        # top-p ended the nucleus inside the tie: which of the two stays is HF's sort order (torch's unstable
        # sort, whose order among equal values differs by CPU: this case passed on an AVX-512 EPYC and failed on
        # an AVX2 one with the same versions); ours keeps the lower id
        assert 7 in kept and len(set(np.flatnonzero(expected)) & {7, 8}) == 1
        expected[[7, 8]] = np.sort(expected[[7, 8]])[::-1]
    assert np.array_equal(got > 0, expected > 0), (np.flatnonzero(got), np.flatnonzero(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert 0 < len(kept) < 500 or (top_k >= 500 and len(kept) == 500)
    assert {Sampler(replace(config, seed=s))(logits.copy()) for s in range(40)} <= kept


def test_top_k_and_min_p_are_checked_and_greedy_ignores_them():
    for bad in (dict(top_k=-1), dict(top_k=1.5), dict(top_k=True), dict(min_p=-0.1), dict(min_p=1.5),
                dict(min_p=float("nan"))):
        with pytest.raises(InputError, match=next(iter(bad))):
            GenerationConfig(**bad)
    logits = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    from vlm_export.runtime.generate import Sampler
    assert Sampler(GenerationConfig(top_k=3, min_p=0.9))(logits) == int(np.argmax(logits))


def test_bad_words_are_spelt_as_vllm_spells_them():
    """vLLM's rule: a word as written (leading spaces stripped), and after a space where that starts with
    another token and has as many; a SentencePiece tokenizer puts the space in itself (one spelling)."""
    from tiny_models import make_sentencepiece_tokenizer, smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from vlm_export.runtime.generate import bad_words_token_ids

    byte_level = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    spelt = bad_words_token_ids(byte_level, ["circle", "  blue sky", "rectangle"])
    assert [byte_level.decode(ids) for ids in spelt] == ["circle", " circle", "blue sky", " blue sky", "rectangle"]
    assert len(spelt[4]) == 2 and len(byte_level.encode(" rectangle", add_special_tokens=False)) == 1  # not added
    sentencepiece = make_sentencepiece_tokenizer()
    spelt = bad_words_token_ids(sentencepiece, ["circle", " blue sky"])
    assert [sentencepiece.decode(ids) for ids in spelt] == ["circle", "blue sky"]
    for bad in ([""], ["  "], "circle", [3], ["circle"] * 129):
        with pytest.raises(InputError, match="bad_words"):
            GenerationConfig(bad_words=bad)


def test_bad_words_a_tokenizer_cannot_spell_are_refused():
    """A word the tokenizer writes as no tokens (BERT's drops control and zero-width characters) would
    ban nothing: refused in one line naming it; so are more ids in all than the matcher is given."""
    from tiny_models import make_qformer_tokenizer, smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    from vlm_export.runtime.generate import MAX_BAD_WORD_TOKENS, bad_words_token_ids, resolved_config

    with pytest.raises(InputError, match=r"bad_words: '\\u200b' is no tokens"):
        bad_words_token_ids(make_qformer_tokenizer(), ["circle", "\u200b"])
    byte_level = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    long_words = ["zq" * 40 + str(i) for i in range(128)]  # ~20+ ids each, twice over with the space
    with pytest.raises(InputError, match=f"at most {MAX_BAD_WORD_TOKENS}"):
        bad_words_token_ids(byte_level, long_words)
    # resolved once (on the engine's preparation workers), the words are ids and resolving again adds none
    config = resolved_config(GenerationConfig(bad_words=("circle",)), {"bad_words_ids": [[5]]}, byte_level)
    assert config.bad_words == () and config.bad_words_ids[0] == (5,) and len(config.bad_words_ids) == 3
    assert resolved_config(config, {"bad_words_ids": [[7]]}, byte_level) == config


def test_bad_words_are_never_generated_and_join_the_checkpoints(pipe, photos):
    """A word of the greedy answer, banned: the answer changes and spells it neither way; the same as
    banning its id sequences by bad_words_ids, and added to a bad_words_ids the request gives."""
    from vlm_export.runtime.generate import bad_words_token_ids

    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    plain = generate(pipe, "Describe it.", [photos[0]], config)
    word = a_word_spelt_in(pipe.tokenizer, plain.text, plain.token_ids)
    banned = bad_words_token_ids(pipe.tokenizer, [word])
    assert len(banned) == 2  # SmolLM2's byte-level BPE: "word" and " word" are other tokens
    got = generate(pipe, "Describe it.", [photos[0]], replace(config, bad_words=(word,)))
    assert got.token_ids != plain.token_ids
    for ids in banned:
        n = len(ids)
        assert all(tuple(got.token_ids[i:i + n]) != ids for i in range(len(got.token_ids))), (word, got.text)
    assert generate(pipe, "Describe it.", [photos[0]], replace(config, bad_words_ids=banned)).token_ids == got.token_ids
    first = (got.token_ids[0],)
    both = generate(pipe, "Describe it.", [photos[0]], replace(config, bad_words=(word,), bad_words_ids=(first,)))
    assert both.token_ids[0] != got.token_ids[0]
    assert both.token_ids == generate(pipe, "Describe it.", [photos[0]],
                                      replace(config, bad_words_ids=(first, *banned))).token_ids


def test_tokenize_gives_the_ids_logit_bias_takes(tiny_build, run_cli):
    """`vlm-export tokenize BUILD TEXT` lists the build tokenizer's ids and pieces; banning the first of
    the plain answer's with `generate --logit-bias ID=-100` changes the answer."""
    import json

    build = tiny_build("llava-llama").path
    pipe = open_build(build)
    plain = generate(pipe, "Tell me a story.", [], GenerationConfig(max_new_tokens=6))
    word = pipe.tokenizer.decode(plain.token_ids[:1])
    listed = run_cli("tokenize", str(build), word)
    assert listed.returncode == 0, listed.stderr
    first = int(listed.stdout.split()[0])
    assert first == plain.token_ids[0] and repr(word) in listed.stdout
    pieces = json.loads(run_cli("tokenize", str(build), "Tell me", "--json").stdout)
    assert [p["token_id"] for p in pieces] == pipe.tokenizer.encode("Tell me", add_special_tokens=False)
    assert "".join(p["token"] for p in pieces) == "Tell me"
    banned = run_cli("generate", str(build), "--prompt", "Tell me a story.", "--max-tokens", "6",
                     "--logit-bias", f"{first}=-100", "--json")
    assert banned.returncode == 0, banned.stderr
    answer = json.loads(banned.stdout.splitlines()[-1])
    assert answer["token_ids"][0] != first and answer["token_ids"] != plain.token_ids


def test_a_checkpoints_suppressed_tokens_and_minimum_lengths_apply_as_in_hf(tiny_model_dir, tiny_build, tmp_path):
    """A generation_config.json that suppresses the tokens the model would start its answers with (and
    sets a minimum length): the build records the settings and passes parity against HF's generate,
    which applies them, so its greedy answers are new ones; they are not 'settings not applied'."""
    import json
    import shutil

    from vlm_export.build import BuildOptions, build

    plain = json.loads((tiny_build("llava-llama").path / "report.json").read_text())["end_to_end"]["torch_split"]
    firsts = sorted({run["reference"][0] for run in plain})
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava-llama"), model)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(suppress_tokens=firsts, begin_suppress_tokens=[firsts[0] + 1], min_new_tokens=4, min_length=5)
    (model / "generation_config.json").write_text(json.dumps(config))
    progress = recorded_notes()
    result = build(model, tmp_path / "build", BuildOptions(max_sequence=256, parity_new_tokens=12), progress)
    assert result.failures == []
    generation = result.manifest["generation"]
    assert (generation["suppress_tokens"], generation["begin_suppress_tokens"]) == (firsts, [firsts[0] + 1])
    assert (generation["min_new_tokens"], generation["min_length"]) == (4, 5)
    assert not any("does not apply" in line for line in progress.lines), progress.lines
    report = json.loads((tmp_path / "build" / "report.json").read_text())["end_to_end"]["torch_split"]
    assert all(run["reference"][0] not in firsts and not set(firsts) & set(run["candidate"]) for run in report)


def test_a_checkpoints_bad_words_and_sequence_bias_apply_as_in_hf(tiny_model_dir, tiny_build, tmp_path):
    """A generation_config.json that bans the bigram each greedy answer starts with and biases a token
    up: the build records both and passes parity against HF's generate (which applies them), its
    answers are new ones without those bigrams, and neither is said to be 'not applied'."""
    import json
    import shutil

    from vlm_export.build import BuildOptions, build

    plain = json.loads((tiny_build("llava-llama").path / "report.json").read_text())["end_to_end"]["torch_split"]
    bigrams = sorted({tuple(run["reference"][:2]) for run in plain})
    favoured = max({t for run in plain for t in run["reference"]}) + 1  # a token none of the answers holds
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llava-llama"), model)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(bad_words_ids=[list(b) for b in bigrams], sequence_bias=[[[favoured], 4.0]])
    (model / "generation_config.json").write_text(json.dumps(config))
    progress = recorded_notes()
    result = build(model, tmp_path / "build", BuildOptions(max_sequence=256, parity_new_tokens=12), progress)
    assert result.failures == []
    generation = result.manifest["generation"]
    assert generation["bad_words_ids"] == [list(b) for b in bigrams]
    assert generation["sequence_bias"] == [[[favoured], 4.0]]
    assert not any("does not apply" in line for line in progress.lines), progress.lines
    runs = json.loads((tmp_path / "build" / "report.json").read_text())["end_to_end"]["torch_split"]
    assert all(tuple(run["candidate"][:2]) not in bigrams for run in runs)
    assert any(favoured in run["candidate"] for run in runs)  # the bias changed answers
    assert [run["candidate"] for run in runs] != [run["reference"] for run in plain]


def test_the_checkpoints_repetition_settings_are_the_builds_defaults(tmp_path):
    """A generation_config.json with a repetition penalty and an n-gram ban (which change greedy answers)
    and beams: the build records the first two and applies them as Hugging Face's generate does (parity
    passes against it), says the beams are not run, and a request can turn them off."""
    import json

    from tiny_models import make_tiny_llava
    from vlm_export.build import BuildOptions, build

    model = make_tiny_llava(tmp_path / "model")
    config = json.loads((model / "generation_config.json").read_text())
    config.update(repetition_penalty=1.5, no_repeat_ngram_size=2, num_beams=3)
    (model / "generation_config.json").write_text(json.dumps(config))

    progress = recorded_notes()
    result = build(model, tmp_path / "build", BuildOptions(max_sequence=128, parity_new_tokens=16), progress)
    assert result.failures == []
    assert result.manifest["generation"]["repetition_penalty"] == 1.5
    assert result.manifest["generation"]["no_repeat_ngram_size"] == 2
    assert any("sets num_beams=3, which vlm-export's generation does not apply" in line for line in progress.lines)
    from PIL import Image

    pipe = open_build(tmp_path / "build")
    image = [Image.new("RGB", (32, 32), (200, 30, 30))]  # an input this random model answers in loops

    def repeated_bigrams(ids):
        return len(ids) - 1 - len(set(zip(ids, ids[1:])))

    applied = generate(pipe, "Tell me a story.", image, GenerationConfig(max_new_tokens=40)).token_ids
    off = generate(pipe, "Tell me a story.", image, GenerationConfig(max_new_tokens=40, repetition_penalty=1.0,
                                                                      no_repeat_ngram_size=0)).token_ids
    assert repeated_bigrams(off) > 0 and repeated_bigrams(applied) == 0
