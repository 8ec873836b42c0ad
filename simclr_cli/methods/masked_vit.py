"""MAE's two networks around a library ViT: its encoder run on the visible patches only, through the ViT's own
layers, and the light decoder that predicts the pixels of the hidden ones (He et al. 2021, section 3).

A ViT of timm (`timm.models.vision_transformer.VisionTransformer` and its subclasses) or of torchvision
(`torchvision.models.VisionTransformer`) is masked through its own patch embedding, position embedding,
class (and register) tokens, blocks and final norm; nothing of it is copied or replaced, so the encoder
that MAE trains is `model.encoder` exactly as extract, probe and embed run it (unmasked):

    timm         patch_embed -> _pos_embed (class/register tokens, pos_embed, either no_embed_class layout,
                 dynamic_img_size) -> keep the visible patches -> norm_pre -> blocks -> norm, or fc_norm where
                 timm puts the final norm after the pooling (global_pool avg): then it is applied per token
    torchvision  _process_input (conv_proj) + encoder.pos_embedding[1:], class_token + pos_embedding[0] ->
                 keep the visible patches -> encoder.dropout -> encoder.layers -> encoder.ln

Masking: each image's N patches are ranked by its own uniform noise and the K = round(N (1 - mask_ratio))
with the smallest noise stay visible (the paper's shuffle-and-keep), in their image order, so every image
keeps the same K and a batch is one dense (B, P + K, D) tensor (P: class and register tokens). No mask token
enters the encoder. timm's patch dropout (patch_drop_rate) is MAE's own masking's place, so it is not run
in the masked pass.

Decoder (section 3, "MAE decoder"): a linear from the encoder's width to `width`, one learned mask token
for every hidden patch, fixed 2-D sin-cos position embeddings for the patches (zero for the class and
register tokens, which the decoder also sees), `depth` pre-norm transformer blocks (GELU, MLP 4x), a
LayerNorm and a linear to the p * p * 3 pixels of each patch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simclr_cli.errors import ConfigError
from simclr_cli.models import LibraryEncoder

# The ViTs that work, as the one-line refusal of any other encoder names them.
WORKING_VITS = ("timm:vit_tiny_patch16_224 with model.kwargs {img_size: 32, patch_size: 4} (any timm "
                "VisionTransformer), or torchvision:vit_b_16 with model.kwargs {image_size: 32} (torchvision's "
                "builders fix patch_size, so 16-pixel patches: 4 at 32 px)")


def vit_family(encoder: nn.Module) -> str | None:
    """'timm' or 'torchvision' for a library encoder whose model is a ViT MAE can mask; None otherwise."""
    net = getattr(encoder, "net", None)
    if not isinstance(encoder, LibraryEncoder) or net is None:
        return None
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # the timm extra is not installed: no timm encoder was built either
        TimmViT = None
    from torchvision.models import VisionTransformer as TorchvisionViT

    if TimmViT is not None and isinstance(net, TimmViT):
        return "timm"
    return "torchvision" if isinstance(net, TorchvisionViT) else None


def check_vit(encoder: nn.Module, arch: str) -> str:
    """The encoder's family, or one line naming the ViTs that work (MAE masks patches: no convnet has any)."""
    family = vit_family(encoder)
    if family is None:
        raise ConfigError(f"method.name=mae needs a ViT encoder; got model.arch {arch}: use {WORKING_VITS}")
    if family == "timm" and getattr(encoder.net, "attn_pool", None) is not None:
        raise ConfigError(f"method.name=mae does not train {arch}'s attention pool (model.kwargs global_pool: map): "
                          "use global_pool token or avg")
    return family


def patch_size(encoder: LibraryEncoder) -> int:
    """The side of a patch in pixels (square: model.kwargs patch_size is one number)."""
    net = encoder.net
    return int(net.patch_embed.patch_size[0]) if hasattr(net, "patch_embed") else int(net.patch_size)


def keep_count(patches: int, mask_ratio: float) -> int:
    """K, the visible patches of each image: round(N (1 - mask_ratio))."""
    return round(patches * (1 - mask_ratio))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, N, p * p * 3), patch n = row n // (S / p), column n % (S / p), in the order the
    patch embedding gives its tokens; each patch's pixels row by row, then channel."""
    b, c, s, _ = x.shape
    g = s // p
    x = x.reshape(b, c, g, p, g, p)  # (B, 3, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)


