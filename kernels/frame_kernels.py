"""Batched torch kernels over decoded frames, the same on CPU and CUDA.

Every kernel takes a batch of frames at analysis size and returns one value
(or row) per frame. Kernels that compare a frame with the one before it take
that frame from a `FrameCarry`, so a video cut into batches of any size gives
the same results as one batch (tests check it).

Inputs, on the device the analysis runs on: `luma` uint8 (N, H, W) and
`chroma` uint8 (N, 2, H, W), the Y, U and V samples of each analysis pixel
(kernels.decode); RGB, planar (N, 3, H, W), is made from them here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HUE_RANGE = 180  # OpenCV's 8-bit hue: degrees / 2
HASH_SIDE = 8  # 64-bit perceptual hashes
PHASH_DCT_SIDE = 32  # pHash takes the 8x8 lowest frequencies of a 32x32 DCT
LUMA_BINS = 256
CLIPPED_DARK_MAX = 16  # luma at or below: crushed black (BT.601 video black is 16)
CLIPPED_BRIGHT_MIN = 235  # luma at or above: blown highlight (video white is 235)
MOTION_PIXEL_DELTA_MIN = 12  # luma change that counts as "this pixel changed", above codec noise
IDLE_MOTION_ENERGY_MAX = 0.05  # mean luma change per pixel below which the screen is still
# Analysis pixels are samples, not averages, so they keep the encoder's noise:
# a keyframe re-encoding a still screen moved 11% of them by 1 to 4 levels.
CODEC_NOISE_DELTA_MAX = 4
ADAPTIVE_WINDOW = 2  # PySceneDetect AdaptiveDetector's window_width: frames either side
ADAPTIVE_RATIO_MAX = 255.0  # its cap, also given when the neighbours are still and the frame is not
ADAPTIVE_MIN_CONTENT = 15.0  # its min_content_val
SCROLL_COLUMN_POOL = 8  # columns averaged before the shift search: rows keep their detail, 8x less work
SCROLL_SHIFT_MAX_SHARE = 8  # shifts tried: up to 1/8 of the height either way per frame
SCROLL_CHANGED_SHARE_MIN = 0.03  # a scroll moves every line of a page: far more than a keystroke changes
SCROLL_MATCH_RATIO = 0.2  # the shifted previous frame must explain the change 5x better than no shift (scrolls: <0.05, cuts: >0.4)
BLOCK_SIDE = 4  # text density and saliency work on 4x4 blocks of the analysis frame
BLOCK_CONTRAST_MIN = 48  # luma range inside a block that marks an edge (glyph strokes, rules, borders)
SALIENCY_BINS = 64  # saliency profiles per axis: crop placement to 1/64 of the frame
SALIENCY_MOTION_WEIGHT = 4.0  # a changing block draws the eye four times as much as a still edge


def yuv_to_rgb(luma: torch.Tensor, chroma: torch.Tensor, bt709: bool = False, full_range: bool = False) -> torch.Tensor:
    """(N, H, W) Y and (N, 2, H, W) U, V uint8 -> (N, 3, H, W) float32 RGB,
    rounded to integers in [0, 255]: the exact BT.601 (or BT.709) conversion,
    within 1 of OpenCV's (tested). FFmpeg's fast conversion truncates: 1 to 3
    below."""
    kr, kb = (0.2126, 0.0722) if bt709 else (0.299, 0.114)
    kg = 1.0 - kr - kb
    y, u, v = luma.float(), chroma[:, 0].float() - 128.0, chroma[:, 1].float() - 128.0
    if not full_range:  # stretch video range to full: Y 16-235 -> 0-255, chroma +-112 -> +-127.5
        y, u, v = (y - 16.0) * (255.0 / 219.0), u * (255.0 / 224.0), v * (255.0 / 224.0)
    r = y + (2.0 * (1.0 - kr)) * v
    g = y - (2.0 * kb * (1.0 - kb) / kg) * u - (2.0 * kr * (1.0 - kr) / kg) * v
    b = y + (2.0 * (1.0 - kb)) * u
    return torch.stack((r, g, b), dim=1).round().clamp(0.0, 255.0)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) planar RGB, uint8 (or float holding integers) -> (N, 3,
    H, W) float32 HSV with OpenCV's 8-bit semantics (COLOR_RGB2HSV): H in
    [0, 180), S and V in [0, 255], rounded."""
    # Branches as arithmetic on masks, since torch.where is several times
    # slower than a multiply on CPU. Planar input: over interleaved RGB,
    # torch.compile emitted a scalar loop (6x slower).
    r, g, b = rgb.float().unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    # OpenCV's precedence when channels tie: red, then green, then blue.
    is_r = (v == r).float()
    is_g = (v == g).float() * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    numerator = is_r * (g - b) + is_g * (b - r) + is_b * (r - g)
    h = is_g * 120.0 + is_b * 240.0 + 60.0 * numerator / diff.clamp(min=1.0)  # grey: numerator 0, red branch
    h = torch.round((h + 360.0 * (h < 0).float()) * 0.5)
    h = h - HUE_RANGE * (h >= HUE_RANGE).float()
    s = torch.round(255.0 * diff / v.clamp(min=1.0))
    return torch.stack((h, s, v), dim=1)


