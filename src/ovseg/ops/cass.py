"""CASS (Kim et al., CVPR 2025): spectral object-level context distillation (Sec. 3.2) and the object-presence
prior (Sec. 3.3), as pure tensor functions that follow the official code's computation step by step.

Spectral distillation, per window (CLIP grid (gh, gw), L = gh·gw patch tokens, CLS excluded throughout):

1. :func:`dino_input`: the VFM input the reference builds from a CLIP-normalised window (its de-normalisation,
   uint8 truncation, square PIL-bicubic resize to the short side, crop to a multiple of the patch size).
2. :func:`resize_keys` / :func:`match_key_range`: the VFM's last-block keys, bilinearly resized to the CLIP grid
   and min-max mapped onto the range of CLIP's last-block keys (one range over all heads, tokens, channels).
3. :func:`key_spectra` / :func:`spectral_distances` / :func:`match_heads`: top-20 eigenvalues of every head's key
   graph ``K Kᵀ·s``, L1-normalised; Wasserstein-1 distance between each VFM head and each CLIP head; Hungarian
   assignment that *maximises* the total distance (complementary heads).
4. :func:`lowrank_graph` / :func:`eigenscale`: rank-10 reconstruction of the matched VFM graph, optionally with
   the singular values stretched from ``[min, max]`` to ``[min/2, 1.5·max]``.
5. :func:`distilled_logits` / :func:`cass_attention`: zero diagonal, min-max onto the CLIP head's ``k kᵀ·s``
   range, convex combination weighted by the matching distance, NACLIP's Gaussian added, softmax over keys,
   applied to CLIP's values (no CLS token in the output).

Object-presence prior: :func:`cluster_texts` (Ward linkage on cosine distances of the text embeddings, cut at a
distance threshold), :func:`presence_prior` (cosine of a CLIP CLS embedding with every query),
:func:`adjust_text` (per cluster, the most present query moves towards the mean of its top-2 patches) and
:func:`presence_logits` (``(1−β)·F T'ᵀ + β·prior``).

Deliberate differences from the reference, each documented where it applies: the rank-10 reconstruction is an
exact truncated decomposition by default, computed from the small ``Kᵀ K`` Gram matrix (the reference's
randomised ``torch.svd_lowrank`` is an option); ranges that are empty give finite values where the reference
divides by zero; top-k ties go to the lowest token index. The head matching is reproduced bit for bit by
default (spectra of the L x L graph, float32 cost, scipy), because it often sits on exact ties; the reference's
head-index swap is reproduced by default too.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..attention.gaussian import gaussian_window
from ..config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import InvalidInputError, InvalidTypeError

__all__ = [
    "REFERENCE_DENORM_STD", "HeadMatch",
    "dino_input", "resize_keys", "match_key_range", "minmax_to",
    "key_spectra", "spectral_distances", "match_heads",
    "eigenscale", "draw_sketches", "lowrank_graph", "distilled_logits", "cass_attention",
    "cluster_texts", "presence_prior", "adjust_text", "presence_logits",
]

# The reference un-normalises a CLIP-normalised window with ImageNet's mean and these stds (0.255: a typo of
# ImageNet's 0.225), i.e. u = x·std + mean, before turning it into an 8-bit image for the VFM.
REFERENCE_DENORM_STD = (0.229, 0.224, 0.255)


@contextlib.contextmanager
def _one_thread(device):
    """Run the small float64 decompositions (L x L with L ~ 200-700, or hd x hd) on one CPU thread: LAPACK's
    threads only add synchronisation at these sizes, and on a busy machine they made ``eigvalsh`` of a 196 x 196
    matrix ~100x slower (0.4 s instead of 4 ms). The thread count is restored afterwards."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fail(msg: str) -> None:
    raise InvalidInputError(msg)


