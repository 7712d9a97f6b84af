"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr from ``pycocoevalcap`` (the MS-COCO caption
evaluation code; its scorers are pure Python), for each backend's captions against the references,
and for the build's captions against the PyTorch reference's own (agreement: a build that captions
exactly like PyTorch scores what PyTorch's captions score against themselves), plus how often the
two captions are identical.

Tokenisation is explicit. COCO's scripts run Stanford's PTBTokenizer, a Java program, first; here the
default is ``tokenize`` below, in Python, because the Java one
  * needs a Java runtime, which is no Python dependency and is missing from most serving images,
  * writes its input to a temporary file inside the installed package (fails on a read-only install),
  * lower-cases after mapping brackets, so "(" stays as a "-lrb-" token its own punctuation list misses.
``tokenize`` gives PTBTokenizer's tokens otherwise (lower case, contractions split as "is n't", "'s",
punctuation dropped; tests/test_captions.py compares the two where ``java`` exists).
``tokenizer="ptb"`` runs the package's PTBTokenizer instead, for numbers comparable with published
COCO scores; it says so in one line when no ``java`` is on PATH.

The package's ``Cider`` is CIDEr-D (clipped counts, length penalty; 10 for a caption equal to all its
references). Its idf comes from the references of the whole set: over one image every n-gram is in
every document and CIDEr is 0, and a word every image's references share (e.g. "a") weighs nothing.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..errors import InputError
from ..progress import Progress
from ..runtime.generate import GenerationConfig, generate
from ..runtime.pipeline import VLMPipeline

TOKENIZERS = ("simple", "ptb")
DEFAULT_CAPTION_TOKENS = 24  # greedy tokens per caption
BLEU_ORDERS = 4
# PTBTokenizer's PUNCTUATIONS (pycocoevalcap.tokenizer.ptbtokenizer), as the characters they come from
# (`` and '' are its forms of "), and brackets (its -LRB- and kin)
_DROPPED = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}"}
_CONTRACTIONS = (re.compile(r"(\w)(n't)\b"), re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b"))
# abbreviations with inner dots keep them ("u.s.", "e.g."); words keep inner - . / , ' ("x-ray", "3.5",
# "1,000", "m/s"); contraction pieces; any other non-space character is a token of its own
_TOKEN = re.compile(r"(?:[^\W_]\.){2,}|n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-./,'][^\W_]+)*|\S")


def tokenize(text: str) -> str:
    """One caption as space-separated tokens, the way the scorers read it (see the module docstring)."""
    text = text.lower()
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r"\1 \2", text)
    return " ".join(t for t in _TOKEN.findall(text) if t not in _DROPPED)


