"""ME-rPPG hyper-parameters: the published network (`InfinitePulse([2]*4)` of open-rppg 0.1.1)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from transforms.resample import FPS


@dataclass(frozen=True)
class MEConfig:
    n_blocks: int = 4  # temporal-spatial blocks (TSB); each ends with a 2x2 stride-2 downsample
    layers_per_block: int = 2  # SSConv layers per block
    filters: int = 32  # K, feature channels of every block
    d_state: int = 128  # N, SSD state size
    expand: int = 2  # E, Mamba-2 inner width = E * model width
    block_k_conv: int = 12  # causal depthwise conv width of the block Mamba-2 layers
    head_k_conv: int = 4  # ... and of the two head Mamba-2 layers
    head_width: int = 32  # width of the head (out_proj and its Mamba-2 layers)
    head_layers: int = 2  # Mamba-2 layers in the head
    chunk: int = 160  # L, frames per chunk (SSD chunk and TN linear-trend window)
    image: int = 36  # H = W, face crop size
    channels: int = 3  # RGB
    fps: float = FPS  # frame rate the weights were trained at
    tn_eps: float = 2e-6  # TN variance floor
    norm_eps: float = 1e-5  # gated RMSNorm epsilon
    # dtype of the convolutions' and dense1's products ("bfloat16" for GPUs; accumulation, TN, SSD and
    # state stay float32). The published model is float32; bfloat16's parity bound is in test_model_parity.
    compute_dtype: str = "float32"

    @property
    def tn_half_life(self) -> float:
        """Half-life (s) of TN flow's recursive moving average: half a chunk."""
        return self.chunk / self.fps / 2

    @property
    def block_d_model(self) -> int:
        """Width entering a block Mamba-2 layer: SSConv's conv1 widens K to 2K before the spatial mean."""
        return 2 * self.filters

    @property
    def block_headdim(self) -> int:  # P of the block layers
        return self.filters

    @property
    def head_headdim(self) -> int:  # P of the head layers
        return self.head_width

    @property
    def sizes(self) -> tuple[int, ...]:
        """Spatial size entering each block: 36, 18, 9, 5 ('same' stride-2 downsampling rounds up)."""
        out, s = [], self.image
        for _ in range(self.n_blocks):
            out.append(s)
            s = math.ceil(s / 2)
        return tuple(out)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.image, self.image, self.channels)


ME = MEConfig()

# The fields that shape a network's parameters: what a training run may change (`pulsepipe train`'s
# `architecture`) and a weights file records. The chunk, crop size and frame rate are the data's, fixed.
ARCHITECTURE_FIELDS = ("n_blocks", "layers_per_block", "filters", "d_state", "expand", "block_k_conv",
                       "head_k_conv", "head_width", "head_layers")


def architecture(cfg: MEConfig) -> dict[str, int]:
    """cfg's ARCHITECTURE_FIELDS, by name."""
    return {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS}


@dataclass(frozen=True)
class PhysMambaConfig:
    """PhysMamba hyper-parameters: the published network (`PhysMamba()` of open-rppg 0.1.1), as it runs."""

    frames: int = 128  # T, frames per chunk; the head's reshape uses H for T, so T == H
    image: int = 128  # H = W, face crop size
    channels: int = 3  # RGB
    fps: float = FPS  # frame rate the weights were trained at
    theta: float = 0.5  # CDC temporal-difference weight (PhysMamba passes 0.5 to every CDC)
    d_state: int = 16  # N, Mamba state size per direction
    d_conv: int = 4  # depthwise conv width of the Mamba (non-causal, 'same')
    expand: int = 2  # E, Mamba inner width = E * channels
    bn_eps: float = 1e-3  # Keras BatchNormalization default
    ln_eps: float = 1e-5  # the MambaLayer's LayerNormalization(epsilon=1e-5)
    output_eps: float = 1e-5  # the head's standardisation over time
    scan_eps: float = 1e-12  # the selective scan's divisor floor, as written
    scan_chunk: int = 256  # positions per step of our chunked selective scan (speed only, not the model's)

    def __post_init__(self):
        if self.frames != self.image or self.frames % 16:
            raise ValueError(f"PhysMamba needs frames == image (the head reshapes by H) and a multiple of 16, "
                             f"got frames={self.frames}, image={self.image}")

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.image, self.image, self.channels)


PHYSMAMBA = PhysMambaConfig()
