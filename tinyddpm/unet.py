"""The DDPM denoiser eps_theta(x_t, t): the paper's UNet, scaled to MNIST.

Follows the official code (hojonathanho/diffusion, `diffusion_tf/models/unet.py`)
and DDPM's Appendix B. It is a UNet changed in three ways:
1. a sinusoidal embedding of t, passed through a small MLP, enters every
   residual block (added to its feature map after the first convolution);
2. every convolution stage is a ResNet block (GroupNorm, SiLU, 3x3 conv, twice,
   plus a skip connection);
3. single-head self-attention over all positions at the listed resolutions.

Parameters are created in the same order, with the same shapes, as in the
PyTorch reference that benchmarks/bench_step.py defines (and as in the official
code's model), so weights carry over by position; tests/test_unet.py checks
the outputs against a fixture made that way.
"""
import numpy as np

import autograd.functional as F
from autograd import nn

PRESETS = {
    # mnist-tiny: the CPU default, 1,112,801 parameters.
    "mnist-tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                       dropout=0.0, num_groups=8),
    # mnist: the GPU default, 6,469,889 parameters.
    "mnist": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,),
                  dropout=0.1, num_groups=32),
}


def _zero(conv):
    # The official code initializes the last layer of each residual branch at
    # zero scale, so every block starts as the identity and the untrained
    # network predicts eps = 0 (a loss of about 1, the mean of eps^2, at step 0)
    # instead of adding random noise on top of its input; the weights leave
    # zero after one update.
    conv.weight.data[...] = 0
    conv.bias.data[...] = 0
    return conv


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, + Linear(SiLU(temb)), GroupNorm, SiLU, dropout, conv3x3; + skip.

    Each GroupNorm is followed by its SiLU in one layer, nn.GroupNormSiLU.
    """

    def __init__(self, cin, cout, temb_dim, dropout, num_groups, rng, dtype):
        self.norm1 = nn.GroupNormSiLU(num_groups, cin, dtype=dtype)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, rng=rng, dtype=dtype)
        self.temb_proj = nn.Linear(temb_dim, cout, rng=rng, dtype=dtype)
        self.norm2 = nn.GroupNormSiLU(num_groups, cout, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1, rng=rng, dtype=dtype))
        # A 1x1 convolution matches the channel count when the block changes it.
        self.skip = nn.Conv2d(cin, cout, 1, rng=rng, dtype=dtype) if cin != cout else None

    def forward(self, x, temb):
        B, C, H, W = x.shape
        h = self.conv1(self.norm1(x))                                   # norm, SiLU, conv
        h = h + self.temb_proj(F.silu(temb)).reshape(B, -1, 1, 1)       # + the time embedding, at every pixel
        h = self.conv2(self.dropout(self.norm2(h)))                     # norm, SiLU, dropout, conv
        return h + (x if self.skip is None else self.skip(x))          # + the input


class Downsample(nn.Conv2d):
    """Half the resolution: a 3x3 convolution of stride 2 (its parameters are the convolution's)."""

    def __init__(self, channels, rng, dtype):
        super().__init__(channels, channels, 3, stride=2, padding=1, rng=rng, dtype=dtype)


class Upsample(nn.Conv2d):
    """Twice the resolution: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels, rng, dtype):
        super().__init__(channels, channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        return super().forward(F.upsample_nearest2d(x, 2))


class AttnBlock(nn.Module):
    """GroupNorm, then self-attention over the H*W positions, plus the input."""

    def __init__(self, channels, num_groups, rng, dtype):
        self.norm = nn.GroupNorm(num_groups, channels, dtype=dtype)
        self.attn = nn.SelfAttention2d(channels, rng=rng, dtype=dtype)
        _zero(self.attn.proj_out)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class UNet(nn.Module):
    """eps_theta(x, t) for x (B, C, H, W) and integer timesteps t (B,), 0-based.

    With num_classes, eps_theta(x, t, y) for labels y (B,) in 0..num_classes,
    where y = num_classes is the null label, "no class" (see `forward`).
    """

    def __init__(self, in_channels=1, image_size=28, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(14,), dropout=0.1, num_groups=32, num_classes=None, rng=None,
                 dtype=np.float32):
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"UNet: image_size {image_size} must be divisible by "
                             f"2^{len(ch_mult) - 1} for {len(ch_mult)} levels")
        self.in_channels, self.image_size, self.ch = in_channels, image_size, ch
        rng = rng if rng is not None else np.random.default_rng(0)
        block = dict(temb_dim=4 * ch, dropout=dropout, num_groups=num_groups, rng=rng, dtype=dtype)

        # Timestep embedding: sinusoids, then Linear(ch, 4ch), SiLU, Linear(4ch, 4ch).
        self.temb = nn.SinusoidalEmbedding(ch, dtype=dtype)
        self.temb_dense0 = nn.Linear(ch, 4 * ch, rng=rng, dtype=dtype)
        self.temb_dense1 = nn.Linear(4 * ch, 4 * ch, rng=rng, dtype=dtype)
        # Class-conditional: one learned vector per label, and one more for the null label.
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, 4 * ch, rng=rng, dtype=dtype) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, rng=rng, dtype=dtype)

        # Down: every output is kept as a skip for the up path.
        self.down = nn.ModuleList()
        skip_channels, cur, res = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                stage = nn.ModuleList([ResBlock(cur, ch * mult, **block)])
                cur = ch * mult
                if res in attn_resolutions:
                    stage.append(AttnBlock(cur, num_groups, rng, dtype))
                self.down.append(stage)
                skip_channels.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur, rng, dtype))
                skip_channels.append(cur)
                res //= 2

        self.mid1 = ResBlock(cur, cur, **block)
        self.mid_attn = AttnBlock(cur, num_groups, rng, dtype)
        self.mid2 = ResBlock(cur, cur, **block)

        # Up: each block takes the running tensor concatenated with the newest skip.
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                stage = nn.ModuleList([ResBlock(cur + skip_channels.pop(), ch * ch_mult[level], **block)])
                cur = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.append(AttnBlock(cur, num_groups, rng, dtype))
                self.up.append(stage)
            if level != 0:
                self.up.append(Upsample(cur, rng, dtype))
                res *= 2

        self.norm_out = nn.GroupNormSiLU(num_groups, cur, dtype=dtype)
        self.conv_out = _zero(nn.Conv2d(cur, in_channels, 3, padding=1, rng=rng, dtype=dtype))

    def forward(self, x, t, y=None):
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet: expected input (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        B = x.shape[0]
        if not hasattr(t, "shape") or tuple(t.shape) != (B,):
            raise ValueError(f"UNet: expected an integer array of timesteps of shape ({B},), "
                             f"got {getattr(t, 'shape', type(t).__name__)}")

        temb = self.temb_dense1(F.silu(self.temb_dense0(self.temb(t))))   # (B, 4ch)
        if self.label_emb is not None:
            # Classifier-free guidance (Ho & Salimans 2022): the label's vector joins the
            # time embedding, and so reaches every ResBlock the way t does.
            if y is None or not hasattr(y, "shape") or tuple(y.shape) != (B,):
                raise ValueError(f"UNet: a class-conditional model needs labels y of shape ({B},), "
                                 f"got {getattr(y, 'shape', y)}")
            temb = temb + self.label_emb(y)
        elif y is not None:
            raise ValueError("UNet: labels given to a model made without num_classes")
        hs = [self.conv_in(x)]
        for layer in self.down:
            if isinstance(layer, Downsample):
                hs.append(layer(hs[-1]))
            else:                                                          # ResBlock (+ attention)
                hs.append(self._stage(layer, hs[-1], temb))
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:                                                          # with the newest skip
                h = self._stage(layer, F.concat([h, hs.pop()], axis=1), temb)
        assert not hs, "every skip connection is used exactly once"
        return self.conv_out(self.norm_out(h))                          # norm, SiLU, conv: (B, C, H, W)

    @staticmethod
    def _stage(stage, h, temb):
        h = stage[0](h, temb)
        for attn in list(stage)[1:]:
            h = attn(h)
        return h
