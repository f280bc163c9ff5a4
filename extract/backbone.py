"""The frozen LPM: building a timm ViT of a supported family, loading its weights, and running it while capturing
top-k K/V exactly as the family's attention uses them.

Supported families (``FAMILIES``), chosen by model and attention class, never by name:

* ``vit``: timm ``VisionTransformer`` with its ``Attention`` (ViT, DeiT, DeiT-3, DINOv2 with or without registers,
  CLIP, SigLIP, AIMv2, ...). q/k/v come straight from the hooked fused qkv projection, nothing is recomputed.
* ``eva``: timm ``Eva`` with ``EvaAttention`` or ``AttentionRope`` (EVA, EVA-02, RoPE-ViT, DINOv3, PE). q/k/v are
  recomputed from the attention's input with its own parameters: projection (with EVA's q/v bias), q/k norm, the
  rotary embedding on the patch tokens, K/V heads expanded for grouped-query attention. The projection is not a
  hookable module call in every variant, and the rotary embedding is applied outside any module.

Every other model (relative-position-bias ViTs such as BEiT, windowed SAM ViTs, hybrid CNN stems, parallel
blocks, NaFlex, non-ViTs) is refused with one line before anything is loaded.
"""
from __future__ import annotations

import hashlib
import math
import socket
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, PatchEmbed, apply_rot_embed_cat
from timm.models import deit, eva, vision_transformer
from torch import nn

from fpt import FptError, failure_reason
from fpt.config import check_res_fits_patch
from fpt.extract.attention_lse import AttentionLse
from fpt.extract.selection import num_selected, select_important_tokens, uses_triton

RANDOM_INIT_SEED = 0

# called with q, k, v [B, H, N, d] exactly as the attention uses them (after norms and the rotary embedding)
OnQKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def capture_fused_qkv(attn: Attention, on_qkv: OnQKV) -> None:
    """timm ``Attention``: hook its qkv projection and split it the way ``Attention.forward`` does."""
    def hook(_module, _inputs, qkv: torch.Tensor):
        B, N, _ = qkv.shape                                              # [B, N, 3*H*d] -> 3 x [B, H, N, d]
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        on_qkv(attn.q_norm(q), attn.k_norm(k), v)
    attn.qkv.register_forward_hook(hook)


def capture_rope_qkv(attn: eva.EvaAttention | AttentionRope, on_qkv: OnQKV) -> None:
    """``EvaAttention`` / ``AttentionRope``: recompute q/k/v from the attention's input and its ``rope`` argument."""
    def hook(_module, args, kwargs):
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise FptError("masked or causal attention is not supported by the token selection")
        x = args[0] if args else kwargs["x"]
        on_qkv(*rope_qkv(attn, x, kwargs.get("rope", args[1] if len(args) > 1 else None)))
    attn.register_forward_pre_hook(hook, with_kwargs=True)