def unpatchify(patches: torch.Tensor, p: int) -> torch.Tensor:
    """`patchify`'s inverse: (B, N, p * p * 3) -> (B, 3, S, S)."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    x = patches.reshape(b, g, g, p, p, 3)  # (B, gh, gw, p, p, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE's, from the Transformer's 1-D ones): (grid * grid, width);
    the first half of the channels encodes the row, the second the column, each as sin then cos of
    pos / 10000^(2i / (width / 2)). `width` a multiple of 4."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (width / 4,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)  # (N,) each: patch n's row and column

    def one_d(p: torch.Tensor) -> torch.Tensor:
        angle = p[:, None] * omega[None, :]  # (N, width / 4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # (N, width / 2)

    return torch.cat([one_d(rows), one_d(cols)], dim=1).float()  # (N, width)


def visible_ids(noise: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, K) indices of the K patches with the smallest noise in each row of (B, N), in increasing order."""
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def _take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (B, K) of tokens (B, N, D) -> (B, K, D)."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def embed_patches(family: str, net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix (B, P, D): class/register tokens, patches (B, N, D)), position embeddings added, by the ViT's own
    layers."""
    if family == "timm":
        tokens = net._pos_embed(net.patch_embed(x))  # (B, P + N, D)
        return tokens[:, :net.num_prefix_tokens], tokens[:, net.num_prefix_tokens:]
    pos = net.encoder.pos_embedding  # (1, 1 + N, D): the class token's first
    patches = net._process_input(x) + pos[:, 1:]  # (B, N, D)
    return (net.class_token + pos[:, :1]).expand(x.shape[0], -1, -1), patches


def run_blocks(family: str, net: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The ViT's blocks and final norm on (B, T, D) tokens, per token."""
    if family == "timm":
        final = net.norm if not isinstance(net.norm, nn.Identity) else net.fc_norm  # fc_norm: global_pool avg
        return final(net.blocks(net.norm_pre(tokens)))
    e = net.encoder
    return e.ln(e.layers(e.dropout(tokens)))


class Decoder(nn.Module):
    """Encoded visible tokens (B, P + K, D) -> predicted pixels of every patch (B, N, p * p * 3)."""

    def __init__(self, encoder_width: int, prefix: int, p: int, depth: int, width: int, heads: int) -> None:
        super().__init__()
        self.prefix = prefix  # class and register tokens ahead of the patches
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))  # 1-D: no weight decay (train.optim's rule)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                                 activation="gelu", batch_first=True,
                                                                 norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, p * p * 3)
        for m in self.modules():  # MAE's initialisation: xavier-uniform linears, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: torch.Tensor, ids: torch.Tensor, patches: int) -> torch.Tensor:
        t = self.embed(encoded)  # (B, P + K, W)
        prefix, visible = t[:, :self.prefix], t[:, self.prefix:]
        b, _, w = visible.shape
        full = self.mask_token.to(visible.dtype).expand(b, patches, w)  # (B, N, W): the mask token everywhere...
        full = full.scatter(1, ids[..., None].expand(-1, -1, w), visible)  # ... but where a patch was seen
        full = full + sincos_2d(math.isqrt(patches), w).to(full.device, full.dtype)
        t = self.norm(self.blocks(torch.cat([prefix, full], dim=1)))  # (B, P + N, W)
        return self.pred(t[:, self.prefix:])  # (B, N, p * p * 3)


class MaskedAutoencoder(nn.Module):
    """`encoder` (the library ViT, exported as it is) + MAE's decoder: (views, noise) -> (predicted pixels of
    every patch (B, N, p * p * 3), mask (B, N): 1 where the patch was hidden)."""

    def __init__(self, encoder: LibraryEncoder, family: str, mask_ratio: float, depth: int, width: int,
                 heads: int) -> None:
        super().__init__()
        self.encoder, self.family, self.mask_ratio = encoder, family, mask_ratio
        self.head = None  # the encoder file carries no head: the decoder is not probed from
        self.patch = patch_size(encoder)
        net = encoder.net
        d = net.embed_dim if family == "timm" else net.hidden_dim
        prefix = net.num_prefix_tokens if family == "timm" else 1
        self.decoder = Decoder(d, prefix, self.patch, depth, width, heads)

    def encode(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's tokens of the visible patches (B, P + K, D), their indices (B, K))."""
        prefix, patches = embed_patches(self.family, self.encoder.net, x)  # (B, P, D), (B, N, D)
        ids = visible_ids(noise, keep_count(patches.shape[1], self.mask_ratio))  # (B, K)
        tokens = torch.cat([prefix, _take(patches, ids)], dim=1)  # (B, P + K, D)
        return run_blocks(self.family, self.encoder.net, tokens), ids

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, ids = self.encode(x, noise)
        n = noise.shape[1]
        pred = self.decoder(encoded, ids, n)  # (B, N, p * p * 3)
        mask = torch.ones_like(noise).scatter(1, ids, 0.0)  # (B, N): 0 seen, 1 hidden
        return pred, mask