@dataclass
class FrameCarry:
    """The last frame of the previous batch, for the kernels that need it."""

    hsv: torch.Tensor | None = None  # (3, H, W) float32
    luma: torch.Tensor | None = None  # (H, W) uint8

    def with_previous_hsv(self, hsv: torch.Tensor) -> torch.Tensor:
        """(N+1, 3, H, W): the carried frame, or the first frame itself (delta 0), then the batch."""
        first = self.hsv if self.hsv is not None else hsv[0]
        return torch.cat((first.unsqueeze(0), hsv), dim=0)

    def with_previous_luma(self, luma: torch.Tensor) -> torch.Tensor:
        first = self.luma if self.luma is not None else luma[0]
        return torch.cat((first.unsqueeze(0), luma), dim=0)


def content_scores(hsv: torch.Tensor, carry: FrameCarry) -> torch.Tensor:
    """PySceneDetect ContentDetector's score (default weights 1, 1, 1, 0):
    the mean absolute difference of H, S and V from the previous frame,
    averaged over the three channels. (N,) float32; the video's first frame
    scores 0."""
    frames = carry.with_previous_hsv(hsv)
    per_channel = (frames[1:] - frames[:-1]).abs().mean(dim=(2, 3))  # (N, 3)
    return per_channel.mean(dim=1)


def luma_histograms(luma: torch.Tensor) -> torch.Tensor:
    """(N, 256) int64 counts per luma value."""
    n = luma.shape[0]
    # One bincount over the batch, each frame's values offset into its own
    # 256 bins; int32 values: bincount ran 4x slower over int64 ones.
    offsets = (torch.arange(n, device=luma.device, dtype=torch.int32) * LUMA_BINS).view(n, 1)
    flat = luma.reshape(n, -1).int() + offsets
    return torch.bincount(flat.reshape(-1), minlength=n * LUMA_BINS).view(n, LUMA_BINS)


