"""AMT-S video frame interpolation in plain PyTorch, for VBench's motion smoothness (evaluate.py).

AMT: "All-Pairs Multi-Field Transforms for Efficient Frame Interpolation", Li et al., CVPR 2023.
AMT-S = corr radius 3, 4 corr levels, 3 flow fields, IFRNet-style pyramid (20, 32, 44, 56 channels).
Module names follow the released amt-s.pth, so `load_state_dict(ckpt['state_dict'])` works strictly.
Only the inference path VBench uses is implemented: scale_factor 1, output = clamped middle frame.
Checked against VBench's copy of AMT on random weights: identical frames (README: Evaluation).
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from inputs import UserError

AMT_URL = "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"


# ----------------------------------------------------------------------------- small helpers

def resize(x, s):
    """Bilinear rescale by factor s (half-pixel centres)."""
    return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)


def warp(img, flow):
    """Backward-warp img by a pixel flow (B,2,H,W): sample img at p + flow(p), edge pixels repeated."""
    B, _, H, W = flow.shape
    gx = torch.linspace(-1.0, 1.0, W).view(1, 1, 1, W).expand(B, -1, H, -1)
    gy = torch.linspace(-1.0, 1.0, H).view(1, 1, H, 1).expand(B, -1, -1, W)
    base = torch.cat([gx, gy], 1).to(img)
    # pixel flow -> normalised [-1, 1] units of align_corners=True sampling
    fn = torch.cat([flow[:, :1] / ((W - 1) / 2), flow[:, 1:2] / ((H - 1) / 2)], 1)
    grid = (base + fn).permute(0, 2, 3, 1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


def pixel_grid(b, h, w, device):
    """(B,2,h,w) pixel coordinates, channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys]).float()[None].repeat(b, 1, 1, 1)


def conv_prelu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.PReLU(cout))


# ----------------------------------------------------------------------------- correlation branch (RAFT-style)

