"""TensorRT optimization profiles derived from the manifest's limits (never typed twice).

Every dynamic dim of every graph input is named at export (``images``, ``batch``, ``sequence``,
``past_sequence``, ``total_sequence``, ``image_tokens``); a profile gives each NAME a
(min, opt, max), and the shapes follow. The decoder gets two profiles, because one graph serves
two very different shapes: prefill (many tokens, empty cache, image rows) and decode (one token,
a cache up to max_sequence - 1, no image rows).
"""
from __future__ import annotations

from ..errors import BuildError

Range = tuple[int, int, int]


def dim_ranges(limits: dict) -> dict[str, list[dict[str, Range]]]:
    """Per stage: a list of profiles, each mapping dim name -> (min, opt, max)."""
    images = limits["max_images_per_batch"]
    batch, seq = limits["max_batch"], limits["max_sequence"]
    image_rows = limits["max_image_tokens"] * batch
    tokens = limits["tokens_per_image"]
    opt_seq = min(seq, max(tokens + 64, 128))
    opt_past = min(seq - 1, 256)
    image_profile = {"images": (1, max(1, min(images, limits["max_images"])), images)}
    return {
        "vision_encoder": [image_profile],
        "projector": [image_profile],
        "lm_decoder": [
            {  # prefill: the prompt with its image rows, from an empty cache
                "batch": (1, 1, batch), "sequence": (1, opt_seq, seq), "total_sequence": (1, opt_seq, seq),
                "past_sequence": (0, 0, 0), "image_tokens": (0, min(tokens, image_rows), image_rows),
            },
            {  # decode: one token on a cache
                "batch": (1, 1, batch), "sequence": (1, 1, 1), "total_sequence": (2, opt_past + 1, seq),
                "past_sequence": (1, opt_past, seq - 1), "image_tokens": (0, 0, 0),
            },
        ],
    }


def stage_profiles(manifest: dict, stage: str) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Input name -> (min shape, opt shape, max shape), one dict per profile."""
    profiles = []
    for ranges in dim_ranges(manifest["limits"])[stage]:
        shapes = {}
        for info in manifest["graphs"][stage]["inputs"]:
            picks = []
            for dim in info["shape"]:
                if isinstance(dim, int):
                    picks.append((dim, dim, dim))
                elif dim in ranges:
                    picks.append(ranges[dim])
                else:
                    raise BuildError(f"{stage} input {info['name']} has a dynamic dim {dim!r} that no limit "
                                     f"bounds; known: {', '.join(sorted(ranges))}")
            shapes[info["name"]] = tuple(tuple(p[i] for p in picks) for i in range(3))
        profiles.append(shapes)
    return profiles