def _check_tensor(x, name: str, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        _fail(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")


def _pair(grid, name: str) -> Tuple[int, int]:
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise InvalidTypeError(f"{name} must be a (rows, cols) pair of ints, got {grid!r}") from None
    if gh < 1 or gw < 1:
        _fail(f"{name} must be positive, got {grid!r}")
    return gh, gw


# ---------------------------------------------------------------------------------------------- VFM input


_PIL_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def _pil_cubic(x: float) -> float:
    """Pillow's bicubic kernel (a = −0.5), evaluated in the same operation order as its C code."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def _pil_coefficients(in_size: int, out_size: int) -> torch.Tensor:
    """(in_size, out_size) float64 matrix of Pillow's fixed-point bicubic weights (``precompute_coeffs`` then
    ``normalize_coeffs_8bpc``): support widened by the downscaling factor, weights normalised to sum 1 and
    rounded to integers of 2^22."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    w = torch.zeros(in_size, out_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [_pil_cubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        total = sum(taps)
        for x, k in enumerate(taps):
            k = k / total if total != 0.0 else k
            w[x + xmin, xx] = int(k * (1 << _PIL_BITS) + (-0.5 if k < 0 else 0.5))
    return w


def _pil_round(x: torch.Tensor) -> torch.Tensor:
    # Pillow: (sum + 2^21) >> 22, clipped to 0..255; the sums are integers below 2^53, exact in float64
    return torch.floor((x + (1 << (_PIL_BITS - 1))) / (1 << _PIL_BITS)).clamp_(0, 255)


def _pil_bicubic(u8: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Pillow's ``Image.resize((w, h))`` (default bicubic filter, antialiased) on (B, 3, h, w) uint8, exactly:
    Pillow's fixed-point weights, a horizontal then a vertical pass, each only when that size changes, each
    rounded to 8 bits."""
    x = u8.to(torch.float64)
    h, w = x.shape[-2:]
    oh, ow = size
    if ow != w:
        x = _pil_round(x @ _pil_coefficients(w, ow).to(x.device))
    if oh != h:
        x = _pil_round((x.transpose(-2, -1) @ _pil_coefficients(h, oh).to(x.device)).transpose(-2, -1))
    return x.to(torch.uint8)


def dino_input(
    crops: torch.Tensor,
    *,
    denormalize: str = "reference",
    square: bool = True,
    patch_size: int = 8,
) -> torch.Tensor:
    """The VFM input the reference builds from CLIP-normalised windows.

    Reference steps (all reproduced by default):

    1. ``u = x·std + mean`` with ImageNet's mean and the stds :data:`REFERENCE_DENORM_STD` (computed as
       torchvision's ``Normalize(−mean/std, 1/std)``), so the VFM sees roughly the CLIP-normalised values, not
       the pixels (the blue channel is also scaled by 0.255/0.225);
    2. ``uint8(255·u)``: truncation towards zero (values of real images stay within [7, 244]; ovseg clamps to
       [0, 255] first, where the reference's cast is platform-dependent);
    3. PIL ``resize((r, r))`` with r = min(h, w): a bicubic *squash* of the long side, a plain copy when the
       window is square;
    4. ``ToTensor`` and ImageNet normalisation, then the top-left crop to a multiple of ``patch_size``.

    Args:
        crops: (B, 3, h, w) CLIP-normalised windows (the references' rounded 0-255 constants).
        denormalize: ``"reference"`` (steps 1-2 as above) or ``"clip"``: invert the CLIP normalisation exactly
            and round, which recovers the original 8-bit pixels.
        square: True (reference): squash to (r, r); False: keep the window's aspect ratio.
        patch_size: the VFM's patch size (8 for DINO ViT-B/8).

    Returns:
        (B, 3, h', w') float32, ImageNet-normalised, h' and w' multiples of ``patch_size``
        (h' = w' = r − r mod patch_size when ``square``). The VFM grid is (h'/p, w'/p).
    """
    _check_tensor(crops, "crops", 4)
    if crops.shape[1] != 3:
        _fail(f"crops must have 3 channels, got shape {tuple(crops.shape)}")
    if denormalize not in ("reference", "clip"):
        _fail(f"denormalize must be 'reference' or 'clip', got {denormalize!r}")
    x = crops.float()
    dev = x.device
    if denormalize == "reference":
        # torchvision Normalize(mean=-m/s, std=1/s) as the reference writes it: (x - (-m/s)) / (1/s)
        mean = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, REFERENCE_DENORM_STD)], device=dev)
        std = torch.tensor([1 / s for s in REFERENCE_DENORM_STD], device=dev)
        u = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        u8 = (u * 255).clamp_(0, 255).to(torch.uint8)  # numpy astype('uint8'): truncation
    else:
        pix = x * torch.tensor(CLIP_PIXEL_STD, device=dev).view(1, 3, 1, 1) + \
            torch.tensor(CLIP_PIXEL_MEAN, device=dev).view(1, 3, 1, 1)
        u8 = torch.floor(pix + 0.5).clamp_(0, 255).to(torch.uint8)
    h, w = u8.shape[-2:]
    if square and h != w:
        r = min(h, w)
        u8 = _pil_bicubic(u8, (r, r))
    t = u8.float() / 255  # ToTensor
    t = (t - torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    hp, wp = t.shape[-2] // patch_size * patch_size, t.shape[-1] // patch_size * patch_size
    if hp == 0 or wp == 0:
        _fail(f"window {h}x{w} gives a VFM input smaller than one {patch_size}x{patch_size} patch")
    return t[..., :hp, :wp]


# --------------------------------------------------------------------------------------- keys and ranges


def resize_keys(keys: torch.Tensor, vfm_grid: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """VFM patch keys on the VFM grid -> the CLIP grid, bilinear (align_corners False), per head and channel.

    Args:
        keys: (B, nh, Nv, hd) patch keys (prefix tokens already dropped), tokens row-major on ``vfm_grid``.
        vfm_grid: (rows, cols) of the VFM tokens, rows·cols = Nv.
        grid: (gh, gw) CLIP patch grid.

    Returns:
        (B, nh, gh·gw, hd) in the dtype of ``keys``; unchanged values when the grids are equal.
    """
    _check_tensor(keys, "vfm keys", 4)
    vh, vw = _pair(vfm_grid, "vfm_grid")
    gh, gw = _pair(grid, "grid")
    b, nh, n, hd = keys.shape
    if n != vh * vw:
        _fail(f"vfm keys hold {n} tokens but vfm_grid {vh}x{vw} has {vh * vw}")
    x = keys.transpose(-2, -1).reshape(b * nh, hd, vh, vw)  # (B·nh, hd, vh, vw)
    if (vh, vw) != (gh, gw):
        x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False)
    return x.reshape(b, nh, hd, gh * gw).transpose(-2, -1).contiguous()  # (B, nh, L, hd)


def minmax_to(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, dims: Sequence[int]) -> torch.Tensor:
    """Affine map of ``x`` sending its min/max over ``dims`` to ``lo``/``hi``: ``(x − min)/(max − min)·(hi − lo) + lo``.

    ``lo`` and ``hi`` broadcast against ``x`` (keep-dim reductions). Where ``x`` is constant over ``dims`` the
    result is ``lo`` (the reference divides by zero there). The result follows torch's type promotion of ``x``
    with ``lo``/``hi`` (float64 ``x`` with float32 bounds stays float64, as in the reference).
    """
    dims = tuple(dims)
    xmin = x.amin(dim=dims, keepdim=True)
    xmax = x.amax(dim=dims, keepdim=True)
    span = xmax - xmin
    norm = (x - xmin) / torch.where(span > 0, span, torch.ones_like(span))
    return norm * (hi - lo) + lo


def match_key_range(vfm_keys: torch.Tensor, clip_keys: torch.Tensor) -> torch.Tensor:
    """Min-max the VFM keys onto the range of CLIP's keys, one range per image over heads, tokens and channels.

    Args:
        vfm_keys: (B, nh_v, L, hd_v) VFM keys on the CLIP grid.
        clip_keys: (B, nh, L, hd) CLIP's last-block patch keys (no CLS).

    Returns:
        (B, nh_v, L, hd_v) with per-image min = min(clip_keys) and max = max(clip_keys).
    """
    _check_tensor(vfm_keys, "vfm keys", 4)
    _check_tensor(clip_keys, "clip keys", 4)
    if vfm_keys.shape[0] != clip_keys.shape[0]:
        _fail(f"batch mismatch: {vfm_keys.shape[0]} VFM key sets for {clip_keys.shape[0]} windows")
    lo = clip_keys.amin(dim=(1, 2, 3), keepdim=True)
    hi = clip_keys.amax(dim=(1, 2, 3), keepdim=True)
    return minmax_to(vfm_keys, lo, hi, dims=(1, 2, 3))


# ------------------------------------------------------------------------------------- spectra, matching


def key_spectra(keys: torch.Tensor, *, scale: float, num_eigs: int = 20, method: str = "graph") -> torch.Tensor:
    """Top eigenvalues of each head's key graph ``A = K Kᵀ·scale`` (L x L), in float64, descending.

    ``method="graph"`` (default) decomposes what the reference decomposes: ``A`` built in the dtype of ``keys``,
    cast to float64, ``eigvalsh`` (lower triangle), one head at a time (O(L³) per head). ``method="gram"`` uses
    the (hd x hd) Gram matrix ``Kᵀ K`` in float64, whose non-zero eigenvalues are those of ``K Kᵀ``: the same
    values up to rounding at O(L·hd²), but the head matching downstream is a discrete choice that can sit on exact
    ties (see :func:`match_heads`), so only the graph method reproduces the reference's choice bit for bit.

    Args:
        keys: (B, nh, L, hd).
        scale: the attention scale (CLIP's head_dim^-1/2 for both models in the reference).
        num_eigs: how many eigenvalues (20 in the reference); at most L are returned (zero-padded past rank hd
            with ``"gram"``).
        method: ``"graph"`` or ``"gram"``.

    Returns:
        (B, nh, min(num_eigs, L)) float64.
    """
    _check_tensor(keys, "keys", 4)
    if int(num_eigs) < 1:
        _fail(f"num_eigs must be >= 1, got {num_eigs!r}")
    if method not in ("graph", "gram"):
        _fail(f"method must be 'graph' or 'gram', got {method!r}")
    n = min(int(num_eigs), keys.shape[-2])
    if method == "graph":
        out = []
        for h in range(keys.shape[1]):  # one (B, L, L) graph at a time
            kh = keys[:, h]
            a = ((kh @ kh.transpose(-2, -1)) * scale).double()
            with _one_thread(a.device):
                out.append(torch.linalg.eigvalsh(a).flip(-1)[..., :n])
        return torch.stack(out, dim=1)
    k64 = keys.double()
    gram = k64.transpose(-2, -1) @ k64 * scale
    with _one_thread(gram.device):
        ev = torch.linalg.eigvalsh(gram).flip(-1)  # (B, nh, hd) descending
    if ev.shape[-1] < n:
        ev = F.pad(ev, (0, n - ev.shape[-1]))
    return ev[..., :n]


def spectral_distances(vfm_spectra: torch.Tensor, clip_spectra: torch.Tensor) -> torch.Tensor:
    """Wasserstein-1 distance between L1-normalised spectra: ``W[b, i, j] = Σ_t |sort(p_i)_t − sort(c_j)_t|``.

    Each spectrum is L2- then L1-normalised (as the reference; the same as L1 alone up to rounding), both are
    sorted and compared element by element.

    Args:
        vfm_spectra: (B, nh_v, n) rows i = VFM heads.
        clip_spectra: (B, nh, n) columns j = CLIP heads.

    Returns:
        (B, nh_v, nh) float64 distances in [0, 2].
    """
    _check_tensor(vfm_spectra, "vfm spectra", 3)
    _check_tensor(clip_spectra, "clip spectra", 3)
    if vfm_spectra.shape[0] != clip_spectra.shape[0] or vfm_spectra.shape[-1] != clip_spectra.shape[-1]:
        _fail(f"spectra shapes {tuple(vfm_spectra.shape)} and {tuple(clip_spectra.shape)} do not match")
    # L2 then L1, as the reference does (the L2 step changes nothing but rounding)
    p = F.normalize(F.normalize(vfm_spectra.double(), dim=-1), p=1, dim=-1).sort(dim=-1).values
    c = F.normalize(F.normalize(clip_spectra.double(), dim=-1), p=1, dim=-1).sort(dim=-1).values
    return (p[:, :, None, :] - c[:, None, :, :]).abs().sum(dim=-1)


@dataclass(frozen=True)
class HeadMatch:
    """Which VFM head feeds each CLIP head, and with what weight.

    Attributes:
        vfm_head: (B, nh) int64, the VFM head distilled into CLIP head h.
        weight: (B, nh) float32, the distance used as the distillation weight of CLIP head h.
        assignment: (B, nh) int64, the Hungarian solution as computed: VFM head i is paired with CLIP head
            ``assignment[i]``.
        distances: (B, nh, nh) float64, rows = VFM heads, columns = CLIP heads.
    """

    vfm_head: torch.Tensor
    weight: torch.Tensor
    assignment: torch.Tensor
    distances: torch.Tensor


def match_heads(distances: torch.Tensor, *, swap_quirk: bool = True) -> HeadMatch:
    """Hungarian assignment of VFM heads to CLIP heads that maximises the total spectral distance.

    As in the reference, scipy's ``linear_sum_assignment`` minimises the float32 cost ``1 − W``; the weight
    of a pair is ``1 − cost`` in float32. The assignment is discrete: exact ties are resolved by scipy's solver
    (a constant cost gives the identity), so near-ties can flip between precisions.

    With ``swap_quirk=True`` (the reference), the pairing is read with its indices exchanged: CLIP head h
    receives VFM head ``σ(h)`` with weight ``W[h, σ(h)]``, where σ maps VFM rows to CLIP columns. With
    ``swap_quirk=False``, CLIP head ``σ(i)`` receives VFM head i with weight ``W[i, σ(i)]`` (the assignment as
    computed). The two agree only where σ is an involution and W is symmetric on those pairs.

    Args:
        distances: (B, nh, nh) float, rows = VFM heads, columns = CLIP heads.
        swap_quirk: reproduce the reference's index exchange (default) or use the computed pairing.

    Returns:
        :class:`HeadMatch`.
    """
    from scipy.optimize import linear_sum_assignment

    _check_tensor(distances, "distances", 3)
    b, nv, nc = distances.shape
    if nv != nc:
        _fail(f"head matching needs as many VFM heads as CLIP heads, got {nv} and {nc}")
    cost = (1 - distances.double()).float()  # the reference's float32 cost matrix
    pair_weight = 1 - cost  # float32, as the reference's w_d
    sigma = torch.empty(b, nv, dtype=torch.long)
    for i in range(b):
        rows, cols = linear_sum_assignment(cost[i].detach().cpu().numpy())
        sigma[i, torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    sigma = sigma.to(distances.device)
    rows = torch.arange(nv, device=distances.device).expand(b, nv)
    w_sigma = pair_weight.gather(2, sigma.unsqueeze(-1)).squeeze(-1)  # (B, nh): W[i, σ(i)]
    if swap_quirk:
        vfm_head, weight = sigma, w_sigma
    else:
        vfm_head = torch.empty_like(sigma).scatter_(1, sigma, rows)
        weight = torch.empty_like(w_sigma).scatter_(1, sigma, w_sigma)
    return HeadMatch(vfm_head=vfm_head, weight=weight, assignment=sigma, distances=distances.double())


# ------------------------------------------------------------------------------------- low-rank graphs


def eigenscale(s: torch.Tensor) -> torch.Tensor:
    """Dynamic eigenscaling: the affine map of the last axis sending [min, max] to [min/2, 1.5·max].

    ``(s − min)/(max − min)·(1.5·max − 0.5·min) + 0.5·min``, per vector. A constant vector maps to ``0.5·s``
    (the reference divides by zero). Since the distilled graph is min-max normalised afterwards, only the ratios
    of the scaled values matter.
    """
    smin = s.amin(dim=-1, keepdim=True)
    smax = s.amax(dim=-1, keepdim=True)
    span = smax - smin
    scaled_range = 1.5 * smax - 0.5 * smin
    return (s - smin) / torch.where(span > 0, span, torch.ones_like(span)) * scaled_range + 0.5 * smin


def draw_sketches(
    batch: int,
    heads: int,
    tokens: int,
    rank: int,
    *,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """The random test matrices of ``torch.svd_lowrank``: one ``randn(tokens, rank)`` float64 draw per window
    and head, drawn in the reference's order (window by window, head by head; ``generator=None`` draws from
    torch's global generator like the reference).

    Returns:
        (batch, heads, tokens, rank) float64.
    """
    out = torch.empty(batch, heads, tokens, rank, dtype=torch.float64, device=device)
    for b in range(batch):
        for h in range(heads):
            out[b, h] = torch.randn(tokens, rank, dtype=torch.float64, generator=generator, device=device)
    return out


def lowrank_graph(
    keys: torch.Tensor,
    *,
    scale: float,
    rank: int = 10,
    eigenscaling: bool = True,
    svd: str = "exact",
    niter: int = 2,
    sketches: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rank-``rank`` reconstruction ``U φ(S) Vᵀ`` of each head's key graph ``A = K Kᵀ·scale``, in float64.

    ``svd="exact"`` (ovseg's default, deterministic): the best rank-r approximation. ``A`` is symmetric positive
    semi-definite, so with ``Kᵀ K = W Λ Wᵀ`` it is ``Σ_i φ(s·λ_i)/λ_i · (K w_i)(K w_i)ᵀ`` over the top r
    eigenpairs, computed from the (hd x hd) Gram matrix.

    ``svd="randomized"``: the reference's ``torch.svd_lowrank(A, q=rank, niter)`` (Halko et al., Alg. 4.4/5.1 as in
    torch >= 1.11: range finder on A, ``niter`` power iterations with QR, SVD of ``Qᵀ A``), with explicit test
    matrices ``sketches``. Given the same test matrix it reproduces ``torch.svd_lowrank`` to rounding. Its
    reconstruction equals ``Q Qᵀ A`` before eigenscaling, which is not the best rank-r approximation and is
    generally not symmetric. (torch <= 1.10, the reference's pinned version, range-finds on Aᵀ instead: its
    result is the transpose of this one for the transposed input.) The reference draws the test matrices from
    CUDA's generator, which cannot be reproduced on other devices.

    Args:
        keys: (B, H, L, hd) keys of the graphs to approximate.
        scale: the attention scale of ``A``.
        rank: r (10 in the reference); ``min(rank, L)`` is used (the reference fails for L < rank).
        eigenscaling: apply :func:`eigenscale` to the r singular values (the reference does, except for its
            ``voc20`` and ``city_scapes`` configurations).
        svd: ``"exact"`` or ``"randomized"``.
        niter: power iterations of the randomized range finder (2 in the reference).
        sketches: (B, H, L, r) float64 test matrices for ``"randomized"`` (see :func:`draw_sketches`).

    Returns:
        (B, H, L, L) float64 (diagonal not zeroed).
    """
    _check_tensor(keys, "keys", 4)
    if svd not in ("exact", "randomized"):
        _fail(f"svd must be 'exact' or 'randomized', got {svd!r}")
    if int(rank) < 1:
        _fail(f"rank must be >= 1, got {rank!r}")
    b, nh, n, hd = keys.shape
    r = min(int(rank), n)
    if svd == "exact":
        k64 = keys.double()
        gram = k64.transpose(-2, -1) @ k64
        with _one_thread(gram.device):
            lam, w = torch.linalg.eigh(gram)  # (B, H, hd), ascending
        lam, w = lam.flip(-1).clamp_min(0), w.flip(-1)
        rk = min(r, hd)  # beyond rank hd the singular values of A are zero
        sv = lam[..., :rk] * scale  # top singular values of A
        if eigenscaling:
            full = F.pad(sv, (0, r - rk)) if r > rk else sv
            phi = eigenscale(full)[..., :rk]
        else:
            phi = sv
        lam_r = lam[..., :rk]
        coef = torch.where(lam_r > 0, phi / torch.where(lam_r > 0, lam_r, torch.ones_like(lam_r)),
                           torch.zeros_like(lam_r))  # (B, H, rk)
        p = k64 @ w[..., :rk]  # (B, H, L, rk): K w_i = sqrt(λ_i) u_i
        return (p * coef.unsqueeze(-2)) @ p.transpose(-2, -1)
    if sketches is None:
        _fail("svd='randomized' needs sketches (B, H, L, rank); see draw_sketches()")
    if tuple(sketches.shape) != (b, nh, n, r):
        _fail(f"sketches must have shape {(b, nh, n, r)}, got {tuple(sketches.shape)}")
    a = ((keys @ keys.transpose(-2, -1)) * scale).double()  # (B, H, L, L), rounded like the reference's graph
    with _one_thread(a.device):
        q = torch.linalg.qr(a @ sketches.to(a.device, torch.float64)).Q
        for _ in range(int(niter)):
            q = torch.linalg.qr(a.transpose(-2, -1) @ q).Q
            q = torch.linalg.qr(a @ q).Q
        u, s, vh = torch.linalg.svd(q.transpose(-2, -1) @ a, full_matrices=False)
    u = q @ u
    phi = eigenscale(s) if eigenscaling else s
    return (u * phi.unsqueeze(-2)) @ vh


# -------------------------------------------------------------------------------- distilled attention


def _head_logits(
    kc: torch.Tensor,
    kd: torch.Tensor,
    vfm_head: torch.Tensor,
    mix: torch.Tensor,
    *,
    scale: float,
    rank: int,
    eigenscaling: bool,
    svd: str,
    niter: int,
    sketches: Optional[torch.Tensor],
) -> torch.Tensor:
    """One CLIP head: (B, L, L) combined graph ``(a·D' + A_clip)/(a + 1)`` in the dtype of the CLIP keys.

    kc: (B, L, hd) CLIP keys of the head; kd: (B, nh_v, L, hd_v) VFM keys; vfm_head: (B,) chosen VFM head;
    mix: (B,) float32 ``a = weight·strength``; sketches: (B, 1, L, r) or None.
    """
    b = kc.shape[0]
    ac = (kc @ kc.transpose(-2, -1)) * scale  # (B, L, L) CLIP k-k logits
    sel = kd[torch.arange(b, device=kd.device), vfm_head.to(kd.device)]  # (B, L, hd_v)
    d = lowrank_graph(sel.unsqueeze(1), scale=scale, rank=rank, eigenscaling=eigenscaling, svd=svd,
                      niter=niter, sketches=sketches)[:, 0]  # (B, L, L) float64
    d.diagonal(dim1=-2, dim2=-1).zero_()
    lo = ac.amin(dim=(-2, -1), keepdim=True)
    hi = ac.amax(dim=(-2, -1), keepdim=True)
    d = minmax_to(d, lo, hi, dims=(-2, -1))  # float64, onto the CLIP head's range
    a = mix.view(b, 1, 1).to(kc.device)
    out = (a.double() * d + ac.double()) / (a + 1).double()
    return out.to(ac.dtype)


def _prepare(
    k: torch.Tensor,
    vfm_keys: torch.Tensor,
    *,
    grid: Sequence[int],
    vfm_grid: Sequence[int],
    scale: Optional[float],
    num_eigs: int,
    strength: float,
    swap_quirk: bool,
    matching: str,
    spectra: str,
):
    _check_tensor(k, "clip keys", 4)
    _check_tensor(vfm_keys, "vfm keys", 4)
    gh, gw = _pair(grid, "grid")
    b, nh, n, hd = k.shape
    if n != 1 + gh * gw:
        _fail(f"CASS expects 1 + {gh}x{gw} CLIP tokens (CLS first), got {n}")
    if vfm_keys.shape[0] != b:
        _fail(f"batch mismatch: {vfm_keys.shape[0]} VFM key sets for {b} windows")
    if vfm_keys.shape[1] != nh:
        _fail(f"CASS matches heads one to one: the VFM has {vfm_keys.shape[1]} heads, CLIP {nh}")
    if matching not in ("spectral", "sequential"):
        _fail(f"matching must be 'spectral' or 'sequential', got {matching!r}")
    if not strength > 0:
        _fail(f"strength must be > 0, got {strength!r}")
    scale = hd ** -0.5 if scale is None else float(scale)
    kc = k[:, :, 1:]  # (B, nh, L, hd) patch keys
    kd = resize_keys(vfm_keys.to(kc.dtype), vfm_grid, (gh, gw))  # (B, nh, L, hd_v)
    kd = match_key_range(kd, kc)
    if matching == "spectral":
        dist = spectral_distances(key_spectra(kd, scale=scale, num_eigs=num_eigs, method=spectra),
                                  key_spectra(kc, scale=scale, num_eigs=num_eigs, method=spectra))
        match = match_heads(dist, swap_quirk=swap_quirk)
        mix = match.weight.float() * float(strength)  # float32, as the reference's w_d · scale_factor
    else:  # the reference's 'sequential' strategy: head h with head h, plain average
        eye = torch.arange(nh, device=k.device).expand(b, nh)
        match = HeadMatch(vfm_head=eye, weight=torch.full((b, nh), 1.0 / strength, device=k.device),
                          assignment=eye, distances=torch.zeros(b, nh, nh, dtype=torch.float64, device=k.device))
        mix = torch.ones(b, nh, device=k.device)
    return kc, kd, match, mix, scale, (gh, gw)


def distilled_logits(
    k: torch.Tensor,
    vfm_keys: torch.Tensor,
    *,
    grid: Sequence[int],
    vfm_grid: Sequence[int],
    scale: Optional[float] = None,
    num_eigs: int = 20,
    rank: int = 10,
    strength: float = 10.0,
    eigenscaling: bool = True,
    swap_quirk: bool = True,
    matching: str = "spectral",
    spectra: str = "graph",
    svd: str = "exact",
    niter: int = 2,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, HeadMatch]:
    """CASS's combined attention logits for every CLIP head, before the Gaussian and the softmax.

    For CLIP head h with VFM head m = ``vfm_head[h]`` and weight w (:func:`match_heads`), a = float32(w·strength):
    ``C_h = (a·D'_h + A_h)/(a + 1)`` with ``A_h = k_h k_hᵀ·scale`` (patches only) and ``D'_h`` the rank-r
    reconstruction of ``Kd_m Kd_mᵀ·scale`` (:func:`lowrank_graph`) with its diagonal zeroed and min-max mapped
    onto ``[min A_h, max A_h]``. ``matching="sequential"`` is the reference's non-default strategy: head h with
    head h, ``C_h = (D'_h + A_h)/2``, no eigenscaling.

    Args:
        k: (B, nh, 1 + gh·gw, hd) CLIP's last-block keys, CLS first.
        vfm_keys: (B, nh, Nv, hd_v) the VFM's last-block patch keys (prefix tokens dropped) on ``vfm_grid``.
        grid: CLIP grid (gh, gw). vfm_grid: VFM grid.
        scale: attention scale for both graphs (default CLIP's hd^-1/2, as the reference).
        num_eigs, rank, strength: 20, 10 and 10.0 in the reference.
        eigenscaling, swap_quirk, svd, niter: see :func:`lowrank_graph` and :func:`match_heads`.
        spectra: how the eigenvalues for the matching are computed (:func:`key_spectra`); ``"graph"`` (default)
            reproduces the reference's matching bit for bit, ``"gram"`` is O(L·hd²) instead of O(L³) per head.
        generator: for ``svd="randomized"``: the generator of the test matrices (None: torch's global one).

    Returns:
        ((B, nh, L, L) logits in the dtype of ``k``, :class:`HeadMatch`).
    """
    kc, kd, match, mix, scale, grid = _prepare(k, vfm_keys, grid=grid, vfm_grid=vfm_grid, scale=scale,
                                               num_eigs=num_eigs, strength=strength, swap_quirk=swap_quirk,
                                               matching=matching, spectra=spectra)
    b, nh, n, _ = kc.shape
    sk = draw_sketches(b, nh, n, min(int(rank), n), generator=generator, device=k.device) \
        if svd == "randomized" else None
    scaling = eigenscaling and matching == "spectral"
    out = torch.stack([
        _head_logits(kc[:, h], kd, match.vfm_head[:, h], mix[:, h], scale=scale, rank=rank, eigenscaling=scaling,
                     svd=svd, niter=niter, sketches=None if sk is None else sk[:, h:h + 1])
        for h in range(nh)
    ], dim=1)
    return out, match


def cass_attention(
    q: Optional[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Sequence[int],
    vfm_keys: torch.Tensor,
    vfm_grid: Sequence[int],
    scale: Optional[float] = None,
    sigma: float = 5.0,
    num_eigs: int = 20,
    rank: int = 10,
    strength: float = 10.0,
    eigenscaling: bool = True,
    swap_quirk: bool = True,
    matching: str = "spectral",
    spectra: str = "graph",
    svd: str = "exact",
    niter: int = 2,
    generator: Optional[torch.Generator] = None,
    return_weights: bool = False,
    **_: object,
):
    """CASS's last-block attention: ``softmax(C_h + Ω) v_h`` per CLIP head, patches only (no CLS in or out).

    ``C_h`` is :func:`distilled_logits`; Ω is NACLIP's unnormalised Gaussian over the patch grid (σ = 5, no CLS
    row or column), added in float32 and rounded to the working dtype as the reference's in-place add does.
    Heads are processed one at a time, so the peak memory is a few (B, L, L) matrices, not (B, nh, L, L).
    In the reference the output then goes through ``out_proj``, ``ln_post`` and ``proj`` with no residual and
    no feed-forward block.

    Args:
        q: unused (may be None).
        k, v: (B, nh, 1 + gh·gw, hd) CLIP's last-block keys and values, CLS first.
        grid, vfm_keys, vfm_grid, scale, num_eigs, rank, strength, eigenscaling, swap_quirk, matching, spectra,
            svd, niter, generator: as in :func:`distilled_logits`.
        sigma: the Gaussian's standard deviation in patches (5.0).
        return_weights: also return the (B, nh, L, L) attention weights (memory grows with nh·L²).

    Returns:
        (B, nh, L, hd) in the dtype of ``v``, or (that, weights) when ``return_weights``.
    """
    _check_tensor(v, "values", 4)
    if v.shape[:3] != k.shape[:3]:
        _fail(f"keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
    kc, kd, match, mix, scale, grid = _prepare(k, vfm_keys, grid=grid, vfm_grid=vfm_grid, scale=scale,
                                               num_eigs=num_eigs, strength=strength, swap_quirk=swap_quirk,
                                               matching=matching, spectra=spectra)
    b, nh, n, _ = kc.shape
    vc = v[:, :, 1:]
    sk = draw_sketches(b, nh, n, min(int(rank), n), generator=generator, device=k.device) \
        if svd == "randomized" else None
    scaling = eigenscaling and matching == "spectral"
    omega = gaussian_window(grid, sigma, with_cls=False, device=k.device, dtype=torch.float32)  # (L, L)
    outs, weights = [], []
    for h in range(nh):
        c = _head_logits(kc[:, h], kd, match.vfm_head[:, h], mix[:, h], scale=scale, rank=rank,
                         eigenscaling=scaling, svd=svd, niter=niter,
                         sketches=None if sk is None else sk[:, h:h + 1])
        p = torch.softmax((c.float() + omega).to(c.dtype), dim=-1)  # (B, L, L)
        outs.append(p.to(v.dtype) @ vc[:, h])
        if return_weights:
            weights.append(p)
    out = torch.stack(outs, dim=1)  # (B, nh, L, hd)
    return (out, torch.stack(weights, dim=1)) if return_weights else out


# ------------------------------------------------------------------------------ object-presence prior


def cluster_texts(text: torch.Tensor, threshold: float) -> torch.Tensor:
    """Group the text queries: Ward linkage on their cosine distances, cut at ``threshold`` (scipy).

    As the reference: the embeddings are taken in float64 (the reference's are fp16), distances are
    ``clip(1 − cos, 0, 2)`` with a zero diagonal (scikit-learn's ``cosine_distances``), ``linkage(method='ward')``
    on the condensed matrix, ``fcluster(criterion='distance')``: two queries share a cluster when their
    cophenetic distance is <= ``threshold`` (so a threshold of 0 still joins identical embeddings). Clusters are
    numbered 0, 1, ... in order of their first query (scipy's own numbering does not affect the method).

    Args:
        text: (Q, E) text embeddings.
        threshold: the cut height (the reference's ``h_threshold``, 0.02-0.14 per dataset).

    Returns:
        (Q,) int64 cluster index of each query (a single query gives one cluster).
    """
    import numpy as np

    _check_tensor(text, "text embeddings", 2)
    threshold = float(threshold)
    if not threshold >= 0:
        _fail(f"threshold must be >= 0, got {threshold!r}")
    nq = text.shape[0]
    if nq == 0:
        _fail("no text queries given")
    if nq == 1:
        return torch.zeros(1, dtype=torch.long, device=text.device)
    from scipy.cluster.hierarchy import fcluster, linkage

    x = text.detach().to("cpu", torch.float64).numpy()
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    xn = x / norms[:, None]
    d = 1.0 - xn @ xn.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    labels = fcluster(linkage(d[np.triu_indices(nq, k=1)], method="ward"), t=threshold, criterion="distance")
    first = {}
    out = [first.setdefault(int(lab), len(first)) for lab in labels]
    return torch.tensor(out, dtype=torch.long, device=text.device)


def presence_prior(cls_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Object-presence prior: cosine of a CLIP image embedding with every query, ``(c/‖c‖) Tᵀ``.

    In the reference ``c`` is CLIP's own CLS output (vanilla last block, ``ln_post``, ``proj``) of the *whole
    resized image* in sliding-window mode, of the window itself in whole-image mode and for Cityscapes.

    Args:
        cls_embedding: (B, E) projected CLS embeddings.
        text: (Q, E) unit-norm text embeddings.

    Returns:
        (B, Q).
    """
    _check_tensor(cls_embedding, "cls embedding", 2)
    _check_tensor(text, "text embeddings", 2)
    if cls_embedding.shape[-1] != text.shape[-1]:
        _fail(f"embedding sizes differ: image {cls_embedding.shape[-1]}, text {text.shape[-1]}")
    c = cls_embedding / cls_embedding.norm(dim=-1, keepdim=True)
    return c @ text.to(c.dtype).T


def _check_weight(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        _fail(f"{name} must be in [0, 1], got {value!r}")
    return value


def adjust_text(
    feats: torch.Tensor,
    text: torch.Tensor,
    prior: torch.Tensor,
    clusters: torch.Tensor,
    *,
    alpha: float,
    top: int = 2,
) -> torch.Tensor:
    """Per image and cluster, move the most present query towards the mean of its ``top`` best patches.

    For each cluster c: ``q* = argmax_{q in c} prior[q]`` (first index on ties); the ``top`` patches with the
    highest cosine to ``t = T[q*]`` (ties to the lowest patch index; the reference's ``torch.topk`` leaves their
    order unspecified); ``m = normalize(mean of those patch features)``; ``T'[q*] = normalize((1−α)·t + α·m)``.
    All other queries keep their embedding; a single-query cluster always adjusts its query.

    Args:
        feats: (B, L, E) unit-norm patch features of the window.
        text: (Q, E) unit-norm text embeddings.
        prior: (B, Q) presence prior (:func:`presence_prior`).
        clusters: (Q,) int64 cluster index per query (:func:`cluster_texts`).
        alpha: step towards the patch mean (the reference's ``mean_vector_weight``, 0.01-0.05 per dataset).
        top: patches averaged (2 in the reference); at most L.

    Returns:
        (B, Q, E) adjusted text embeddings.
    """
    _check_tensor(feats, "patch features", 3)
    _check_tensor(text, "text embeddings", 2)
    _check_tensor(prior, "prior", 2)
    alpha = _check_weight(alpha, "alpha")
    b, n, e = feats.shape
    nq = text.shape[0]
    if text.shape[1] != e or prior.shape != (b, nq):
        _fail(f"shapes disagree: feats {tuple(feats.shape)}, text {tuple(text.shape)}, prior {tuple(prior.shape)}")
    clusters = torch.as_tensor(clusters, device=feats.device).long()
    if clusters.shape != (nq,) or (nq and clusters.min() < 0):
        _fail(f"clusters must be (Q,) = ({nq},) non-negative indices, got {tuple(clusters.shape)}")
    if int(top) < 1:
        _fail(f"top must be >= 1, got {top!r}")
    text = text.to(feats.dtype)
    nc = int(clusters.max()) + 1
    member = clusters.unsqueeze(0) == torch.arange(nc, device=feats.device).unsqueeze(1)  # (C, Q)
    present = prior.to(feats.dtype).unsqueeze(1).masked_fill(~member.unsqueeze(0), float("-inf"))  # (B, C, Q)
    has = member.any(dim=1)  # clusters without members (gaps in the numbering) are skipped
    rep = present.argmax(dim=-1)[:, has]  # (B, C') most present query per cluster
    t = F.normalize(text[rep], dim=-1)  # (B, C', E)
    sims = F.normalize(feats, dim=-1) @ t.transpose(-2, -1)  # (B, L, C')
    k = min(int(top), n)
    idx = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k, C')
    c = idx.shape[-1]
    picked = torch.gather(feats.unsqueeze(2).expand(b, n, c, e), 1, idx.unsqueeze(-1).expand(b, k, c, e))
    m = F.normalize(picked.mean(dim=1), dim=-1)  # (B, C', E)
    new = F.normalize((1 - alpha) * t + alpha * m, dim=-1)
    out = text.unsqueeze(0).expand(b, nq, e).clone()
    return out.scatter(1, rep.unsqueeze(-1).expand(b, c, e), new)


def presence_logits(
    feats: torch.Tensor,
    text: torch.Tensor,
    prior: torch.Tensor,
    clusters: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    top: int = 2,
) -> torch.Tensor:
    """Window logits with the object-presence prior: ``(1−β)·F T'ᵀ + β·prior`` (the prior is the same for
    every patch), ``T'`` from :func:`adjust_text`.

    Args:
        feats: (B, L, E) unit-norm patch features.
        text, prior, clusters, alpha, top: as in :func:`adjust_text`.
        beta: weight of the prior (the reference's ``global_semantics_weight``, 0.1-0.4 per dataset).

    Returns:
        (B, L, Q) cosine-scale logits.
    """
    beta = _check_weight(beta, "beta")
    adjusted = adjust_text(feats, text, prior, clusters, alpha=alpha, top=top)  # (B, Q, E)
    logits = feats @ adjusted.transpose(-2, -1)  # (B, L, Q)
    return logits * (1 - beta) + prior.to(logits.dtype).unsqueeze(1) * beta