def _check_tokenizer(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise InputError(f"unknown caption tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")
    if tokenizer == "ptb" and shutil.which("java") is None:
        raise InputError("--tokenizer ptb runs Stanford's PTBTokenizer (Java): no `java` on PATH; "
                         "install a Java runtime or use --tokenizer simple")


def _tokenize_all(captions: Mapping[int, list[str]], tokenizer: str) -> dict[int, list[str]]:
    _check_tokenizer(tokenizer)
    if tokenizer == "simple":
        return {k: [tokenize(c) for c in v] for k, v in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    except OSError as err:  # it writes a temporary file beside its jar
        raise InputError(f"PTBTokenizer failed ({err}); use --tokenizer simple") from err


def check_scoring(tokenizer: str) -> None:
    """Fail before any model runs: an unknown tokenizer, ``ptb`` with no java, or pycocoevalcap missing
    (a ModuleNotFoundError, which the CLI turns into the one-line hint naming the extra)."""
    import pycocoevalcap.bleu.bleu  # noqa: F401
    import pycocoevalcap.cider.cider  # noqa: F401
    import pycocoevalcap.rouge.rouge  # noqa: F401

    _check_tokenizer(tokenizer)


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level scores of candidate captions against references, as pycocoevalcap computes them."""

    bleu: tuple[float, ...]  # BLEU-1..4
    rouge_l: float
    cider: float

    def to_dict(self) -> dict:
        return {**{f"bleu_{n}": b for n, b in enumerate(self.bleu, start=1)}, "rouge_l": self.rouge_l,
                "cider": self.cider}


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   tokenizer: str = "simple") -> CaptionScores:
    """BLEU-1..4, ROUGE-L and CIDEr(-D) of ``candidates[i]`` against ``references[i]`` (one or more each)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference")
    n = len(candidates)
    tokens = _tokenize_all({**{i: [c] for i, c in enumerate(candidates)},
                            **{n + i: list(refs) for i, refs in enumerate(references)}}, tokenizer)
    return _score([tokens[i][0] for i in range(n)], [tokens[n + i] for i in range(n)])


def _score(candidates: list[str], references: list[list[str]]) -> CaptionScores:
    """The scorers on tokenised captions (space-separated tokens)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not any(ref for refs in references for ref in refs):
        raise ValueError("the references hold no words")  # CIDEr's document frequencies would be empty
    res = {i: [c] for i, c in enumerate(candidates)}
    gts = dict(enumerate(references))
    bleu, _ = Bleu(BLEU_ORDERS).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return CaptionScores(tuple(float(b) for b in bleu), float(rouge), float(cider))


@dataclass
class CaptionResult:
    """One backend's captions of a set, scored against the references and, for any backend but the
    reference, against the reference backend's captions."""

    backend: str
    dataset: str
    images: int
    seconds: float
    references: CaptionScores
    agreement: CaptionScores | None = None  # vs the reference backend's captions
    exact_match: float | None = None  # share of captions identical to the reference backend's
    captions: list[str] = field(repr=False, default_factory=list)
    # the reference backend only: its captions against themselves, the most agreement can score
    # (BLEU-n stays near 0 and CIDEr below 10 when captions are shorter than n words)
    ceiling: CaptionScores | None = None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "dataset": self.dataset, "images": self.images, "seconds": self.seconds,
                "references": self.references.to_dict(),
                "agreement": self.agreement.to_dict() if self.agreement else None, "exact_match": self.exact_match,
                "ceiling": self.ceiling.to_dict() if self.ceiling else None, "captions": self.captions}


def caption_prompt(item_prompt: str | None, prompt: str | None, default: str | None) -> str:
    """The prompt that asks one image for its caption: the item's own, else the eval's, else the build's."""
    chosen = item_prompt or prompt or default
    if not chosen:
        raise InputError("this build declares no captioning prompt and an item has none: pass --prompt "
                         "(e.g. --prompt \"Describe the image.\") or give \"prompt\" per line of captions.jsonl")
    return chosen


def caption_images(pipe: VLMPipeline, items: Sequence, prompts: Sequence[str],
                   max_new_tokens: int = DEFAULT_CAPTION_TOKENS,
                   advance: Callable[[], None] = lambda: None) -> tuple[list[str], float]:
    """Greedy captions of every item (``CaptionItem``s), in order, each asked with its prompt
    (``prompts``, from ``caption_prompt``), and the seconds they took."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    captions = []
    for item, text in zip(items, prompts):
        captions.append(generate(pipe, text, [item.image], config).text.strip())
        advance()
    return captions, time.perf_counter() - start


def caption_all(pipes: Mapping[str, VLMPipeline], name: str, items: Sequence, progress: Progress,
                prompts: Sequence[str], max_new_tokens: int = DEFAULT_CAPTION_TOKENS,
                tokenizer: str = "simple") -> list[CaptionResult]:
    """Every pipeline captions the same images with the same prompts (the first pipeline is the
    reference the others are compared with); the caller has checked the scorers (``check_scoring``)."""
    runs = {}
    for label, pipe in pipes.items():
        with progress.step(f"{label}: captioning {len(items)} {name} images", total=len(items)) as advance:
            runs[label] = caption_images(pipe, items, prompts, max_new_tokens, advance)
    # one tokenisation of everything (one Java run with the ptb tokenizer): keys (label or "", image index)
    texts = {("", i): list(item.references) for i, item in enumerate(items)}
    texts.update({(label, i): [c] for label, (captions, _) in runs.items() for i, c in enumerate(captions)})
    keys = list(texts)
    tokenized = _tokenize_all({k: texts[key] for k, key in enumerate(keys)}, tokenizer)
    tokens = {key: tokenized[k] for k, key in enumerate(keys)}
    references = [tokens[("", i)] for i in range(len(items))]
    base_label = next(iter(runs))
    base = [tokens[(base_label, i)] for i in range(len(items))]
    scorable = any(b[0] for b in base)  # otherwise there is nothing to score agreement against (None)
    results: list[CaptionResult] = []
    for label, (captions, seconds) in runs.items():
        mine = [tokens[(label, i)][0] for i in range(len(items))]
        result = CaptionResult(pipes[label].backend, name, len(items), seconds, _score(mine, references),
                               captions=captions)
        if not results:
            result.ceiling = _score(mine, base) if scorable else None
        else:
            result.agreement = _score(mine, base) if scorable else None
            result.exact_match = sum(a == b for a, b in zip(captions, runs[base_label][0])) / len(items)
        results.append(result)
    return results


DEFAULT_MAX_CIDER_DROP = 0.05  # CIDEr units (COCO captioners score about 1.0-1.4): a few percent


@dataclass(frozen=True)
class CaptionGate:
    """Each candidate's CIDEr against the references may be at most ``max_cider_drop`` below the
    reference backend's, on the same images (the caption counterpart of the VQA AccuracyGate: greedy
    tokens of a reduced-precision build may move; whether its captions got worse is what this judges)."""

    max_cider_drop: float = DEFAULT_MAX_CIDER_DROP

    def drops(self, reference: CaptionResult, candidates: Sequence[CaptionResult]) -> dict[str, float]:
        return {c.backend: round(reference.references.cider - c.references.cider, 9) for c in candidates}

    def judge(self, reference: CaptionResult, candidates: Sequence[CaptionResult]) -> list[str]:
        return [f"captions: {c.backend} CIDEr {c.references.cider:.4f} vs {reference.backend} "
                f"{reference.references.cider:.4f} on the same {c.images} {c.dataset} images, a drop of {drop:.4f} "
                f"(at most {self.max_cider_drop:g} allowed)"
                for c, drop in zip(candidates, self.drops(reference, candidates).values())
                if drop > self.max_cider_drop]


def caption_section(dataset: str, items: Sequence, results: Sequence[CaptionResult], tokenizer: str = "simple",
                    note: str = "", prompts: Sequence[str] = (),
                    gate: CaptionGate | None = None) -> tuple[dict, list[str]]:
    """The report's caption section (every backend's scores, the captions that differ from the
    reference's, the prompts used with how many images each, the gate's verdict) and the gate's failures."""
    from collections import Counter

    reference, candidates = results[0], list(results[1:])
    differ = [{"image": str(item.image), "references": list(item.references), reference.backend: base,
               other.backend: mine}
              for other in candidates for item, base, mine in zip(items, reference.captions, other.captions)
              if base != mine]
    section = {"dataset": dataset, "images": len(items), "reference": reference.backend, "tokenizer": tokenizer,
               "note": note, "prompts": dict(Counter(prompts)), "results": [r.to_dict() for r in results],
               "differing_captions": differ}
    failures: list[str] = []
    if gate is not None and candidates:
        failures = gate.judge(reference, candidates)
        section["gate"] = {"reference": reference.backend, "max_cider_drop": gate.max_cider_drop,
                           "cider_drop": gate.drops(reference, candidates), "passed": not failures}
    return section, failures