class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 residual block with instance norm, as in RAFT's small encoder."""
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout // 4, 1)
        self.conv2 = nn.Conv2d(cout // 4, cout // 4, 3, stride, 1)
        self.conv3 = nn.Conv2d(cout // 4, cout, 1)
        self.downsample = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.InstanceNorm2d(cout))

    def forward(self, x):
        y = x
        for conv in (self.conv1, self.conv2, self.conv3):
            y = F.relu(F.instance_norm(conv(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class FeatEncoder(nn.Module):
    """1/8-resolution 84-d features used only to build the all-pairs correlation volume."""
    def __init__(self, dim=84):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, 2, 3)
        self.layer1 = nn.Sequential(Bottleneck(32, 32, 1), Bottleneck(32, 32, 1))
        self.layer2 = nn.Sequential(Bottleneck(32, 64, 2), Bottleneck(64, 64, 1))
        self.layer3 = nn.Sequential(Bottleneck(64, 96, 2), Bottleneck(96, 96, 1))
        self.conv2 = nn.Conv2d(96, dim, 1)

    def forward(self, x):
        x = F.relu(F.instance_norm(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class BidirCorr:
    """All-pairs correlation (paper Sec. 3.1) between frames 0 and 1, kept in both directions
    (0->1 and its transpose 1->0), each average-pooled into a `levels`-deep pyramid."""
    def __init__(self, fmap0, fmap1, levels, radius):
        B, C, H, W = fmap0.shape
        corr = torch.matmul(fmap0.view(B, C, H * W).transpose(1, 2), fmap1.view(B, C, H * W))
        corr = corr.view(B, H, W, H, W) / torch.sqrt(torch.tensor(C).float())
        fwd = corr.reshape(B * H * W, 1, H, W)                            # query px of 0, key grid of 1
        bwd = corr.permute(0, 3, 4, 1, 2).reshape(B * H * W, 1, H, W)     # query px of 1, key grid of 0
        self.pyr = [(fwd, bwd)]
        for _ in range(levels - 1):
            fwd, bwd = F.avg_pool2d(fwd, 2, 2), F.avg_pool2d(bwd, 2, 2)
            self.pyr.append((fwd, bwd))
        self.r = radius

    @staticmethod
    def _sample(vol, xy):
        """Bilinear lookup at pixel coords xy (N,k,k,2), zeros outside."""
        H, W = vol.shape[-2:]
        x, y = xy.split(1, dim=-1)
        grid = torch.cat([2 * x / (W - 1) - 1, 2 * y / (H - 1) - 1], dim=-1)
        return F.grid_sample(vol, grid, align_corners=True)

    def __call__(self, xy0, xy1):
        """Sample a (2r+1)^2 window per level around xy0 (in volume 0->1) and xy1 (in 1->0)."""
        B, _, h, w = xy0.shape
        d = torch.arange(-self.r, self.r + 1, device=xy0.device).float()
        # RAFT convention: the first window axis offsets x, the second offsets y
        win = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).view(1, 2 * self.r + 1, 2 * self.r + 1, 2)
        outs = []
        for xy, k in ((xy0, 0), (xy1, 1)):
            c = xy.permute(0, 2, 3, 1).reshape(B * h * w, 1, 1, 2)
            feats = [self._sample(lvl[k], c / 2 ** i + win).view(B, h, w, -1) for i, lvl in enumerate(self.pyr)]
            outs.append(torch.cat(feats, dim=-1).permute(0, 3, 1, 2).contiguous())
        return outs


class UpdateBlock(nn.Module):
    """Residual update of the bilateral flows and the intermediate feature from correlation
    lookups (paper Sec. 3.2). Runs at 1/8 resolution; `scale` maps a finer level down and back."""
    def __init__(self, cdim, scale=None, corr_ch=2 * 4 * 7 ** 2, hidden=76, fdim=20, cor_dim=64, fc=68):
        super().__init__()
        self.scale = scale
        self.convc1 = nn.Conv2d(corr_ch, cor_dim, 1)
        self.convf1 = nn.Conv2d(4, 2 * fdim, 7, padding=3)
        self.convf2 = nn.Conv2d(2 * fdim, fdim, 3, padding=1)
        self.conv = nn.Conv2d(cor_dim + fdim, fc, 3, padding=1)
        head = lambda cout: nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                          nn.Conv2d(hidden, cout, 3, padding=1))
        self.gru = nn.Sequential(nn.Conv2d(fc + 4 + cdim, hidden, 3, padding=1), nn.LeakyReLU(0.1),
                                 nn.Conv2d(hidden, hidden, 3, padding=1))  # named "gru", but a plain conv stack
        self.feat_head, self.flow_head = head(cdim), head(4)

    def forward(self, ft, flow, corr):
        act = lambda x: F.leaky_relu(x, 0.1)
        if self.scale is not None:
            ft = resize(ft, 1 / self.scale)
        motion = torch.cat([act(self.convc1(corr)), act(self.convf2(act(self.convf1(flow))))], 1)
        h = self.gru(torch.cat([act(self.conv(motion)), flow, ft], 1))
        d_ft, d_flow = self.feat_head(h), self.flow_head(h)
        if self.scale is not None:
            d_ft, d_flow = resize(d_ft, self.scale), self.scale * resize(d_flow, self.scale)
        return d_ft, d_flow


# ----------------------------------------------------------------------------- IFRNet-style context pyramid

class SideResBlock(nn.Module):
    """Residual block that re-convolves only the last `side` channels between full convs (IFRNet)."""
    def __init__(self, ch, side):
        super().__init__()
        self.side = side
        self.conv1, self.conv3 = conv_prelu(ch, ch), conv_prelu(ch, ch)
        self.conv2, self.conv4 = conv_prelu(side, side), conv_prelu(side, side)
        self.conv5 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.prelu = nn.PReLU(ch)

    def forward(self, x):
        s = self.side
        out = self.conv1(x)
        out = self.conv3(torch.cat([out[:, :-s], self.conv2(out[:, -s:])], 1))
        out = self.conv5(torch.cat([out[:, :-s], self.conv4(out[:, -s:])], 1))
        return self.prelu(x + out)


class Encoder(nn.Module):
    """4-level context pyramid at 1/2, 1/4, 1/8, 1/16."""
    def __init__(self, chans):
        super().__init__()
        for i, (cin, cout) in enumerate(zip([3] + chans[:-1], chans), 1):
            setattr(self, f"pyramid{i}", nn.Sequential(conv_prelu(cin, cout, 2), conv_prelu(cout, cout)))
        self.n = len(chans)

    def forward(self, x):
        feats = []
        for i in range(1, self.n + 1):
            x = getattr(self, f"pyramid{i}")(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """conv -> side-res block -> 2x transposed conv: one coarse-to-fine step."""
    def __init__(self, cin, cmid, cout, side=20):
        super().__init__()
        self.convblock = nn.Sequential(conv_prelu(cin, cmid), SideResBlock(cmid, side),
                                       nn.ConvTranspose2d(cmid, cout, 4, 2, 1))

    def forward(self, x):
        return self.convblock(x)


# ----------------------------------------------------------------------------- the network

class AMTS(nn.Module):
    def __init__(self, radius=3, levels=4, num_flows=3, ch=(20, 32, 44, 56), side=20):
        super().__init__()
        self.radius, self.levels, self.nf = radius, levels, num_flows
        self.feat_encoder = FeatEncoder(84)
        self.encoder = Encoder(list(ch))
        self.decoder4 = Decoder(2 * ch[3] + 1, 2 * ch[3], ch[2] + 4, side)       # f0, f1, t -> flows, ft
        self.decoder3 = Decoder(3 * ch[2] + 4, 3 * ch[2], ch[1] + 4, side)       # ft, warped f0/f1, flows
        self.decoder2 = Decoder(3 * ch[1] + 4, 3 * ch[1], ch[0] + 4, side)
        self.decoder1 = Decoder(3 * ch[0] + 4, 3 * ch[0], 8 * num_flows, side)   # multi-field head
        self.update4, self.update3, self.update2 = UpdateBlock(ch[2]), UpdateBlock(ch[1], 2), UpdateBlock(ch[0], 4)
        # fuses the num_flows candidate frames (paper Sec. 3.3)
        self.comb_block = nn.Sequential(nn.Conv2d(3 * num_flows, 6 * num_flows, 3, 1, 1), nn.PReLU(6 * num_flows),
                                        nn.Conv2d(6 * num_flows, 3, 3, 1, 1))

    def refine(self, upd, corr, xy, flow0, flow1, ft, embt, down):
        """Look up the correlation at the positions the flows point to (bilateral t->0 / t->1 flows
        rescaled to 0->1 / 1->0 under linear motion) and apply the update block's residuals."""
        f0, f1 = flow0, flow1
        if down != 1:
            f0, f1 = (1 / down) * resize(flow0, 1 / down), (1 / down) * resize(flow1, 1 / down)
        c0, c1 = corr(xy + f1 * (1. / embt), xy + f0 * (1. / (1. - embt)))
        d_ft, d_flow = upd(ft, torch.cat([f0, f1], 1), torch.cat([c0, c1], 1))
        d0, d1 = d_flow.chunk(2, 1)
        return flow0 + d0, flow1 + d1, ft + d_ft

    @staticmethod
    def decode_in(ft, f0, f1, flow0, flow1):
        return torch.cat([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1], 1)

    def forward(self, img0, img1, embt):
        """img0, img1: (B,3,H,W) in [0,1], H and W multiples of 16; embt: (B,1,1,1) time in (0,1).
        Returns the predicted frame at time embt, clamped to [0,1]."""
        mean = torch.cat([img0, img1], 2).mean(1, keepdim=True).mean(2, keepdim=True).mean(3, keepdim=True)
        img0, img1 = img0 - mean, img1 - mean
        b, _, h, w = img0.shape
        xy = pixel_grid(b, h // 8, w // 8, img0.device)
        fm0, fm1 = self.feat_encoder(torch.cat([img0, img1], 0)).split([b, b], 0)
        corr = BidirCorr(fm0, fm1, self.levels, self.radius)
        e0, e1 = self.encoder(img0), self.encoder(img1)

        # 1/16 -> 1/8: initial bilateral flows and intermediate feature, then correlation refinement
        t = embt.repeat(1, 1, *e0[3].shape[2:])
        out = self.decoder4(torch.cat([e0[3], e1[3], t], 1))
        flow0, flow1, ft = out[:, 0:2], out[:, 2:4], out[:, 4:]
        flow0, flow1, ft = self.refine(self.update4, corr, xy, flow0, flow1, ft, embt, 1)

        # 1/8 -> 1/4 -> 1/2: residual flows on top of 2x upsampled ones, each refined again
        for dec, upd, k, down in ((self.decoder3, self.update3, 2, 2), (self.decoder2, self.update2, 1, 4)):
            out = dec(self.decode_in(ft, e0[k], e1[k], flow0, flow1))
            flow0 = out[:, 0:2] + 2.0 * resize(flow0, 2.0)
            flow1 = out[:, 2:4] + 2.0 * resize(flow1, 2.0)
            ft = out[:, 4:]
            flow0, flow1, ft = self.refine(upd, corr, xy, flow0, flow1, ft, embt, down)

        # 1/2 -> 1: num_flows flow-field pairs, blend masks and residual colours (multi-field, Sec. 3.3)
        n = self.nf
        out = self.decoder1(self.decode_in(ft, e0[0], e1[0], flow0, flow1))
        d0, d1, mask, res = out.split([2 * n, 2 * n, n, 3 * n], 1)
        flow0 = d0 + 2.0 * resize(flow0, 2.0).repeat(1, n, 1, 1)
        flow1 = d1 + 2.0 * resize(flow1, 2.0).repeat(1, n, 1, 1)
        return self.combine(img0, img1, flow0, flow1, torch.sigmoid(mask), res, mean).clamp(0, 1)

    def combine(self, img0, img1, flow0, flow1, mask, res, mean):
        """Warp both frames with each of the n flow pairs, blend, then average + learned fusion."""
        b, _, h, w = img0.shape
        n = self.nf
        rep = lambda x: x.repeat_interleave(n, 0)              # (b,...) -> (b*n,...), flow-field index inner
        cand = (mask.reshape(b * n, 1, h, w) * warp(rep(img0), flow0.reshape(b * n, 2, h, w))
                + (1 - mask.reshape(b * n, 1, h, w)) * warp(rep(img1), flow1.reshape(b * n, 2, h, w))
                + rep(mean) + res.reshape(b * n, 3, h, w))
        cand = cand.reshape(b, n, 3, h, w)
        return cand.mean(1) + self.comb_block(cand.view(b, -1, h, w))


def load_amt(path: str | None, device: str = "cpu") -> AMTS:
    """The released amt-s.pth ({'epoch', 'state_dict', ...}: tensors and numbers, read weights_only) or a bare
    state dict, strictly; `path` defaults to VBench's cache ($VBENCH_CACHE_DIR/amt_model/amt-s.pth)."""
    cache = os.environ.get("VBENCH_CACHE_DIR", os.path.expanduser("~/.cache/vbench"))
    path = path or os.path.join(cache, "amt_model", "amt-s.pth")
    if not os.path.isfile(path):
        raise UserError(f"AMT-S weights {path} not found; download them: wget -P {os.path.dirname(path)} {AMT_URL}")
    net = AMTS()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt, strict=True)
    except Exception as e:  # noqa: BLE001 - unpickling, key and shape errors alike: one line
        raise UserError(f"{path} is not AMT-S's amt-s.pth ({type(e).__name__})") from None
    return net.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- VBench motion_smoothness

def _pad16(h, w):
    """Replicate padding to multiples of 16, split in halves (extra pixel at the end)."""
    ph, pw = (16 - h % 16) % 16, (16 - w % 16) % 16
    return [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]


@torch.no_grad()
def interpolate_midframes(frames: torch.Tensor, net: AMTS) -> np.ndarray:
    """frames: uint8 (N,H,W,3). Returns uint8 (N-1,H,W,3): the predicted middle of each consecutive pair."""
    dev = next(net.parameters()).device
    N, H, W, _ = frames.shape
    pad = _pad16(H, W)
    # .contiguous(): a permuted (N,H,W,3) batch would stay channels_last, and conv kernels for that
    # layout round differently from the NCHW ones VBench's per-frame tensors get (flips a few uint8s)
    x = F.pad((frames.permute(0, 3, 1, 2).to(dev) / 255.0).contiguous(), pad, mode="replicate")
    embt = torch.tensor(0.5).float().view(1, 1, 1, 1).to(dev)
    mids = [net(x[i:i + 1], x[i + 1:i + 2], embt) for i in range(N - 1)]    # one pass per pair, batch 1
    y = torch.cat(mids)[..., pad[2]:pad[2] + H, pad[0]:pad[0] + W]
    # VBench's tensor2img: (x*255).clip(0,255).astype(uint8), i.e. truncation, not rounding
    return (y * 255.0).permute(0, 2, 3, 1).cpu().numpy().clip(0, 255).astype(np.uint8)


def motion_smoothness(frames: torch.Tensor, net: AMTS) -> float | None:
    """VBench's motion_smoothness of one video (uint8 (T, H, W, 3), RGB): the even frames interpolated at t = 0.5,
    each prediction compared with the held-out odd frame between them (zip: an even T leaves the last odd frame
    out), (255 - mean absolute difference) / 255. None for a video of fewer than 3 frames, or one whose padded
    side is under 128 pixels: the correlation pyramid's coarsest level is then a single pixel, where AMT's lookup
    divides by zero (NaN) or its pooling fails."""
    if len(frames) < 3 or min(-(-s // 16) * 16 for s in frames.shape[1:3]) < 128:
        return None
    mids = interpolate_midframes(frames[0::2], net)
    odd = frames[1::2].numpy()
    diffs = [np.mean(np.abs(o.astype(np.int16) - m.astype(np.int16))) for o, m in zip(odd, mids)]
    return float((255.0 - np.mean(np.array(diffs))) / 255.0)
