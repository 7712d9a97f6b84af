"""How prompt ids are laid out around image placeholders, declared by the adapter and stored in
the manifest, so the runtime (in-process, or inside a Triton python model) builds prompts with no
model code (``runtime.prompt.build_prompt_ids``):

* ``inline``: the image token's text is written into the user message (one per image, then a
  newline), the chat template is applied, and every image token is expanded to
  ``tokens_per_image`` copies, as Hugging Face's LlavaProcessor does.
* ``prefix``: the chat-formatted text is tokenized as is and ``tokens_per_image`` placeholder ids
  per image are put in front of it (prefix-fusion models prepend the image embeddings; BLIP-2's
  processor puts its ``num_query_tokens`` image tokens before the tokenized text the same way).

``task_prompts``: prompts the model's processor rewrites before tokenizing (Florence-2's task tokens:
``"<CAPTION>"`` -> ``"What does the image describe?"``), as its processor does: a task whose text
holds ``{input}`` takes the rest of the prompt (``"<OD_X>a dog"`` -> the text with ``input="a dog"``),
any other must be the whole prompt.

``text_before`` / ``text_after`` (``prefix`` layout): text the processor writes around the prompt after the
image placeholders (PaliGemma's: its BOS, then the prompt, then a newline; its tokenizer adds no special tokens).
An ``inline`` layout's ``text_before``: text the processor puts before every text it is given, chat-formatted or
not, after the tokenizer's own special tokens (Janus's default system prompt).

``image_tiles``: an image the processor cuts into a grid of tiles plus the whole image shrunk, each of
them ``tokens_per_image`` rows (Idefics3's and SmolVLM's): the text an image becomes depends on its grid,
which the image processor's preprocessing gives (its ``rows`` and ``cols``; :class:`ImageTiles`). Or an
image the processor cuts into as many patches as its size needs (Qwen2-VL's; :class:`ImagePatches`): its
rows follow its grid of patches. Or an image resized into the best of a few resolutions and cut into tiles
(LLaVA-NeXT's; :class:`AnyResTiles`): its rows follow its size, packed from its tiles' by the
``spliced_anyres`` scheme. Or an image given whole and, where it is long enough, as a few crops (Gemma 3's pan
and scan; :class:`ImageCrops`). Or an image given as an overview and a grid of equal slices, each as many patches as
its size needs (MiniCPM-V 4.6's; :class:`ImageSlices`), written with its number in the prompt.

``add_special_tokens``: whether the tokenizer adds its own special tokens (BOS) to the text: on where
the model's processor tokenizes plain text with them (BLIP-2, InstructBLIP). An ``inline`` layout
adds them as its processor does anyway, unless the text (a chat template's) already starts with the BOS.

:class:`ImageText` is the other direction: the prompt as an input of the image path (InstructBLIP's
Q-Former reads the instruction through a tokenizer of its own).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

LAYOUTS = ("inline", "prefix")


#: the longest side of an image at most this many times the shortest: Qwen2-VL's kin's processors refuse more, and so
#: does the runtime's image reader for every model
MAX_ASPECT_RATIO = 200

#: how a tiling image processor tells each image's tiles (``ImageTiles.counted_by``)
TILE_COUNTS = ("rows_cols", "num_patches")


@dataclass(frozen=True)
class ImageTiles:
    """How an image its processor cuts into tiles is written, and how that processor tells the tiles.

    Idefics3 and SmolVLM cut a grid of ``rows x cols`` tiles and say so in their ``rows`` and ``cols``
    outputs (``counted_by`` "rows_cols"): the text is ``start``, then for each row each tile's ``tile`` text
    ("{row}" and "{col}" filled in, from 1) and its tokens, then ``row_end``; then ``whole`` and the whole
    image's tokens, then ``end``. An image of no tiles (a grid of 0 x 0: small enough, or splitting off) is
    ``alone``, its tokens, ``end``. InternVL cuts ``num_patches`` tiles (the last the whole image where there
    are several; ``counted_by`` "num_patches"), all written as one run: ``start``/``alone`` "<img>", every
    tile's tokens, ``end`` "</img>" - a grid of 1 x (num_patches - 1) with empty tile texts.

    The image path sees the tiles, then the whole image, each one image of its batch (the processor's order);
    ``max_tiles`` is the most one image becomes. ``options``: what the model's processor passes its image
    processor (its ``images_kwargs``: Idefics3's ``return_row_col_info``, InternVL's ``crop_to_patches``)."""

    tile: str
    row_end: str
    whole: str
    alone: str
    end: str
    max_tiles: int
    start: str = ""
    counted_by: str = "rows_cols"
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    #: the text of each image row where it is not the layout's image token, the mark a prompt writes for an image
    #: (Aya Vision's processor replaces "<image>" and repeats "<|IMG_PATCH|>"); empty: that token
    token: str = ""
    #: each image is cut alone, whatever else its prompt holds (see AnyResTiles.one_prompt)
    one_prompt: ClassVar[bool] = False
    #: how a user makes its images fewer tokens (a build error's advice)
    fewer_tokens: ClassVar[str] = ("save the image processor with a smaller largest image (its max_pixels / longest "
                                   "edge: fewer tiles or patches per image)")

    def __post_init__(self) -> None:
        if self.counted_by not in TILE_COUNTS:
            raise ValueError(f"image tiles counted by {self.counted_by!r}: not one of {TILE_COUNTS}")

    @staticmethod
    def count(grid: tuple[int, int]) -> int:
        """Images of the image path that an image of this grid becomes."""
        rows, cols = grid
        return rows * cols + 1 if rows * cols else 1

    @staticmethod
    def tokens(grid: tuple[int, int], per_tile: int) -> int:
        """Image rows (placeholders) an image of this grid becomes."""
        return ImageTiles.count(grid) * per_tile

    def most_tokens(self, per_tile: int) -> int:
        return self.max_tiles * per_tile

    def arranged(self, processed: dict) -> dict:
        """The processor's outputs as the image path reads them (tiles are already one image each)."""
        return processed

    def text(self, grid: tuple[int, int], token: str, per_tile: int, index: int = 0) -> str:
        rows, cols = grid
        tokens = (self.token or token) * per_tile
        if not rows * cols:
            return self.alone + tokens + self.end
        lines = ("".join(self.tile.format(row=r + 1, col=c + 1) + tokens for c in range(cols)) + self.row_end
                 for r in range(rows))
        return self.start + "".join(lines) + self.whole + tokens + self.end

    def grids(self, processed: dict) -> list[tuple[int, int]]:
        """Each image's grid in its processor's outputs (with ``options``), in image order."""
        if self.counted_by == "rows_cols":
            return [(int(r), int(c)) for r, c in zip(np.ravel(processed["rows"]), np.ravel(processed["cols"]))]
        return [(1, int(n) - 1) if int(n) > 1 else (0, 0) for n in np.ravel(processed["num_patches"])]


@dataclass(frozen=True)
class ImageCrops:
    """An image its processor gives whole and then, where it is long enough, as a few crops, each crop one more image
    of the tower's size (Gemma 3's "pan and scan"): ``pixel_values [the whole image and its crops, for each image,
    ...]`` with each image's ``num_crops``. Each of them is written as ``image`` (its tokens included: Gemma 3's
    "\\n\\n<start_of_image>" + the soft token x N + "<end_of_image>\\n\\n"); an image with crops is written
    ``whole_lead`` + the whole image's + ``crops_lead`` + the crops' joined by ``crop_separator``, as its processor
    writes them. Its "grid" is (1, crops), (0, 0) where it has none (the tiles contract: ``count`` images of the image
    path, whole first, in the processor's order). ``options``: what the processor is given to cut crops."""

    image: str
    whole_lead: str
    crops_lead: str
    crop_separator: str
    max_crops: int
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    one_prompt: ClassVar[bool] = False  # each image cut alone
    #: the crops' count follows the image's aspect (a setting of the processor: ``options``)
    fewer_tokens: ClassVar[str] = "save the image processor with fewer crops per image (pan_and_scan_max_num_crops)"

    def __post_init__(self) -> None:
        if self.max_crops < 0:
            raise ValueError(f"at most {self.max_crops} crops per image: none or more")

    @property
    def max_tiles(self) -> int:
        return 1 + self.max_crops

    count = staticmethod(ImageTiles.count)
    tokens = staticmethod(ImageTiles.tokens)

    def most_tokens(self, per_tile: int) -> int:
        return self.max_tiles * per_tile

    def arranged(self, processed: dict) -> dict:
        return processed  # the whole images and crops are already one image each

    def text(self, grid: tuple[int, int], token: str = "", per_tile: int = 0, index: int = 0) -> str:
        """The text of an image of ``grid`` (``image`` holds its tokens: the layout's image token is the mark its
        chat template writes, which this text replaces)."""
        crops = grid[0] * grid[1]
        if not crops:
            return self.image
        return self.whole_lead + self.image + self.crops_lead + self.crop_separator.join([self.image] * crops)

    def grids(self, processed: dict) -> list[tuple[int, int]]:
        return [(1, int(n)) if int(n) else (0, 0) for n in np.ravel(processed["num_crops"])]


#: the image path's inputs :meth:`ImagePatches.arranged` adds beside ``pixel_values`` (the last two where it
#: declares attention windows)
PATCH_POSITIONS, PATCH_MASK, WINDOW_PATCHES, PATCH_SLOTS = "patch_positions", "patch_mask", "window_patches", "patch_slots"


def padded_rows(rows: list[np.ndarray], places: list[np.ndarray], depth: tuple[int, ...], dtype) -> dict:
    """The image path's rows of patches: ``pixel_values [rows, patches, *depth]`` zero-padded to the longest row, each
    patch's place (``PATCH_POSITIONS``) and realness (``PATCH_MASK``)."""
    width = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), width, *depth), dtype=dtype)
    positions = np.zeros((len(rows), width, 2), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for k, (row, place) in enumerate(zip(rows, places)):
        out[k, :len(row)], positions[k, :len(row)], mask[k, :len(row)] = row, place, 1
    return {"pixel_values": out, PATCH_POSITIONS: positions, PATCH_MASK: mask}


@dataclass(frozen=True)
class ImagePatches:
    """An image its processor cuts into as many patches as its size needs (Qwen2-VL's and Qwen2.5-VL's
    ``Qwen2VLImageProcessor``): the processor gives every image's patches in one flat ``pixel_values
    [patches of all images, channels x frames x patch x patch]`` and each image's grid of patches in
    ``image_grid_thw [images, (frames, rows, cols)]``, the patches of each ``merge x merge`` block
    consecutive. The image path reads them one image per row (:meth:`arranged`): ``pixel_values [images,
    patches, ...]`` padded with zeros to the batch's largest image, ``patch_positions [images, patches,
    (row, col)]`` and ``patch_mask [images, patches]`` (1 on real patches). An image becomes one run of
    ``rows x cols / merge²`` image tokens (its processor replaces the one image token its chat template
    writes with them); ``max_patches`` is the most patches the processor makes of one image (its
    ``max_pixels``), so ``PromptLayout.tokens_per_image`` is ``max_patches / merge²``.

    ``window``: patches per side of the attention windows of a tower whose blocks attend within windows
    (Qwen2.5-VL's; 0: none). The image path then also reads each image's patches window by window:
    ``window_patches [images, slots]``, ``window²`` slots per window (windows row-major over the image, each
    cut short at its right and bottom edges), the index of the patch in each slot or -1 for an empty one,
    and ``patch_slots [images, patches]``, the slot of each patch - so a windowed block attends within
    windows of ``window²`` slots rather than over the whole image with a mask.

    ``patch``: where the processor gives whole images instead, padded to its batch's largest (``pixel_values
    [images, channels, height, width]`` with each image's ``image_sizes``: Pixtral's), the patch side in pixels
    that :meth:`arranged` cuts each image into (each patch flattened channels, rows, columns, as a convolution of
    that kernel and stride reads it), in the same order of merge blocks; 0: the processor gives patches.
    ``row_end`` / ``end``: text after each row of an image's tokens, the last row's ``end`` instead (Pixtral's
    "[IMG_BREAK]" / "[IMG_END]"); empty: the tokens alone, one run (Qwen's).

    ``raster``: the processor gives each image's patches row-major over the whole image (PaddleOCR-VL's, whose
    projector merges the blocks itself) rather than by merge blocks; :meth:`arranged` puts them in the order of
    merge blocks all the same, so a merge block is always ``merge²`` consecutive patches of a row. Patches are
    flattened to one vector each (PaddleOCR-VL's processor gives them [channels, patch, patch]).

    A processor that gives each image's patches as one row of its own already, row-major over the image and padded
    to its largest image (``pixel_values [images, patches, depth]``) with each patch's (x, y) place in
    ``image_position_ids`` (-1 on padding: Gemma 4's), is read the same way (set ``raster``: the patches are taken
    in the order of merge blocks). ``begin``: text before an image's tokens (Gemma 4's begin-of-image token, with
    its end-of-image one as ``end``).

    ``framed``: the projector also writes a row after each row of merge blocks and one before and one after the image
    (HunYuanVL's newline, begin and end rows), each one more image token: an image of ``rows x cols`` blocks is
    ``rows x (cols + 1) + 2`` tokens."""

    merge: int
    max_patches: int
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    one_prompt: ClassVar[bool] = False  # each image cut alone
    #: how a user makes its images fewer tokens (a build error's advice)
    fewer_tokens: ClassVar[str] = ("save the image processor with a smaller largest image (its max_pixels / longest "
                                   "edge: fewer tiles or patches per image)")
    window: int = 0
    patch: int = 0
    row_end: str = ""
    end: str = ""
    raster: bool = False
    framed: bool = False
    begin: str = ""
    #: the image path sees each image as one image (the tiles contract's count)
    max_tiles: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.merge < 1 or self.max_patches < self.merge ** 2:
            raise ValueError(f"image patches merged {self.merge} x {self.merge}, at most {self.max_patches} per image: "
                             "a positive merge and room for one block")
        if self.window < 0 or self.window % self.merge:
            raise ValueError(f"attention windows of {self.window} patches: a multiple of the merge ({self.merge})")
        if self.patch < 0:
            raise ValueError(f"patches of {self.patch} pixels: a positive side, or 0 where the processor cuts them")

    @property
    def max_window_slots(self) -> int:
        """The most window slots one image's patches take (an image of ``max_patches`` in the worst shape)."""
        side = self.window
        worst = max((-(-h // side)) * (-(-(self.max_patches // h) // side))
                    for h in range(self.merge, self.max_patches + 1, self.merge)) if side else 0
        return worst * side * side

    @staticmethod
    def count(grid: tuple[int, int]) -> int:
        return 1

    def tokens(self, grid: tuple[int, int], per_tile: int = 0) -> int:
        rows, cols = grid[0] // self.merge, grid[1] // self.merge
        return rows * (cols + 1) + 2 if self.framed else rows * cols

    def text(self, grid: tuple[int, int], token: str, per_tile: int = 0, index: int = 0) -> str:
        if not (self.row_end or self.end):
            return self.begin + token * self.tokens(grid)
        rows, cols = grid[0] // self.merge, grid[1] // self.merge
        return self.begin + (token * cols + self.row_end) * (rows - 1) + token * cols + self.end

    def most_tokens(self, per_tile: int = 0) -> int:
        blocks = self.max_patches // self.merge ** 2
        if not self.framed:
            return blocks
        # a newline row per row of blocks: the tallest grid the processor makes is the most (images over
        # MAX_ASPECT_RATIO : 1 are refused, and each side is rounded to whole blocks: one block more at most)
        return max(rows * (blocks // rows + 1) + 2 for rows in range(1, blocks + 1)
                   if rows <= (MAX_ASPECT_RATIO + 1) * (blocks // rows))

    def grids(self, processed: dict) -> list[tuple[int, int]]:
        if self.patch:
            sizes = np.asarray(processed["image_sizes"]).reshape(-1, 2)
            grids = [(int(h) // self.patch, int(w) // self.patch) for h, w in sizes]
            if any(h % self.merge or w % self.merge or not h for h, w in grids) or (sizes % self.patch).any():
                raise ValueError(f"image sizes {sizes.tolist()}: each a whole number of merge blocks of "
                                 f"{self.merge} x {self.merge} patches of {self.patch} pixels (the image processor "
                                 "resizes to them with the model's own patch_size)")
            return grids
        if "image_position_ids" in processed:  # each image a padded row of patches with (x, y) places
            grids = []
            for place in np.asarray(processed["image_position_ids"]):
                real = place[place[:, 0] >= 0]
                h, w = (int(real[:, 1].max()) + 1, int(real[:, 0].max()) + 1) if len(real) else (0, 0)
                x, y = np.meshgrid(np.arange(w), np.arange(h))
                if not len(real) or h % self.merge or w % self.merge or len(real) != h * w \
                        or (real != np.stack([x.reshape(-1), y.reshape(-1)], axis=-1)).any():
                    raise ValueError(f"the image processor places an image's {len(real)} patches on a grid of {h} x "
                                     f"{w}: not every patch of whole merge blocks of {self.merge} x {self.merge}, "
                                     "first and row-major")
                grids.append((h, w))
            return grids
        thw = np.asarray(processed["image_grid_thw"]).reshape(-1, 3)
        if (thw[:, 0] != 1).any():  # a still image is one frame (its processor repeats it to the temporal patch)
            raise ValueError(f"image grids of {sorted(set(thw[:, 0].tolist()))} frames: an image is one")
        return [(int(h), int(w)) for _, h, w in thw]

    def _patches(self, processed: dict, grids: list[tuple[int, int]]) -> list[np.ndarray]:
        """Each image's patches [rows x cols, ...] in the order of ``patch_positions``."""
        pixels = np.asarray(processed["pixel_values"])
        if not self.patch and "image_position_ids" in processed:  # a padded row per image, its real patches first
            images = [row[:h * w].reshape(h * w, -1) for row, (h, w) in zip(pixels, grids)]
            return [image[(place := self.patch_positions(h, w))[:, 0] * w + place[:, 1]] if self.raster else image
                    for image, (h, w) in zip(images, grids)]
        if not self.patch:
            sizes = [h * w for h, w in grids]
            if sum(sizes) != len(pixels):
                raise ValueError(f"the image processor gives {len(pixels)} patches for grids totalling {sum(sizes)}")
            images = np.split(pixels.reshape(len(pixels), -1), np.cumsum(sizes)[:-1]) if grids else []
            if self.raster:  # row r, column c is patch r x cols + c: taken in the order of merge blocks
                images = [image[(place := self.patch_positions(h, w))[:, 0] * w + place[:, 1]]
                          for image, (h, w) in zip(images, grids)]
            return images
        p, out = self.patch, []
        for image, (h, w) in zip(pixels, grids):
            channels = image.shape[0]
            # [channels, h, p, w, p] -> [h, w, channels x p x p], then the patches in merge-block order
            cut = image[:, :h * p, :w * p].reshape(channels, h, p, w, p).transpose(1, 3, 0, 2, 4)
            place = self.patch_positions(h, w)
            out.append(cut.reshape(h, w, -1)[place[:, 0], place[:, 1]])
        return out

    def arranged(self, processed: dict) -> dict:
        """``processed`` with its ``pixel_values`` as one row of patches per image, padded, and each patch's
        place in its image (``PATCH_POSITIONS``: the rotary positions of the vision tower, in the processor's
        order of merge blocks) and realness (``PATCH_MASK``)."""
        grids = self.grids(processed)
        patches = self._patches(processed, grids)
        width = max((len(p) for p in patches), default=0)
        pixels = np.asarray(processed["pixel_values"])
        depth = patches[0].shape[1:] if patches else (int(np.prod(pixels.shape[1:])),) if not self.patch \
            else pixels.shape[1:]
        arranged = {**processed, **padded_rows(patches, [self.patch_positions(h, w) for h, w in grids], depth,
                                               pixels.dtype)}
        return {**arranged, **self._windows(grids, width)} if self.window else arranged

    def _windows(self, grids: list[tuple[int, int]], width: int) -> dict[str, np.ndarray]:
        """``WINDOW_PATCHES`` and ``PATCH_SLOTS`` (see the class docstring) for images of ``grids`` in rows of
        ``width`` patches."""
        side = self.window
        per_image = []
        for h, w in grids:
            place = self.patch_positions(h, w)
            cells = (-(-h // side), -(-w // side))
            window = (place[:, 0] // side) * cells[1] + place[:, 1] // side
            within = (place[:, 0] % side) * side + place[:, 1] % side
            slots = np.full(cells[0] * cells[1] * side * side, -1, dtype=np.int64)
            slots[window * side * side + within] = np.arange(h * w)
            per_image.append((slots, window * side * side + within))
        wide = max(len(slots) for slots, _ in per_image)
        windows = np.full((len(grids), wide), -1, dtype=np.int64)
        patch_slots = np.zeros((len(grids), width), dtype=np.int64)
        for k, (slots, of_patch) in enumerate(per_image):
            windows[k, :len(slots)], patch_slots[k, :len(of_patch)] = slots, of_patch
        return {WINDOW_PATCHES: windows, PATCH_SLOTS: patch_slots}

    def patch_positions(self, rows: int, cols: int) -> np.ndarray:
        """[rows x cols, 2]: (row, col) of each patch in the processor's order (merge blocks row-major,
        each block's patches row-major)."""
        m = self.merge
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        blocks = (rows // m, m, cols // m, m)
        return np.stack([r.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1),
                         c.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)


@dataclass(frozen=True)
class ImageSlices:
    """An image its processor gives as an overview (the whole image resized to about the tower's area at its own
    aspect) and, where it is larger, as ``rows x cols`` equal slices of the image resized to fit them, each of them a
    grid of patches of its own size (MiniCPM-V 4.6's and MiniCPM-OCR's ``MiniCPMV4_6ImageProcessor``). The processor
    packs every patch of every slice in one ``pixel_values [1, channels, patch, patches x patch]`` (NaViT's: each
    patch its ``patch`` columns, row-major within each slice), with each slice's grid of patches in ``target_sizes
    [slices, (rows, cols)]``, each image's slice count in ``num_patches_per_image`` and its grid of slices in
    ``grids`` ([0, 0]: the overview alone).

    The image path reads one row of patches per slice (the overview first, then the slices row-major: the
    processor's order), as :class:`ImagePatches` rows are read (``pixel_values [slices, patches, channels x patch x
    patch]`` padded to the batch's largest, ``patch_positions``, ``patch_mask``), the patches of each ``merge x
    merge`` block consecutive and, within a block, in 2 x 2 blocks of 2 x 2 blocks (the order the model merges them
    in: each 2 x 2 window of patches, then each 2 x 2 block of merged windows; ``merge`` is 2 where it merges once).
    Each slice becomes ``rows x cols / merge²`` image tokens. An image's "grid" is (overview rows, overview cols,
    slice rows, slice cols, each slice's rows, each slice's cols) in patches and slices.

    Its text, as the processor writes it: ``numbered`` (``{index}``: the image's place in its prompt, from 0; empty
    where the processor numbers no images), ``start`` + the overview's tokens + ``end``, then each row of slices
    (``slice_start`` + a slice's tokens + ``slice_end`` for each) joined by ``row_sep``."""

    merge: int
    max_patches: int
    max_slices: int
    patch: int
    start: str
    end: str
    slice_start: str
    slice_end: str
    row_sep: str = "\n"
    numbered: str = ""
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    one_prompt: ClassVar[bool] = False  # each image cut alone
    fewer_tokens: ClassVar[str] = ("save the image processor with fewer slices per image (max_slice_nums) or a smaller "
                                   "scale_resolution")
    #: no attention windows (``ImagePatches.window``)
    window: ClassVar[int] = 0
    max_window_slots: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.merge < 2 or self.merge & (self.merge - 1) or self.max_patches < self.merge ** 2:
            raise ValueError(f"slices merged in blocks of {self.merge} x {self.merge} patches, at most {self.max_patches} "
                             "per slice: a power of two from 2, and room for one block")
        if self.max_slices < 0 or self.patch < 1:
            raise ValueError(f"at most {self.max_slices} slices of patches of {self.patch} pixels: none or more slices, "
                             "a positive patch")

    @property
    def max_tiles(self) -> int:
        """Rows of the image path one image becomes at most: its overview and its slices."""
        return 1 + self.max_slices

    @staticmethod
    def count(grid: tuple[int, ...]) -> int:
        return 1 + grid[2] * grid[3]

    def tokens(self, grid: tuple[int, ...], per_tile: int = 0) -> int:
        overview, each = grid[0] * grid[1], grid[4] * grid[5]
        return (overview + grid[2] * grid[3] * each) // self.merge ** 2

    def most_tokens(self, per_tile: int = 0) -> int:
        return self.max_tiles * (self.max_patches // self.merge ** 2)

    def text(self, grid: tuple[int, ...], token: str, per_tile: int = 0, index: int = 0) -> str:
        h, w, rows, cols, sh, sw = grid
        unit = self.merge ** 2
        out = self.numbered.format(index=index) + self.start + token * (h * w // unit) + self.end
        row = (self.slice_start + token * (sh * sw // unit) + self.slice_end) * cols
        return out + self.row_sep.join([row] * rows) if rows * cols else out

    def grids(self, processed: dict) -> list[tuple[int, ...]]:
        sizes = np.asarray(processed["target_sizes"]).reshape(-1, 2)
        counts = [int(n) for n in np.ravel(processed["num_patches_per_image"])]
        layouts = np.asarray(processed["grids"]).reshape(-1, 2)
        if sum(counts) != len(sizes) or len(counts) != len(layouts):
            raise ValueError(f"the image processor gives {len(sizes)} slices for {len(counts)} images of "
                             f"{sum(counts)} slices")
        if (sizes % self.merge).any() or not sizes.all():
            raise ValueError(f"slice grids {sizes.tolist()}: each a whole number of {self.merge} x {self.merge} blocks "
                             "of patches (the image processor makes them with the model's own downsample_mode)")
        grids, first = [], 0
        for n, (rows, cols) in zip(counts, layouts.tolist()):
            slices = sizes[first + 1:first + n]
            if n != 1 + rows * cols or (len(slices) and (slices != slices[0]).any()):
                raise ValueError(f"an image of {n} slices for a grid of {rows} x {cols}, of sizes "
                                 f"{sizes[first:first + n].tolist()}: the overview and equal slices are read")
            h, w = (int(v) for v in sizes[first])
            sh, sw = (int(v) for v in slices[0]) if len(slices) else (0, 0)
            grids.append((h, w, int(rows), int(cols), sh, sw))
            first += n
        return grids

    def arranged(self, processed: dict) -> dict:
        """``processed`` as the image path reads it: a row of patches per slice, padded, with each patch's place in
        its slice (``PATCH_POSITIONS``, in the merge order) and realness (``PATCH_MASK``)."""
        self.grids(processed)  # the counts checked
        pixels = np.asarray(processed["pixel_values"])
        sizes = np.asarray(processed["target_sizes"]).reshape(-1, 2)
        p = self.patch
        if pixels.ndim != 4 or pixels.shape[0] != 1 or pixels.shape[2] != p or pixels.shape[3] % p:
            raise ValueError(f"packed pixel_values of shape {list(pixels.shape)}: [1, channels, {p}, patches x {p}] "
                             "read (the image processor's own patch_size)")
        channels, total = pixels.shape[1], pixels.shape[3] // p
        if int(sizes.prod(axis=1).sum()) != total:
            raise ValueError(f"the image processor gives {total} patches for slices totalling "
                             f"{int(sizes.prod(axis=1).sum())}")
        # [channels, p, patches, p] -> [patches, channels x p x p]: each patch as a convolution of its size reads it
        flat = pixels[0].reshape(channels, p, total, p).transpose(2, 0, 1, 3).reshape(total, -1)
        rows, places, first = [], [], 0
        for h, w in sizes.tolist():
            place = self.patch_positions(h, w)
            rows.append(flat[first + place[:, 0] * w + place[:, 1]])  # row-major in, merge order out
            places.append(place)
            first += h * w
        return {**processed, **padded_rows(rows, places, flat.shape[1:], pixels.dtype)}

    def patch_positions(self, rows: int, cols: int) -> np.ndarray:
        """[rows x cols, 2]: (row, col) of each patch in the merge order: ``merge x merge`` blocks row-major, each
        of them its 2 x 2 quarters row-major, down to the patches."""
        m = self.merge
        place = np.stack(np.meshgrid(np.arange(rows // m), np.arange(cols // m), indexing="ij"), -1).reshape(-1, 2)
        quarters = np.array([(0, 0), (0, 1), (1, 0), (1, 1)])
        while m > 1:
            place, m = (2 * place[:, None, :] + quarters).reshape(-1, 2), m // 2
        return place


def best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (height, width) of ``pinpoints`` an image of ``size`` (height, width) is resized into, as Hugging Face's
    ``select_best_resolution`` picks it: the one that keeps most of the image's pixels, then wastes the fewest."""
    height, width = size
    best, kept_most, wasted_least = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - kept
        if kept > kept_most or (kept == kept_most and wasted < wasted_least):
            best, kept_most, wasted_least = (int(h), int(w)), kept, wasted
    if best is None:
        raise ValueError(f"no resolution of {list(pinpoints)} takes an image of {height} x {width} pixels")
    return best


#: the image processor's output that :class:`AnyResTiles` reads each image's size from (and the scheme packs by)
IMAGE_SIZES = "image_sizes"


@dataclass(frozen=True)
class AnyResTiles:
    """An image its processor resizes into the best of a few resolutions (``pinpoints``), cuts into tiles of the
    tower's size and prefixes with the whole image shrunk to one tile (LLaVA-NeXT's ``LlavaNextImageProcessor``,
    "anyres"; LLaVA-OneVision's): its ``image_sizes [images, (height, width)]`` are each image's size, here its
    "grid". The image path sees every image's tiles, the whole image first (``pixel_values [tiles, ...]``,
    :meth:`arranged` drops the processor's padding between images), and makes ``patches x patches`` rows per tile
    and a last row, the model's ``image_newline``. An image's rows are packed as the model's
    ``pack_image_features`` packs them (:meth:`packing`): the whole image's, then the tiles' rows as one picture cut
    back to the image's aspect (``unpad_image``) - shrunk (bilinear) where it holds more than ``picture_tiles``
    tiles' rows by over 10% (LLaVA-OneVision's ``anyres_max_N``; 0: never) -, each row of it followed by the
    newline. ``max_tiles``: the most tiles (the whole image included) an image becomes; ``options``: what the
    model's processor passes its image processor. ``one_prompt``: the image processor is given a request's images as
    one prompt's and tiles an image only where it is the prompt's one (LLaVA-OneVision's: several are each padded to
    a square, one tile, packed as its rows and a newline); such an image's "grid" is (0, 0)."""

    tile: int
    patches: int
    pinpoints: tuple[tuple[int, int], ...]
    max_tiles: int
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    picture_tiles: int = 0
    one_prompt: bool = False
    #: its resolutions are the model's own (image_grid_pinpoints): no processor setting makes fewer tokens
    fewer_tokens: ClassVar[str] = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pinpoints", tuple(tuple(int(v) for v in p) for p in self.pinpoints))
        if any(h % self.tile or w % self.tile or not h or not w for h, w in self.pinpoints):
            raise ValueError(f"resolutions {list(self.pinpoints)} are not whole tiles of {self.tile} pixels")

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = best_resolution(size, self.pinpoints)
        return h // self.tile, w // self.tile

    def count(self, size: tuple[int, int]) -> int:
        """Images of the image path (tiles) an image of ``size`` becomes (one where it is not tiled: (0, 0))."""
        if not any(size):
            return 1
        rows, cols = self._grid(size)
        return 1 + rows * cols

    def _kept(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(rows, cols, first row, first col) of the tiles' feature picture kept for an image of ``size``: its
        padding cut off as ``unpad_image`` cuts it (the same float arithmetic, so the same rounding)."""
        height, width = size
        rows, cols = self._grid(size)
        h, w = rows * self.patches, cols * self.patches
        if width / height > w / h:
            padding = (h - int(round(height * (w / width), 7))) // 2
            return h - 2 * padding, w, padding, 0
        padding = (w - int(round(width * (h / height), 7))) // 2
        return h, w - 2 * padding, 0, padding

    def _shrunk(self, h: int, w: int) -> tuple[int, int]:
        """The packed picture's rows and cols for a kept picture of ``h x w`` (OneVision's shrink, else as kept)."""
        if not self.picture_tiles:
            return h, w
        ratio = math.sqrt(h * w / (self.picture_tiles * self.patches ** 2))
        return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)

    def tokens(self, size: tuple[int, int], per_tile: int = 0) -> int:
        """Image rows (placeholders) an image of ``size`` becomes."""
        if not any(size):  # one tile: its rows and a newline
            return self.patches ** 2 + 1
        h, w = self._shrunk(*self._kept(size)[:2])
        return self.patches ** 2 + h * (w + 1)

    def most_tokens(self, per_tile: int = 0) -> int:
        """Image rows an image becomes at most: of every picture a resolution can keep (its whole height or width,
        the other cut back by whole pairs of rows or cols), the most rows after the shrink (which is not monotonic:
        a picture cut back past the shrink's threshold can give more rows than the whole one)."""
        p, most = self.patches, 0
        for h, w in self.pinpoints:
            rows, cols = h // self.tile * p, w // self.tile * p
            kept = [(rows, c) for c in range(cols, 0, -2)] + [(r, cols) for r in range(rows, 0, -2)]
            most = max(most, *(p * p + h2 * (w2 + 1) for h2, w2 in (self._shrunk(r, c) for r, c in kept)))
        return most

    def text(self, size: tuple[int, int], token: str, per_tile: int = 0, index: int = 0) -> str:
        return token * self.tokens(size)

    def grids(self, processed: dict) -> list[tuple[int, int]]:
        """Each image's size (height, width) in its processor's outputs, in image order; (0, 0) for an image its
        processor did not tile (one of several in a prompt: its ``batch_num_images``)."""
        sizes = [(int(h), int(w)) for h, w in np.asarray(processed[IMAGE_SIZES]).reshape(-1, 2)]
        if not self.one_prompt or "batch_num_images" not in processed:
            return sizes
        several = [n > 1 for n in np.ravel(processed["batch_num_images"]) for _ in range(int(n))]
        return [(0, 0) if untiled else size for size, untiled in zip(sizes, several)]

    def arranged(self, processed: dict) -> dict:
        """The processor's ``pixel_values [images, most tiles, ...]`` (zeros after each image's own tiles) as the
        image path reads them: ``[tiles of every image, ...]``; ``image_sizes`` as int64."""
        out = dict(processed)
        sizes = self.grids(processed)
        pixels = np.asarray(processed["pixel_values"])
        if pixels.ndim == 5:
            out["pixel_values"] = np.concatenate([pixels[k, :self.count(size)] for k, size in enumerate(sizes)])
        out[IMAGE_SIZES] = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        return out

    def packing(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """An image's packed rows as weighted sums of its tiles' rows ``[count(size) x (patches² + 1)]`` (each tile's
        ``patches²`` rows, then the newline): ``(index [rows, k], weight [rows, k])``, k = 1 (a row taken as it is)
        or 4 (a shrunk picture's row, PyTorch's bilinear ``interpolate`` without corner alignment, in float32). The
        whole image's rows, then the picture row by row, each followed by a newline."""
        unit, p = self.patches ** 2 + 1, self.patches
        if not any(size):  # not tiled: the one tile's rows, then its newline
            return np.arange(unit, dtype=np.int64)[:, None], np.ones((unit, 1), np.float32)
        _, cols = self._grid(size)
        kept_h, kept_w, top, left = self._kept(size)
        h, w = self._shrunk(kept_h, kept_w)
        ys, yw = _linear_sources(kept_h, h)
        xs, xw = _linear_sources(kept_w, w)
        y, x = ys[:, None, :, None] + top, xs[None, :, None, :] + left  # [h, w, 2, 2] picture coordinates
        picture = (1 + (y // p) * cols + x // p) * unit + (y % p) * p + x % p
        weight = yw[:, None, :, None] * xw[None, :, None, :]
        k = 1 if (h, w) == (kept_h, kept_w) else 4
        picture, weight = picture.reshape(h, w, 4)[..., :k], weight.reshape(h, w, 4)[..., :k]

        def taken(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # rows as they are, in k-wide sources
            pad = ((0, 0), (0, k - 1))
            return np.pad(rows[:, None], pad), np.pad(np.ones((len(rows), 1), np.float32), pad)

        newline, newline_weight = (a.reshape(h, 1, k) for a in taken(np.full(h, unit - 1)))
        base, base_weight = taken(np.arange(p * p))
        index = np.concatenate([base, np.concatenate([picture, newline], axis=1).reshape(-1, k)])
        weights = np.concatenate([base_weight, np.concatenate([weight, newline_weight], axis=1).reshape(-1, k)])
        return index.astype(np.int64), weights.astype(np.float32)


def _linear_sources(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``out`` positions resampled from ``size``: its two source positions and their weights, as
    PyTorch's linear ``interpolate`` (``align_corners=False``) computes them in float32; where ``out == size``, each
    position itself with weight 1 (and 0)."""
    if out == size:
        first = np.arange(size)
        return np.stack([first, first], axis=1), np.tile(np.float32([1, 0]), (size, 1))
    scale = np.float32(size) / np.float32(out)
    # scale x (i + 0.5) - 0.5 rounded once, as the fused multiply-add of PyTorch's CPU kernel (the float32 product
    # is exact in float64): the weights equal PyTorch's to the bit, where two roundings differ by up to 8e-6
    source = (np.float64(scale) * (np.arange(out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0))
    first = source.astype(np.int64)
    far = np.clip(source - first.astype(np.float32), np.float32(0), np.float32(1))
    second = first + (first < size - 1)
    return np.stack([first, second], axis=1), np.stack([np.float32(1) - far, far], axis=1).astype(np.float32)


def image_arrangement(d: dict[str, Any] | None) -> "ImageTiles | ImagePatches | ImageSlices | AnyResTiles | ImageCrops | None":
    """A layout's ``image_tiles`` from its manifest form (slices are told by their ``max_slices``, patches by their
    ``merge``, any-resolution tiles by their ``pinpoints``, crops by their ``max_crops``)."""
    if not d:
        return None
    if "max_slices" in d:
        return ImageSlices(**d)
    if "merge" in d:
        return ImagePatches(**d)
    if "max_crops" in d:
        return ImageCrops(**d)
    return AnyResTiles(**d) if "pinpoints" in d else ImageTiles(**d)


@dataclass(frozen=True)
class PromptLayout:
    kind: str  # one of LAYOUTS
    image_token_id: int
    tokens_per_image: int
    image_token: str | None = None  # text form of the image token (inline layout only)
    use_chat_template: bool = True
    add_special_tokens: bool = False
    #: a newline between an image part and the text after it (the llava convention); off where the
    #: model's own chat template writes the image token straight before the text (mllama's)
    image_newline: bool = True
    #: the chat template reads each message's content as typed parts and writes the image token itself
    #: (the processor templates HF ships with LLaVA checkpoints); else each turn is one string with the
    #: image tokens already in it (a text LM's template, or none)
    chat_parts: bool = False
    #: task token -> the text the processor puts in its place (see the module docstring)
    task_prompts: dict[str, str] = field(default_factory=dict, hash=False)
    #: where no chat template lays the prompt out, a prompt may write the image token where each image
    #: goes, one per image, as the model's processor takes a raw prompt (LlavaProcessor expands each in
    #: place); else images go before the text and the token in a prompt is refused
    images_where_written: bool = False
    #: the text each written image token becomes (inline layout), as the model's processor writes it; empty:
    #: the image token ``tokens_per_image`` times (LLaVA's). Gemma 3's processor writes its begin-of-image
    #: token and puts "\n\n<start_of_image>" + the soft token x N + "<end_of_image>\n\n" in its place
    image_sequence: str = ""
    #: text around the prompt's (``prefix`` layout; an ``inline`` one's text before; see the module docstring)
    text_before: str = ""
    text_after: str = ""
    #: an image cut into tiles or patches by its processor (see the module docstring); None: one image, one run
    #: of ``tokens_per_image`` tokens
    image_tiles: "ImageTiles | ImagePatches | ImageSlices | AnyResTiles | ImageCrops | None" = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"prompt layout {self.kind!r} is not one of {LAYOUTS}")
        if self.kind == "inline" and not self.image_token:
            raise ValueError("an inline prompt layout needs the image token's text")
        if self.image_tiles is not None and (self.kind != "inline" or self.image_sequence):  # ImageCrops.image holds it
            raise ValueError("tiled images are written inline, by their tiles' texts, not an image_sequence")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["image_newline"]:  # the default is left out: such manifests stay readable by earlier versions
            del d["image_newline"]
        if not d["task_prompts"]:  # likewise
            del d["task_prompts"]
        if not d["chat_parts"]:  # likewise
            del d["chat_parts"]
        if not d["images_where_written"]:  # likewise
            del d["images_where_written"]
        for name in ("image_sequence", "text_before", "text_after", "image_tiles"):  # likewise
            if not d[name]:
                del d[name]
        tiles = d.get("image_tiles") or {}
        patches = ("patch", "row_end", "end", "raster", "framed", "begin")
        defaults = (() if "max_slices" in tiles else patches if "merge" in tiles else
                    ("token",) if "counted_by" in tiles else ())
        for name in defaults:  # likewise (ImagePatches' and ImageTiles' defaults)
            if not tiles[name]:
                del tiles[name]
        return d

    @property
    def tiled(self) -> bool:
        return self.image_tiles is not None

    def expanded_image(self, grid: tuple[int, ...] = (0, 0), index: int = 0) -> str:
        """The text one written image token becomes (``image_sequence``; a tiled image's, by its grid and its place
        in the prompt, from 0)."""
        if self.image_tiles is not None:
            return self.image_tiles.text(grid, self.image_token or "", self.tokens_per_image, index)
        return self.image_sequence or (self.image_token or "") * self.tokens_per_image

    @property
    def images_together(self) -> bool:
        """Whether an image's rows depend on the other images of its prompt (``AnyResTiles.one_prompt``): encoded,
        and cached, together."""
        return bool(self.image_tiles is not None and self.image_tiles.one_prompt)

    @property
    def most_image_tokens(self) -> int:
        """Image placeholders the largest image becomes."""
        return self.image_tiles.most_tokens(self.tokens_per_image) if self.image_tiles else self.tokens_per_image

    def image_tokens(self, grid: tuple[int, int] = (0, 0)) -> int:
        """Image placeholders one image of ``grid`` becomes."""
        if self.image_tiles is not None:
            return self.image_tiles.tokens(grid, self.tokens_per_image)
        return self.tokens_per_image

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptLayout":
        tiles = d.get("image_tiles")
        return cls(**{**d, "image_tiles": image_arrangement(tiles)} if tiles else d)


@dataclass(frozen=True)
class ImageText:
    """The prompt as image-stage inputs (``role="prompt"``): the request's prompt text, as given,
    tokenized by the tokenizer saved in the build folder ``tokenizer`` with its special tokens, the
    same row repeated for each of the request's images: ``ids`` and ``mask`` ``[images, tokens]``
    int64. At most ``max_length`` tokens (the reading module's position limit)."""

    tokenizer: str
    ids: str
    mask: str
    max_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ImageText | None":
        return cls(**d) if d else None