def gate_line(section: dict) -> str:
    """The gate's verdict in one line ("" when there was nothing to judge)."""
    gate = section.get("gate")
    if not gate:
        return ""
    drops = ", ".join(f"{b} {0.0 - d:+.4f}" for b, d in gate["cider_drop"].items())  # 0.0 - 0.0: "+0.0000"
    return (f"caption gate (CIDEr at most {gate['max_cider_drop']:g} below {gate['reference']}; {drops}): "
            f"{'passed' if gate['passed'] else 'FAILED'}")


METRIC_LABELS = (("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
                 ("rouge_l", "ROUGE-L"), ("cider", "CIDEr"))


def caption_rows(section: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table (header, rows): one row per metric, a column per backend against the
    references, then the reference backend's captions against themselves (the most agreement can score)
    and each candidate against them."""
    results = section["results"]
    ref = section["reference"]
    vs_ref = results[1:]
    header = ["metric"] + [f"{r['backend']} vs references" for r in results] + \
             ([f"{ref} vs {ref} (maximum)"] if vs_ref else []) + [f"{r['backend']} vs {ref}" for r in vs_ref]
    ceiling = [results[0].get("ceiling")] if vs_ref else []

    def cell(scores, key):
        return f"{scores[key]:.4f}" if scores else "-"

    rows = [[label] + [cell(r["references"], key) for r in results] + [cell(c, key) for c in ceiling] +
            [cell(r["agreement"], key) for r in vs_ref] for key, label in METRIC_LABELS]
    rows.append(["identical captions"] + ["-" for _ in results] + ["100.0%" for _ in ceiling] +
                [f"{100 * r['exact_match']:.1f}%" for r in vs_ref])
    rows.append(["seconds"] + [f"{r['seconds']:.1f}" for r in results] + ["" for _ in ceiling + vs_ref])
    return header, rows


def caption_markdown(section: dict) -> list[str]:
    """The caption section of report.md."""
    header, rows = caption_rows(section)
    lines = [f"## Captions ({section['dataset']}, {section['images']} images, greedy, "
             f"tokenizer {section['tokenizer']})",
             ""]
    if section.get("note"):
        lines += [section["note"], ""]
    lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append(f"\nCaptions that differ from {section['reference']}'s: {len(section['differing_captions'])}")
    if section.get("gate"):
        lines.append(f"\n{gate_line(section).replace('FAILED', '**FAILED**')}")
    return lines
