"""Images in, answers out: a small ViT image encoder and an MLP projector in front of the language
model (LLaVA: Liu et al. 2023, "Visual Instruction Tuning"; 1.5's two-layer GELU projector).

    image (3, S, S) in [-1, 1]
      -> patch embedding: a stride-P convolution, (S/P)^2 patches of `width` + learned positions
      -> n_layer pre-norm blocks (LayerNorm, bidirectional multi-head attention, LayerNorm, GELU MLP)
      -> the last block's patch features (no final norm, as LLaVA reads its tower's hidden states)
      -> projector: Linear(width, d_model), GELU, Linear(d_model, d_model)
      -> k = (S/P)^2 embeddings, placed at the k <|image|> positions of the prompt

The names and layout are a SigLIP vision tower's (`transformers` SiglipVisionModel: patch_embedding,
position_embedding, layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2},
gelu_pytorch_tanh) and LLaVA's projector (linear_1, GELU, linear_2), so the tower maps onto
a SiglipVisionConfig + LlavaConfig one tensor per tensor.

The <|image|> placeholder is not a BPE token: its id is the language model's vocab_size, the first
id past the embedding table (tokenizer/chat.py renders it), so text-only tokenizers, ids and
checkpoints are unchanged; a text-only prompt goes through `Transformer` exactly as before.
The loss never falls on an image position (`VisionLanguageModel.forward`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmforge.errors import UserError
from llmforge.model.transformer import Transformer, token_cross_entropy


@dataclass
class VisionTowerConfig:
    """The image encoder's shape (saved in a vision checkpoint's config.json as "vision")."""
    image_size: int = 32        # images are resized to image_size x image_size RGB
    patch_size: int = 8         # (image_size / patch_size)^2 patches = image tokens in the prompt
    width: int = 128            # hidden size of the tower's blocks
    n_layer: int = 3
    n_head: int = 4
    mlp_ratio: int = 4          # the blocks' MLP is width * mlp_ratio wide
    norm_eps: float = 1e-6

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(f"vision.tower.image_size={self.image_size} is not a multiple of "
                            f"vision.tower.patch_size={self.patch_size}; pick sizes that divide")
        if self.width % self.n_head:
            raise UserError(f"vision.tower.width={self.width} is not divisible by vision.tower.n_head={self.n_head}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the patches (every patch sees every patch)."""

    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = (p(x).view(B, N, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, W))


class MLP(nn.Module):
    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """A ViT (Dosovitskiy et al. 2021) without a class token: (B, 3, S, S) -> (B, patches, width)."""

    def __init__(self, cfg: VisionTowerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        nn.init.normal_(self.position_embedding.weight, 0.0, 0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)   # patches in row-major order
        x = x + self.position_embedding.weight[None]
        for layer in self.layers:
            x = layer(x)
        return x


class Projector(nn.Module):
    """Patch features -> language-model input embeddings (LLaVA-1.5's MLP)."""

    def __init__(self, width: int, d_model: int):
        super().__init__()
        self.linear_1 = nn.Linear(width, d_model)
        self.linear_2 = nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionLanguageModel(nn.Module):
    """The language model (`trunk`, a Transformer) with an image encoder and projector in front.

    Prompts hold `image_tokens` copies of `image_token_id` per image; `images` (N, 3, S, S) are
    the prompt's images in order, and their projected patches replace those positions' embeddings
    (row-major: the first image's k patches fill the first k image positions). Without image
    positions every call is the trunk's own, bit for bit."""

    def __init__(self, trunk: Transformer, tower: VisionTowerConfig):
        super().__init__()
        self.trunk = trunk
        self.encoder = VisionEncoder(tower)
        self.projector = Projector(tower.width, trunk.cfg.d_model)
        self.tower = tower

    # what the engine, the loop and the checkpoint code read of a policy
    @property
    def cfg(self):
        return self.trunk.cfg

    @property
    def lm_head(self):
        return self.trunk.lm_head

    @property
    def image_token_id(self) -> int:
        return self.trunk.cfg.vocab_size

    @property
    def image_tokens(self) -> int:
        return self.tower.num_patches

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.trunk.flops_per_token(seq_len)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N * image_tokens, d_model): the embeddings the image positions take."""
        dtype = self.encoder.patch_embedding.weight.dtype
        return self.projector(self.encoder(pixels.to(dtype))).flatten(0, 1)

    def hidden_states(self, idx: torch.Tensor, cache=None, positions=None, slots=None,
                      image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        is_image = idx == self.image_token_id
        have = 0 if image_embeds is None else image_embeds.shape[0]
        if idx.device.type == "cpu":   # checked exactly here; on an accelerator without a host sync per step
            n = int(is_image.sum())
            if n == 0:
                return self.trunk.hidden_states(idx, cache, positions, slots)
            if n != have:
                raise ValueError(f"the prompt has {n} image positions but {have} image embeddings were given "
                                 f"({self.image_tokens} per image)")
        elif image_embeds is not None:
            torch._assert_async(is_image.sum() == have)
        if image_embeds is None:
            return self.trunk.hidden_states(idx, cache, positions, slots)
        x = self.trunk.embed(idx.masked_fill(is_image, 0))
        x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))
        return self.trunk.hidden_states(idx, cache, positions, slots, embeds=x)

    def forward(self, idx, targets=None, cache=None, positions=None, slots=None, loss_mask=None, images=None):
        embeds = self.encode_images(images) if images is not None and len(images) else None
        logits = self.lm_head(self.hidden_states(idx, cache, positions, slots, image_embeds=embeds))
        if targets is None:
            return logits
        # no loss on image positions: neither predicting a placeholder nor predicting from one
        keep = (targets != self.image_token_id) & (idx != self.image_token_id)
        mask = keep.float() if loss_mask is None else loss_mask * keep
        return logits, token_cross_entropy(logits, targets.masked_fill(~keep, 0), mask)
