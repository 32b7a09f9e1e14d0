"""A compact Vision Transformer for the embedded 32–64² grey images (Dosovitskiy et al.,
"An Image is Worth 16x16 Words", ICLR 2021), built from modules the fused tangent pass runs."""

from __future__ import annotations

import torch
from torch import nn

from fastinfluence.layers.attention import ClassTokenAndPositions


class Block(nn.Module):
    """A pre-norm encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` with
    ``MLP = Linear(dim, mlp_ratio·dim) → GELU → Linear(mlp_ratio·dim, dim)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A Vision Transformer classifier on ``[B, C, H, W]`` images.

    The image is cut into ``(H/patch)·(W/patch)`` patches, each embedded by a strided
    ``Conv2d`` (``patch × patch``, stride ``patch``) into ``dim`` features; a class token is
    put first and learned position embeddings added (:class:`ClassTokenAndPositions`);
    ``depth`` pre-norm :class:`Block`\\ s follow, a final LayerNorm, and a Linear head on the
    class token gives the logits ``[B, num_classes]``.

    Args:
        num_classes: output classes.
        image_size: the (square) input's side; a multiple of ``patch``.
        patch: the patches' side.
        dim: the token width; a multiple of ``heads``.
        depth: the number of blocks.
        heads: attention heads per block.
        in_channels: image channels (1: grey).
        mlp_ratio: the MLP's hidden width over ``dim``.
    """

    def __init__(self, num_classes: int, image_size: int = 32, patch: int = 8, dim: int = 32,
                 depth: int = 2, heads: int = 2, in_channels: int = 1,
                 mlp_ratio: int = 2) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.flatten = nn.Flatten(2)
        self.tokens = ClassTokenAndPositions((image_size // patch) ** 2, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.flatten(self.patch_embedding(x)).transpose(1, 2)  # [B, N, dim]
        tokens = self.norm(self.blocks(self.tokens(patches)))
        return self.head(tokens[:, 0])


def vit_tiny(num_classes: int, image_size: int = 32, patch: int = 8, dim: int = 32,
             depth: int = 2, heads: int = 2, in_channels: int = 1) -> ViT:
    """A ViT small enough for CPU influence on the embedded grey images: at the defaults,
    16 patches of 8² at 32² (64 at 64²), width 32, 2 blocks of 2 heads (~18k parameters)."""
    return ViT(num_classes, image_size, patch, dim, depth, heads, in_channels)