def rope_qkv(attn: eva.EvaAttention | AttentionRope, x: torch.Tensor, rope: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, d] as ``attn.forward(x, rope=rope)`` computes them before attending (x: [B, N, D])."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)
        qkv = attn.qkv(x) if q_bias is None else F.linear(x, attn.qkv.weight,
                                                          torch.cat((q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:                               # prefix tokens (class, registers) are not rotated
        n, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:                                     # grouped-query attention: head h uses kv head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


@dataclass(frozen=True)
class Family:
    name: str
    models: tuple[type, ...]                # model classes, matched exactly
    attentions: tuple[type, ...]            # attention classes of every block, matched exactly
    capture: Callable[[nn.Module, OnQKV], None]
    checkpoint_filter: Callable             # timm's state-dict converter (resamples position embeddings)
    examples: str


FAMILIES = (
    Family("vit", (vision_transformer.VisionTransformer, deit.VisionTransformerDistilled), (Attention,),
           capture_fused_qkv, vision_transformer.checkpoint_filter_fn,
           "ViT, DeiT, DeiT-3, DINOv2 (+registers), CLIP, SigLIP, AIMv2"),
    Family("eva", (eva.Eva,), (eva.EvaAttention, AttentionRope), capture_rope_qkv, eva.checkpoint_filter_fn,
           "EVA, EVA-02, RoPE-ViT, DINOv3, PE"),
)
SUPPORTED = "; ".join(f"timm {f.models[0].__name__}: {f.examples}" for f in FAMILIES)


def vit_family(model: nn.Module, name: str) -> Family:
    """The supported family of ``model``, or a one-line refusal naming the supported ones."""
    blocks = getattr(model, "blocks", None)
    is_stack = isinstance(blocks, (nn.Sequential, nn.ModuleList))
    attentions = {type(getattr(b, "attn", None)) for b in blocks} if is_stack else set()
    for family in FAMILIES:
        if (type(model) in family.models and attentions and attentions <= set(family.attentions)
                and type(getattr(model, "patch_embed", None)) is PatchEmbed):
            return family
    found = type(model).__name__ + (f" with {', '.join(sorted(t.__name__ for t in attentions))}" if attentions
                                    else "")
    raise FptError(f"backbone {name} ({found}) is not a supported ViT family; supported: {SUPPORTED}")


def has_class_token(model: nn.Module) -> bool:
    """Whether token 0 is a class token (SigLIP and *_gap ViTs have none: token 0 is a register or a patch)."""
    return getattr(model, "cls_token", None) is not None


@dataclass
class BackboneInfo:
    name: str
    embed_dim: int
    heads: int
    head_dim: int
    patch_size: int
    depth: int
    prefix_tokens: int           # class and register tokens before the patches (token 0 is the class token if any)
    n_params: int                # parameters of the LPM as it runs (at res, no classifier head)
    weights_sha256: str          # hash of the loaded parameters, whatever their source
    weights_source: str          # "file:<name>", "timm-pretrained" or "random-init"
    random_init: bool
    family: str = "vit"          # FAMILIES name: how q/k/v are captured
    class_token: bool = True     # False: `cls` holds the family's pooled feature, --importance cls is refused
    # parameters of the LPM as timm publishes it (its own classifier head and input size): the total of the
    # learnable share, as the paper's Table 4 counts it (``published_parameter_count``); None: not buildable so
    published_params: int | None = None

    def as_attrs(self) -> dict:
        return asdict(self)


def architecture_name(name: str, offline: bool) -> str:
    """What to give ``timm.create_model`` for ``--backbone name``.

    timm names as they are; ``local-dir:PATH`` (a folder with timm's config.json) as it is; ``hf-hub:ORG/NAME``
    as it is when timm may download, else (``offline``: --weights or --random-init) built from the config.json in
    the local Hugging Face cache, never from the network."""
    try:
        source, model_id = timm.models.parse_model_name(name)
    except ValueError as e:
        raise FptError(f"--backbone {name!r}: {e}") from None
    if source is None:
        if not timm.is_model(name):
            raise FptError(f"unknown backbone {name!r}: give a timm ViT name, e.g. vit_base_patch16_224.augreg_in21k, "
                           "or hf-hub:ORG/NAME")
        return name
    if source == "local-dir":
        if not (Path(model_id) / "config.json").is_file():
            raise FptError(f"--backbone {name}: no config.json in {model_id}")
        return name
    if not offline:
        return name
    repo, _, revision = model_id.partition("@")
    try:
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(repo, "config.json", revision=revision or None, local_files_only=True)
    except Exception:
        raise FptError(f"--backbone {name}: its config.json is not in the local Hugging Face cache and nothing is "
                       "downloaded with --weights/--random-init; pass the timm architecture name instead, e.g. "
                       "--backbone vit_base_patch14_dinov2 --weights FILE") from None
    return f"local-dir:{Path(config).parent}"


def create_backbone(name: str, res: int, weights: Path | None = None, random_init: bool = False,
                    layers: list[int] | None = None) -> tuple[nn.Module, BackboneInfo]:
    """A frozen timm ViT of a supported family at input side ``res``, in eval mode, without classifier head.

    The family, and ``layers`` (the blocks to be extracted) against its depth, are checked on an empty
    (meta-device) model first, so that a model or layer choice that cannot work is refused before any weights
    are read or downloaded."""
    pretrained = weights is None and not random_init
    with hub_cache_only_unless_reachable(pretrained) as reachable:
        return _create_backbone(name, res, weights, random_init, layers, reachable)


def _create_backbone(name: str, res: int, weights: Path | None, random_init: bool, layers: list[int] | None,
                     hub_reachable: bool) -> tuple[nn.Module, BackboneInfo]:
    pretrained = weights is None and not random_init
    arch = architecture_name(name, offline=not pretrained)
    kwargs = dict(num_classes=0, img_size=res)
    try:
        skeleton = timm.create_model(arch, pretrained=False, device="meta", **kwargs)
    except (AssertionError, TypeError, ValueError) as e:
        if isinstance(e, TypeError) and "img_size" in str(e):          # not a ViT at all (e.g. a CNN)
            vit_family(timm.create_model(arch, pretrained=False, device="meta", num_classes=0), name)
        raise FptError(f"backbone {name} cannot be built at res {res}: {e}") from None
    except Exception as e:          # hf-hub: the config download failed
        raise FptError(f"cannot load backbone {name} ({download_failure(e, hub_reachable)}); pass the timm "
                       "architecture name with --weights FILE, or --random-init") from None
    family = vit_family(skeleton, name)
    if layers is not None and (min(layers) < 0 or max(layers) >= len(skeleton.blocks)):
        raise FptError(f"--layers {layers}: {name} has layers 0-{len(skeleton.blocks) - 1}")
    patch = skeleton.patch_embed.patch_size[0]
    check_res_fits_patch(res, patch, name)
    if pretrained:
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as e:
            raise FptError(f"cannot load pretrained weights for {name} ({download_failure(e, hub_reachable)}); "
                           "pass --weights FILE or --random-init") from None
        source = "timm-pretrained"
    elif weights is not None and file_gives_every_tensor(skeleton):
        # every tensor comes from the file (``_load_weights`` refuses one that misses any): the skeleton gets
        # memory and the weights, with no random init drawn only to be overwritten (ViT-B: ~1 s of CPU, a ViT-g
        # ten times that)
        model = skeleton.to_empty(device="cpu")
        _load_weights(model, Path(weights), family)
        source = f"file:{Path(weights).name}"
    else:
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(arch, pretrained=False, **kwargs)
        source = "random-init"
        if weights is not None:         # a model with buffers it computes (EVA's RoPE): built, then loaded
            _load_weights(model, Path(weights), family)
            source = f"file:{Path(weights).name}"
    model.eval().requires_grad_(False)
    if random_init:
        warnings.warn(f"{name} is RANDOMLY INITIALISED: the store holds no pre-trained knowledge", stacklevel=2)
    attn = model.blocks[0].attn
    info = BackboneInfo(
        name=name, embed_dim=model.embed_dim, heads=attn.num_heads, head_dim=attn.head_dim, patch_size=patch,
        depth=len(model.blocks), prefix_tokens=model.num_prefix_tokens,
        n_params=sum(p.numel() for p in model.parameters()),
        weights_sha256=parameters_sha256(model), weights_source=source, random_init=random_init,
        family=family.name, class_token=has_class_token(model), published_params=published_parameter_count(arch),
    )
    return model, info


def published_parameter_count(arch: str) -> int | None:
    """Parameters of ``arch`` as timm publishes it, with its own classifier head and input size, counted on an
    empty (meta-device) model. The paper's learnable shares count the LPM so: its Table 4 (0.96-1.61 %, 4-128
    prompts) is reproduced to the digit only by ViT-B/16-384 with its 1000-class head, the checkpoint the official
    code loads, not by the headless model at 512 px that runs (0.97 % and 1.12 % at 4 and 32 prompts). None
    when timm cannot build it with its defaults."""
    try:
        skeleton = timm.create_model(arch, pretrained=False, device="meta")
    except Exception:           # noqa: BLE001 - a count for the report only
        return None
    return sum(p.numel() for p in skeleton.parameters())


def hub_host() -> str:
    """The Hugging Face endpoint's host name (``HF_ENDPOINT``: a mirror)."""
    from huggingface_hub import constants
    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


def download_failure(e: Exception, hub_reachable: bool) -> str:
    """Why a download failed, in a few words: the unreachable hub when its name did not resolve, else the error."""
    if not hub_reachable:
        return (f"{hub_host()} cannot be reached: its name does not resolve, and the local Hugging Face cache "
                f"does not hold the files ({type(e).__name__})")
    return f"{type(e).__name__}: {e}"


@contextmanager
def hub_cache_only_unless_reachable(downloads: bool) -> Iterator[bool]:
    """Hugging Face downloads inside the block come from the local cache alone when the hub's host name does not
    resolve (no network, or none to the outside, as on many clusters' compute nodes); yields whether it resolves.
    huggingface_hub retries a failed name lookup five times, with back-off, before it looks in the cache: about
    46 s on the dev box before the one-line error. ``downloads`` False: nothing is looked up. Sets
    huggingface_hub's offline switch for the block (``HF_HUB_OFFLINE``), so it is meant for a command's one
    model load, not for threads that download at the same moment."""
    if not downloads:
        yield True
        return
    from huggingface_hub import constants
    try:
        socket.getaddrinfo(hub_host(), 443)
        reachable = True
    except (OSError, UnicodeError):
        reachable = False
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not reachable
    try:
        yield reachable
    finally:
        constants.HF_HUB_OFFLINE = before


def file_gives_every_tensor(model: nn.Module) -> bool:
    """Whether a weights file that ``_load_weights`` accepts sets every tensor of ``model``: it has no buffer
    that no state dict holds (non-persistent, computed when the model is built, e.g. EVA's RoPE tables) and no
    ``head.`` tensor (which ``_load_weights`` leaves out). Only then may the model be built empty."""
    persistent = set(model.state_dict())
    return (all(name in persistent for name, _ in model.named_buffers())
            and not any(name.startswith("head.") for name in persistent))


def _load_weights(model: nn.Module, path: Path, family: Family) -> None:
    """Load a local timm/torch state dict or .safetensors file, resampling position embeddings to the res."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FptError(f"cannot read weights file {path}: {failure_reason(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FptError(f"weights file {path} does not hold a state dict")
    try:
        state = family.checkpoint_filter(state, model)
    except Exception as e:
        raise FptError(f"weights file {path} does not match {type(model).__name__}: "
                       f"{type(e).__name__}: {e}") from None
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise FptError(f"weights file {path} does not match {type(model).__name__}: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def parameters_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenLPM(nn.Module):
    """Runs a timm ViT of a supported family with its own (fused) attention and captures, per chosen layer and
    head, the K/V of the ``token_ratio`` most important tokens, from the q/k/v the attention really uses.

    When "global" importance runs the triton kernel, the chosen layers' attention also hands over its row
    log-sum-exp (``attention_lse``), so the kernel makes one pass over the scores instead of two; the attention's
    output is unchanged, so is every K/V. ``attention_lse=False`` turns that off (benches, tests).

    forward(images [B, 3, R, R]) -> dict:
        keys, values [B, L, H, k, d]; indices [B, L, H, k]; cls [B, D] (the final pooled feature: the normalised
        class token, or the family's pool when it has no class token)
    """

    def __init__(self, model: nn.Module, layers: list[int], token_ratio: float, importance: str = "global",
                 query_block: int = 256, importance_backend: str = "auto", attention_lse: bool = True):
        super().__init__()
        family = vit_family(model, type(model).__name__)
        if importance == "cls" and not has_class_token(model):
            raise FptError("--importance cls needs a class token, and this backbone has none (token 0 is a "
                           "register or a patch); use --importance global")
        self.model, self.layers = model, layers
        self.token_ratio, self.importance, self.query_block = token_ratio, importance, query_block
        self.importance_backend = importance_backend     # see token_importance: triton kernel on CUDA by default
        self.attention_lse = attention_lse
        self._captured: dict[int, tuple[torch.Tensor, ...]] = {}
        self._lse: AttentionLse | None = None            # during a forward that takes the attention's lse
        self._waiting: dict[int, tuple[torch.Tensor, ...]] = {}    # q, k, v of a layer until its attention ran
        for layer in layers:
            attn = model.blocks[layer].attn
            family.capture(attn, self._make_hook(layer, attn))
            attn.register_forward_pre_hook(self._enter_lse)
            attn.register_forward_hook(self._make_finish(layer, attn))

    def n_selected(self, res: int) -> int:
        grid = res // self.model.patch_embed.patch_size[0]
        return num_selected(grid * grid + self.model.num_prefix_tokens, self.token_ratio)

    def _select(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, N, d] of one layer (``lse`` [B, H, N]: their attention's row log-sum-exp, when handed
        over) -> (indices [B, H, k], keys [B, H, k, d], values [B, H, k, d])."""
        return select_important_tokens(q, k, v, attn.scale, self.token_ratio, self.importance, self.query_block,
                                       self.importance_backend, lse)

    def _make_hook(self, layer: int, attn: nn.Module) -> OnQKV:
        """The capture hook of ``layer``. One attention call of a forward that takes the lse runs, in order:
        1. the pre-hook (``_enter_lse``) enters ``AttentionLse``;
        2. this hook gets the layer's q/k/v and arms it with ``on_lse``;
        3. the attention's SDPA call, served by ``AttentionLse``, hands its lse to ``on_lse``, which selects;
        4. the forward hook (``_make_finish``) exits it, and selects without the lse where the call was not served.
        Without the lse (a CPU, ``--importance cls``) this hook selects at once."""
        def hook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            if self._lse is None:
                self._captured[layer] = self._select(attn, q, k, v)
                return
            self._waiting[layer] = (q, k, v)

            def on_lse(q, k, v, lse, scale):                  # the q/k/v the attention got, its lse and scale
                del self._waiting[layer]
                self._captured[layer] = self._select(attn, q, k, v, lse if math.isclose(scale, attn.scale) else None)
            self._lse.arm(on_lse)
        return hook

    def _enter_lse(self, *_) -> None:
        if self._lse is not None:
            self._lse.__enter__()

    def _make_finish(self, layer: int, attn: nn.Module):
        def finish(*_):
            if self._lse is None:
                return
            self._lse.__exit__(None, None, None)
            if layer in self._waiting:                        # the attention's call was not one the mode serves
                self._lse.disarm()
                self._captured[layer] = self._select(attn, *self._waiting.pop(layer))
        return finish

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured.clear()
        take_lse = self.attention_lse and self.importance == "global" and uses_triton(images, self.importance_backend)
        self._lse = AttentionLse() if take_lse else None
        try:
            feats = self.model.forward_features(images)                  # [B, N, D], final norm applied
        finally:
            if self._lse is not None and self._lse.entered:              # an error inside an attention
                self._lse.__exit__(None, None, None)
            self._lse = None
            self._waiting.clear()
        cls = self.model.forward_head(feats, pre_logits=True)            # [B, D]
        idx, keys, values = (torch.stack([self._captured[l][i] for l in self.layers], dim=1) for i in range(3))
        self._captured.clear()
        return {"keys": keys, "values": values, "indices": idx, "cls": cls}
