"""Prompt-conditioned mask heads.

Both heads take the backbone's features and one query vector per prompt and return one
logit map per prompt: `decode(features, queries) -> (B, P, X, Y, Z)`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from unisegtext.models.attention import Attention, sine_position_encoding_3d
from unisegtext.models.backbone import BackboneOutput
from unisegtext.models.config import UniSegTextConfig
from unisegtext.models.registry import register_head


class QueryDecoderLayer(nn.Module):
    """Pre-norm layer: queries self-attend, cross-attend to visual tokens, then an FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, num_registers: int, independent: bool):
        super().__init__()
        self.independent = independent
        self.norm_self = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads, dropout)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))
        self.registers = nn.Parameter(torch.randn(num_registers, d_model) * 0.02) if independent else None

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        """queries (B, P, D); memory and memory_pos (B, N, D) -> (B, P, D)."""
        b, p, d = queries.shape
        x = self.norm_self(queries)
        if self.independent:
            # each prompt attends to itself and the shared registers only
            single = rearrange(x, "b p d -> (b p) 1 d")
            regs = self.registers.to(x.dtype).unsqueeze(0).expand(b * p, -1, -1)
            context = torch.cat([single, regs], dim=1)
            queries = queries + rearrange(self.self_attn(single, context, context), "(b p) 1 d -> b p d", b=b)
        else:
            queries = queries + self.self_attn(x, x, x)
        x = self.norm_cross(queries)
        queries = queries + self.cross_attn(x, memory + memory_pos, memory)
        return queries + self.ffn(self.norm_ffn(queries))


class QueryDecoderHead(nn.Module):
    """SAT-style head: text queries attend to multi-scale visual tokens; a mask is the dot
    product of the refined query with the per-voxel embedding."""

    def __init__(self, config: UniSegTextConfig):
        super().__init__()
        dec, bb = config.decoder, config.backbone
        d = dec.d_model
        self.levels = tuple(dec.feature_levels)
        self.proj = nn.ModuleList(nn.Conv3d(bb.channels[k], d, kernel_size=1) for k in self.levels)
        self.level_embed = nn.Parameter(torch.randn(len(self.levels), d) * 0.02)
        self.layers = nn.ModuleList(
            QueryDecoderLayer(d, dec.num_heads, dec.ffn_dim, dec.dropout, dec.num_registers, dec.query_interaction == "independent")
            for _ in range(dec.num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, bb.embed_dim))
        self.text_skip = nn.Linear(d, bb.embed_dim) if dec.text_skip else None
        if self.text_skip is not None:  # zero: a warm start keeps its function at first
            nn.init.zeros_(self.text_skip.weight)
            nn.init.zeros_(self.text_skip.bias)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def _position(self, shape: tuple[int, int, int], d: int, device, dtype) -> torch.Tensor:
        key = (shape, d, str(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sine_position_encoding_3d(shape, d, device, dtype)
        return self._pos_cache[key]

    def forward(self, features: BackboneOutput, queries: torch.Tensor, return_mask_vectors: bool = False):
        """Logits (B, P, X, Y, Z); with `return_mask_vectors` also the mask vectors (B, P, E)."""
        text_queries = queries
        tokens, positions = [], []
        for i, (k, proj) in enumerate(zip(self.levels, self.proj)):
            feat = proj(features.levels[k])  # (B, D, x, y, z)
            shape = tuple(feat.shape[2:])
            tokens.append(rearrange(feat, "b d x y z -> b (x y z) d"))
            pos = self._position(shape, feat.shape[1], feat.device, feat.dtype) + self.level_embed[i].to(feat.dtype)
            positions.append(pos.unsqueeze(0).expand(feat.shape[0], -1, -1))
        memory = torch.cat(tokens, dim=1)  # (B, N, D)
        memory_pos = torch.cat(positions, dim=1)
        for layer in self.layers:
            queries = layer(queries, memory, memory_pos)
        mask_vectors = self.mask_embed(self.norm(queries))  # (B, P, E)
        if self.text_skip is not None:
            mask_vectors = mask_vectors + self.text_skip(text_queries)
        logits = torch.einsum("bpe,bexyz->bpxyz", mask_vectors, features.voxel_embedding)
        return (logits, mask_vectors) if return_mask_vectors else logits


class DynamicConvHead(nn.Module):
    """CLIP-Driven-Universal-style head: text embedding + pooled image features -> a controller
    that emits the weights of a small per-prompt 1x1x1 conv net run on the voxel embedding."""

    def __init__(self, config: UniSegTextConfig):
        super().__init__()
        dec, bb = config.decoder, config.backbone
        d, e, h = dec.d_model, bb.embed_dim, dec.dynamic_hidden
        self.shapes = [(h, e), (h, h), (1, h)]  # (out, in) per dynamic layer
        n_params = sum(o * i + o for o, i in self.shapes)
        self.image_proj = nn.Linear(bb.channels[-1], d)
        self.controller = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, n_params))

    def forward(self, features: BackboneOutput, queries: torch.Tensor, return_mask_vectors: bool = False):
        if return_mask_vectors:
            raise ValueError("the dynamic_conv head has no mask vectors; set optim.mask_separation_weight to 0")
        b, p, _ = queries.shape
        pooled = self.image_proj(features.bottleneck.mean(dim=(2, 3, 4)))  # (B, D)
        params = self.controller(torch.cat([queries, pooled.unsqueeze(1).expand(-1, p, -1)], dim=-1))  # (B, P, n)
        emb = features.voxel_embedding
        spatial = emb.shape[2:]
        x = rearrange(emb, "b e x y z -> b e (x y z)")
        offset = 0
        h = None
        for layer, (out_ch, in_ch) in enumerate(self.shapes):
            w = params[..., offset : offset + out_ch * in_ch].reshape(b, p, out_ch, in_ch)
            offset += out_ch * in_ch
            bias = params[..., offset : offset + out_ch].reshape(b, p, out_ch, 1)
            offset += out_ch
            h = torch.einsum("bpoi,bin->bpon", w, x) if layer == 0 else torch.einsum("bpoi,bpin->bpon", w, h)
            h = h + bias
            if layer < len(self.shapes) - 1:
                h = torch.relu(h)
        return h.reshape(b, p, *spatial)


@register_head("query_decoder")
def build_query_decoder(config: UniSegTextConfig) -> QueryDecoderHead:
    return QueryDecoderHead(config)


@register_head("dynamic_conv")
def build_dynamic_conv(config: UniSegTextConfig) -> DynamicConvHead:
    return DynamicConvHead(config)
