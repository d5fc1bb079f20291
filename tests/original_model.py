"""Stand-ins for the two released TorchScript files, written from REFERENCE.md §1–3 alone.

They carry the released files' parameter names, call signatures and the legacy per-head attention
layout, so the converter can be tested on files built at test time. Nothing here imports the code
under test.
"""

import math
import shutil
import zipfile

import torch
from torch import nn


def sinusoid(t, channels):
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (2 * channels))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbed(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels))

    def forward(self, t):
        return self.fc(sinusoid(t, self.channels))


class Res(nn.Module):
    def __init__(self, ch, out, emb, groups, mode=""):
        super().__init__()
        self.mode = mode
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.t_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out))
        self.audio_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out), nn.SiLU(), nn.Dropout(0.1), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(ch, out, 1) if ch != out else nn.Identity()

    def resample(self, x):
        if self.mode == "down":
            return nn.functional.avg_pool2d(x, 2)
        if self.mode == "up":
            return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x, t_emb, a_emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self.resample(h))
        x = self.resample(x)
        s, b = self.t_emb_layers(t_emb)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + s) + b
        sa, ba = self.audio_emb_layers(a_emb)[..., None, None].chunk(2, dim=1)
        h = h * (1 + sa) + ba
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class Attn(nn.Module):
    """Legacy layout: the qkv channels hold head 0's q, k, v, then head 1's, ..."""

    def __init__(self, ch, head_dim, groups):
        super().__init__()
        self.heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        scale = 1 / math.sqrt(math.sqrt(d))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class Seq(nn.ModuleList):
    def forward(self, x, t_emb, a_emb):
        for layer in self:
            x = layer(x, t_emb, a_emb) if isinstance(layer, Res) else layer(x)
        return x


class OriginalUNet(nn.Module):
    """The released UNet's structure (REFERENCE §2), parameterised to allow tiny sizes."""

    def __init__(
        self,
        channels=256,
        mult=(1, 2, 3),
        blocks=2,
        attn_levels=(2,),
        head_dim=64,
        groups=32,
        motion_channels=3,
        out_channels=6,
        audio_in=1280,
    ):
        super().__init__()
        emb = 4 * channels
        self.time_embed = TimeEmbed(channels)
        self.audio_embed = nn.Sequential(nn.Linear(audio_in, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Seq([nn.Conv2d(6 + 2 * motion_channels, channels, 3, padding=1)])])
        skips, ch = [channels], channels
        for level, m in enumerate(mult):
            for _ in range(blocks):
                layers = [Res(ch, m * channels, emb, groups)]
                ch = m * channels
                if level in attn_levels:
                    layers.append(Attn(ch, head_dim, groups))
                self.input_blocks.append(Seq(layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(Seq([Res(ch, ch, emb, groups, "down")]))
                skips.append(ch)
        self.middle_block = Seq([Res(ch, ch, emb, groups), Attn(ch, head_dim, groups), Res(ch, ch, emb, groups)])
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                layers = [Res(ch + skips.pop(), m * channels, emb, groups)]
                ch = m * channels
                if level in attn_levels:
                    layers.append(Attn(ch, head_dim, groups))
                if level and i == blocks:
                    layers.append(Res(ch, ch, emb, groups, "up"))
                self.output_blocks.append(Seq(layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, x_cond, motion_frames, audio_emb):
        t_emb = self.time_embed(timesteps)
        a_emb = self.audio_embed(audio_emb.reshape(audio_emb.shape[0], -1))
        h = torch.cat([x, motion_frames, x_cond], dim=1)
        hs = []
        for block in self.input_blocks:
            h = block(h, t_emb, a_emb)
            hs.append(h)
        h = self.middle_block(h, t_emb, a_emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), t_emb, a_emb)
        return self.out(h)


class ConvStack(nn.Module):
    def __init__(self, channels, kernels, strides, paddings, code, final_kernel):
        super().__init__()
        self.cl = nn.ModuleList()
        self.activations = nn.ModuleList()
        c = 1
        for out, k, s, p in zip(channels, kernels, strides, paddings):
            self.cl.append(nn.Conv1d(c, out, k, stride=s, padding=p))
            self.activations.append(nn.Sequential(nn.BatchNorm1d(out), nn.ReLU(True)))
            c = out
        self.cl.append(nn.Conv1d(c, code, final_kernel))
        self.activations.append(nn.Tanh())

    def forward(self, x):
        for conv, act in zip(self.cl, self.activations):
            x = act(conv(x))
        return x


class OriginalAudioEncoder(nn.Module):
    """The released encoder's call protocol: (window, lengths, init_state=state) -> (embedding, lengths, state)."""

    def __init__(
        self,
        channels=(16, 32, 64, 128, 256),
        kernels=(80, 4, 4, 4, 10),
        strides=(16, 2, 2, 2, 5),
        paddings=(32, 1, 1, 1, 3),
        code=256,
        final_kernel=5,
        hidden=256,
        layers=2,
    ):
        super().__init__()
        self.encoder = ConvStack(channels, kernels, strides, paddings, code, final_kernel)
        self.rnn = nn.GRU(code, hidden, layers, batch_first=True)
        self.code = code

    def forward(self, x, lengths, init_state: torch.Tensor):
        seq = x.shape[1]
        codes = self.encoder(x.reshape(-1, 1, x.shape[-1])).reshape(-1, seq, self.code)
        out, state = self.rnn(codes, init_state)
        return out.reshape(-1, out.shape[-1]), lengths, state


def randomize_(module, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                v = torch.randn(t.shape, generator=g) * scale
                t.copy_(v.abs() + 0.5 if name.endswith("running_var") else v)
    return module.eval()


def traced_unet(path, seed=0, size=16, training=False, **kwargs):
    model = randomize_(OriginalUNet(**kwargs), seed).train(training)
    motion = model.input_blocks[0][0].in_channels - 6
    audio_in = model.audio_embed[0].in_features
    example = (
        torch.randn(1, 3, size, size),
        torch.tensor([10]),
        torch.randn(1, 3, size, size),
        torch.randn(1, motion, size, size),
        torch.randn(1, 5, audio_in // 5),
    )
    with torch.no_grad():
        torch.jit.trace(model, example, check_trace=False).save(str(path))
    return model


def scripted_audio_encoder(path, seed=1, training=False, **kwargs):
    model = randomize_(OriginalAudioEncoder(**kwargs), seed).train(training)
    torch.jit.script(model).save(str(path))
    return model


def traced_audio_encoder(path, seed=1, training=False, flag=None, **kwargs):
    """The encoder traced as the released file most likely was (its code cannot be scripted as written): in
    training mode or not, its modules' `training` flag then set to `flag` (when given) before saving, as a
    `.eval()` or `.train()` after tracing would, which does not change the traced graph."""
    model = randomize_(OriginalAudioEncoder(**kwargs), seed).train(training)
    state = torch.zeros(model.rnn.num_layers, 1, model.rnn.hidden_size)
    example = (torch.randn(1, 1, 3200), torch.LongTensor([3200]), state)  # one 0.2 s window, as the sampler calls it
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    if flag is not None:
        traced.train(flag)
    traced.save(str(path))
    return model


def as_if_traced_on(path, device="cuda:0"):
    """Rewrite a CPU trace in place so that its code names `device`, as a trace made on that GPU does."""
    temporary = str(path) + ".tmp"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(temporary, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = data.replace(b'torch.device("cpu")', f'torch.device("{device}")'.encode())
            if not info.filename.endswith(".debug_pkl"):
                target.writestr(info, data)
    shutil.move(temporary, path)