def luma_entropy_bits(histograms: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each luma histogram, in bits (0..8)."""
    p = histograms.float() / histograms.sum(dim=1, keepdim=True).clamp(min=1)
    return -(p * torch.log2(p.clamp(min=1e-12))).sum(dim=1)


def exposure(histograms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean luma and the shares of crushed-black and blown-out pixels."""
    total = histograms.sum(dim=1).clamp(min=1).float()
    levels = torch.arange(LUMA_BINS, device=histograms.device, dtype=torch.float32)
    return {
        "mean_luma": (histograms.float() * levels).sum(dim=1) / total,
        "dark_share": histograms[:, : CLIPPED_DARK_MAX + 1].sum(dim=1).float() / total,
        "bright_share": histograms[:, CLIPPED_BRIGHT_MIN:].sum(dim=1).float() / total,
    }


def sharpness(luma: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian (OpenCV's 3x3 aperture: 4-neighbours minus
    4x centre) over the frame's interior. Written as shifted slices: a
    one-channel conv2d is several times slower on CPU. The response is an
    integer, so its sums are exact in int64; torch.compile vectorises them,
    where it ran var()'s float reduction as a scalar loop (12x slower)."""
    x = luma.to(torch.int32)
    c = x[:, 1:-1, 1:-1]
    response = (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * c).flatten(1)
    n = response.shape[1]
    total = response.sum(dim=1, dtype=torch.int64).double()
    squares = (response * response).sum(dim=1, dtype=torch.int64).double()
    return ((squares - total * total / n) / n).float()


def luma_change(luma: torch.Tensor, carry: FrameCarry) -> torch.Tensor:
    """(N, H, W) float32 absolute luma change from the previous frame."""
    frames = carry.with_previous_luma(luma).float()
    return (frames[1:] - frames[:-1]).abs()


def motion(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From `luma_change`: motion energy (mean absolute luma change, 0..255,
    codec noise left out), the share of pixels that changed, and the bounding
    box of what changed as (x0, y0, x1, y1) in analysis pixels, exclusive
    ends, or -1s when nothing did."""
    energy = (delta * (delta > CODEC_NOISE_DELTA_MAX).float()).mean(dim=(1, 2))
    changed = delta >= MOTION_PIXEL_DELTA_MIN
    share = changed.float().mean(dim=(1, 2))
    rows, cols = changed.any(dim=2), changed.any(dim=1)  # (N, H), (N, W)
    h, w = changed.shape[1:]
    any_change = rows.any(dim=1)
    y0 = torch.where(any_change, rows.float().argmax(dim=1), -1)
    y1 = torch.where(any_change, h - rows.flip(1).float().argmax(dim=1), -1)
    x0 = torch.where(any_change, cols.float().argmax(dim=1), -1)
    x1 = torch.where(any_change, w - cols.flip(1).float().argmax(dim=1), -1)
    return energy, share, torch.stack((x0, y0, x1, y1), dim=1)


def scroll_shift(luma: torch.Tensor, carry: FrameCarry) -> torch.Tensor:
    """Vertical scrolling against the previous frame, in analysis rows per
    frame: positive when the content moved up (the page scrolled down), 0 when
    the frame did not scroll. (N,) int64.

    Block matching restricted to what changed: for each shift, how well the
    previous frame moved by that many rows explains the pixels that changed.
    A scroll is the best shift explaining them at least five times as well as no
    shift, over a changed area no keystroke or cursor makes. Columns are
    averaged first: scrolling is vertical, and text lines keep their rows."""
    frames = carry.with_previous_luma(luma).float().unsqueeze(1)
    pooled = F.avg_pool2d(frames, (1, SCROLL_COLUMN_POOL)).squeeze(1)  # (N+1, H, W/8)
    previous, current = pooled[:-1], pooled[1:]
    h = pooled.shape[1]
    changed = ((current - previous).abs() >= MOTION_PIXEL_DELTA_MIN).float()
    changed_count = changed.sum(dim=(1, 2))
    still_cost = ((current - previous).abs() * changed).sum(dim=(1, 2)) / changed_count.clamp(min=1)
    best_cost = torch.full_like(still_cost, float("inf"))
    best_shift = torch.zeros_like(still_cost, dtype=torch.int64)
    for shift in range(1, max(2, h // SCROLL_SHIFT_MAX_SHARE + 1)):
        for signed, now, before, mask in (
            (shift, current[:, : h - shift], previous[:, shift:], changed[:, : h - shift]),  # content moved up
            (-shift, current[:, shift:], previous[:, : h - shift], changed[:, shift:]),  # content moved down
        ):
            cost = ((now - before).abs() * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best_shift = torch.where(better, signed, best_shift)
    scrolled = (changed_count >= SCROLL_CHANGED_SHARE_MIN * changed[0].numel()) & \
        (best_cost < SCROLL_MATCH_RATIO * still_cost)
    return torch.where(scrolled, best_shift, 0)


def dwell_frames(still: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """How many frames the screen has been still, up to and including each
    frame (0 on a frame that moved): (N,) int64. `previous` is the count at
    the frame before the batch, so runs carry across batches."""
    index = torch.arange(still.shape[0], device=still.device)
    last_moved = torch.cummax(torch.where(still, -1, index), dim=0).values
    return torch.where(last_moved < 0, previous + index + 1, index - last_moved)


def block_contrast(luma: torch.Tensor) -> torch.Tensor:
    """(N, H/4, W/4) bool: 4x4 blocks whose luma range marks an edge."""
    x = luma.unsqueeze(1).float()
    high = F.max_pool2d(x, BLOCK_SIDE)
    low = -F.max_pool2d(-x, BLOCK_SIDE)
    return (high - low).squeeze(1) >= BLOCK_CONTRAST_MIN


def text_density(contrast: torch.Tensor) -> torch.Tensor:
    """The share of blocks holding an edge, 0..1: on a screen recording,
    mostly glyphs (a page of text is dense, a desktop or a video is not)."""
    return contrast.float().mean(dim=(1, 2))


def saliency_profiles(contrast: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the eye goes, per frame, as two profiles of SALIENCY_BINS that
    each sum to 1 (uniform for a blank frame): across the width and down the
    height. Edges (text, controls) attract; blocks that changed (typing, the
    cursor, a pop-up) attract more. Crops for other aspect ratios follow it."""
    moved = F.max_pool2d((delta >= MOTION_PIXEL_DELTA_MIN).float().unsqueeze(1), BLOCK_SIDE).squeeze(1)
    h, w = contrast.shape[1:]
    weight = contrast.float() + SALIENCY_MOTION_WEIGHT * moved[:, :h, :w]
    bins = SALIENCY_BINS
    across = F.adaptive_avg_pool1d(weight.sum(dim=1).unsqueeze(1), bins).squeeze(1) + 1e-6
    down = F.adaptive_avg_pool1d(weight.sum(dim=2).unsqueeze(1), bins).squeeze(1) + 1e-6
    return across / across.sum(dim=1, keepdim=True), down / down.sum(dim=1, keepdim=True)


def adaptive_ratios(content: torch.Tensor, window: int = ADAPTIVE_WINDOW) -> torch.Tensor:
    """PySceneDetect AdaptiveDetector's adaptive ratio over a whole video's
    content scores: each frame's score against the mean of the `window`
    frames either side, capped at 255; 255 where the neighbours are still
    and the frame changed by at least ADAPTIVE_MIN_CONTENT. The first and
    last `window` frames have no full window: 0."""
    n = content.shape[0]
    out = torch.zeros_like(content)
    if n < 2 * window + 1:
        return out
    sums = F.conv1d(content.view(1, 1, -1), torch.ones(1, 1, 2 * window + 1, dtype=content.dtype)).view(-1)
    target = content[window: n - window]
    neighbours = (sums - target) / (2 * window)
    still = neighbours.abs() < 1e-5
    ratio = torch.where(still, torch.where(target >= ADAPTIVE_MIN_CONTENT, ADAPTIVE_RATIO_MAX, 0.0),
                        (target / neighbours.where(~still, 1.0)).clamp(max=ADAPTIVE_RATIO_MAX))
    out[window: n - window] = ratio
    return out


def _dct_matrix(n: int, device) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32, device=device).view(n, 1)
    i = torch.arange(n, dtype=torch.float32, device=device).view(1, n)
    m = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    m[0] /= 2 ** 0.5
    return m


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(N, 64) bool -> (N,) int64, first bit most significant."""
    # 1 << 63 is int64's sign bit: two's complement, as the hash's top bit should be.
    shifts = torch.arange(63, -1, -1, device=bits.device, dtype=torch.int64)
    return (bits.long() << shifts).sum(dim=1)


def dhash(luma: torch.Tensor) -> torch.Tensor:
    """Difference hash: a 9x8 area-downscale, each pixel brighter than its right neighbour."""
    small = F.adaptive_avg_pool2d(luma.unsqueeze(1).float(), (HASH_SIDE, HASH_SIDE + 1)).squeeze(1)
    return _pack_bits((small[:, :, :-1] > small[:, :, 1:]).reshape(-1, HASH_SIDE * HASH_SIDE))


def phash(luma: torch.Tensor) -> torch.Tensor:
    """DCT perceptual hash: the 8x8 lowest frequencies of a 32x32 DCT-II, each
    above the median of those 64 (DC included, as in the classic pHash)."""
    small = F.adaptive_avg_pool2d(luma.unsqueeze(1).float(), (PHASH_DCT_SIDE, PHASH_DCT_SIDE)).squeeze(1)
    d = _dct_matrix(PHASH_DCT_SIDE, luma.device)
    low = (d @ small @ d.T)[:, :HASH_SIDE, :HASH_SIDE].reshape(-1, HASH_SIDE * HASH_SIDE)
    # torch.median's value (the lower of the two middle ones), taken from a
    # sort: median has no C shim in torch.compile's C++ wrapper, whose
    # fallback for it calls back into Python.
    return _pack_bits(low > low.sort(dim=1).values[:, HASH_SIDE * HASH_SIDE // 2 - 1:HASH_SIDE * HASH_SIDE // 2])


def batch_step(luma: torch.Tensor, chroma: torch.Tensor, previous_hsv: torch.Tensor,
               previous_luma: torch.Tensor, previous_dwell: torch.Tensor, bt709: bool = False,
               full_range: bool = False) -> dict[str, torch.Tensor]:
    """Every per-frame kernel over one batch: the unit the backends run,
    eagerly or compiled into fused loops. `previous_*` is the frame before
    the batch (the batch's own first frame at the start of a video) and its
    dwell count (0 at the start); `bt709` and `full_range` say how its YUV
    becomes RGB (decode.Colour)."""
    hsv = rgb_to_hsv(yuv_to_rgb(luma, chroma, bt709, full_range))
    carry = FrameCarry(hsv=previous_hsv, luma=previous_luma)
    histograms = luma_histograms(luma)
    delta = luma_change(luma, carry)
    energy, share, bbox = motion(delta)
    contrast = block_contrast(luma)
    across, down = saliency_profiles(contrast, delta)
    return {"content": content_scores(hsv, carry), "entropy": luma_entropy_bits(histograms),
            "sharpness": sharpness(luma), "motion_energy": energy, "motion_share": share, "motion_bbox": bbox,
            "scroll": scroll_shift(luma, carry), "dwell": dwell_frames(energy < IDLE_MOTION_ENERGY_MAX, previous_dwell),
            "text_density": text_density(contrast), "saliency_x": across, "saliency_y": down,
            "dhash": dhash(luma), "phash": phash(luma), **exposure(histograms), "last_hsv": hsv[-1]}


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & (2 ** 64 - 1)).bit_count()
