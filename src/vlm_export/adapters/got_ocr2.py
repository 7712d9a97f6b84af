"""GOT-OCR 2.0: ``GotOcr2ForConditionalGeneration`` (StepFun's GOT-OCR-2.0-hf: a SAM-style ViTDet tower + two
strided convolutions and a linear + a Qwen2 LM).

The vision stage is the tower's last hidden state (its convolutional neck's [images, channels, side, side]); the
projector halves the side twice and projects each cell: 256 rows for GOT's 1024 px page. GotOcr2Processor writes each
image as "<img>" + "<imgpad>" x 256 x tiles + "</img>" (``ImageTiles`` counted by the GotOcr2 image processor's
``num_patches``; its own default, one tile per image - ``crop_to_patches`` off - is the layout's), and, given no text,
writes the whole conversation itself - a system turn, the user's image and query (" OCR: ", " OCR with format: ",
with a colour or a box before it), the assistant's turn - since the checkpoint has no chat template. Where a
checkpoint has none, the adapter gives its tokenizer that conversation's form as a template: an image part is
"<imgpad>" and a newline, then the prompt's text, so a prompt of GOT's query gives the processor's ids; the task
tokens ``<OCR>`` and ``<OCR_FORMAT>`` stand for its two plain queries. Not reproduced: the multi-page form (several
pages in one "<img>" run) and the tiled "upon the patch reference" mode.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..contract import ImageTiles, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import (LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size, check_image_token,
                   use_saved_chat_template)
from .decoder import LastHiddenState, SplicedLanguageModel, spliced_stages
from .loading import load_hf_parts

#: the texts GotOcr2Processor writes (constants of its own)
IMAGE_START, IMAGE_END, IMAGE_PAD = "<img>", "</img>", "<imgpad>"
SYSTEM = "You should follow the instructions carefully and explain your answers in detail."
#: the image tokens GotOcr2Processor writes per tile (its ``num_image_tokens`` default)
PROCESSOR_ROWS = 256
#: GotOcr2Processor's conversation as a chat template: "<|im_start|>" + role + "\n" + content + "<|im_end|>", no
#: newline between turns, its system turn first; an image part "<imgpad>" and a newline (the processor's "</img>\n")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n" + SYSTEM +
    "<|im_end|>{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + IMAGE_PAD + "\n{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@register
class GotOcr2Adapter(SplicedLanguageModel, VLMAdapter):
    name = "got_ocr2"
    model_types = ("got_ocr2",)
    description = ("Hugging Face GotOcr2ForConditionalGeneration (GOT-OCR 2.0: a SAM-style ViTDet tower + strided "
                   "convolution projector + a Qwen2 LM; GotOcr2Processor's conversation)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import GotOcr2ForConditionalGeneration

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(GotOcr2ForConditionalGeneration, path)
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, model.config)
        use_saved_chat_template(tokenizer, path)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        check_image_token(loaded, IMAGE_PAD)
        if not hasattr(image_processor, "max_patches"):
            raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) is not GOT's: save "
                               "the model's own GotOcr2ImageProcessor beside it")
        size = int(model.config.vision_config.image_size)
        check_image_size(loaded, (size, size))
        rows = self.tokens_per_tile(loaded)
        if rows != PROCESSOR_ROWS:
            raise AdapterError(f"the projector gives {rows} rows per image but GotOcr2Processor writes "
                               f"{PROCESSOR_ROWS} image tokens per image (Hugging Face's generate refuses this "
                               "checkpoint too): a tower of image_size / patch_size = 64 patches a side")
        return loaded

    def _vision(self, loaded: LoadedModel) -> LastHiddenState:
        return LastHiddenState(loaded.model.model.vision_tower)

    def tokens_per_tile(self, loaded: LoadedModel) -> int:
        """Rows one image becomes, measured on the projector (the tower's neck gives output_channels at a side of
        image_size / patch_size)."""
        vision = loaded.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        features = torch.zeros(1, int(vision.output_channels), side, side)
        with torch.no_grad():
            return int(loaded.model.model.multi_modal_projector(features).shape[1])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        return spliced_stages(loaded, self.scheme(loaded), self._vision(loaded), m.model.multi_modal_projector,
                              int(loaded.config.vision_config.image_size), m.model.language_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        # one run per image: "<img>", its tiles' tokens, "</img>"; GotOcr2Processor cuts no tiles unless asked
        tiles = ImageTiles(tile="", row_end="", whole="", start=IMAGE_START, alone=IMAGE_START, end=IMAGE_END,
                           max_tiles=1, counted_by="num_patches", options={"crop_to_patches": False})
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_tile(loaded), image_token=IMAGE_PAD,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, IMAGE_PAD),
                            images_where_written=True, image_tiles=tiles, image_newline=False,
                            task_prompts={"<OCR>": " OCR: ", "<OCR_FORMAT>": " OCR with format: "})
