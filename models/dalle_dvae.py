"""DALL-E dVAE adapter: OpenAI's published discrete VAE behind the `ImageTokenizer` interface.

The encoder/decoder below reimplement the architecture of openai/DALL-E (`dall_e/encoder.py`,
`dall_e/decoder.py`, `dall_e/utils.py`; Copyright (c) 2021 OpenAI, Modified MIT License) in
plain PyTorch: 8192 codes, 8x downsampling, inputs squeezed into [eps, 1 - eps] by `map_pixels`. Submodule and parameter names
(`blocks.group_1.block_1.res_path.conv_1.w`, ...) match the original exactly, so the state of the
published `encoder.pkl` / `decoder.pkl` loads into these classes unchanged.

Weights are never downloaded here. Two on-disk formats:

* a plain state_dict file (`torch.save(module.state_dict(), path)`), loaded with
  `torch.load(..., weights_only=True)`: the safe, recommended format (`DalleDVAE.from_files`);
* the published whole-module pickles (`torch.save(model)` of the `dall_e` classes). Convert those
  once with `convert_published(path_in, path_out)`, which unpickles through a restricted
  unpickler (a fixed allowlist of globals; `dall_e.*` classes are mapped onto the classes here)
  and writes a state_dict. Unpickling is still pickle: only convert files you trust (the
  official ones). See docs/dalle_dvae.md.

Differences from the original, none of which changes the weights or the tokens: no `attrs`, no
fp16 path on CUDA (convolutions run in the input's float dtype), no input-dtype assertion.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LAPLACE_EPS: float = 0.1  # dall_e.utils.logit_laplace_eps

PUBLISHED_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
PUBLISHED_DECODER_URL = "https://cdn.openai.com/dall-e/decoder.pkl"


class DalleWeightsError(ValueError):
    """A weight file could not be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- pixel mapping


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the range the dVAE was trained on (logit-Laplace)."""
    if not torch.is_floating_point(x):
        raise TypeError(f"map_pixels expects a float tensor, got {x.dtype}")
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    if not torch.is_floating_point(x):
        raise TypeError(f"unmap_pixels expects a float tensor, got {x.dtype}")
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


# ----------------------------------------------------------------------------- architecture


class Conv2d(nn.Module):
    """dall_e.utils.Conv2d: square 'same' convolution with parameters named `w` and `b`."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True) -> None:
        super().__init__()
        if kw < 1 or kw % 2 != 1:
            raise ValueError(f"kernel width must be odd and >= 1, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16  # kept for fidelity; this reimplementation has no fp16 path
        w = torch.empty(n_out, n_in, kw, kw)
        w.normal_(std=1 / ((n_in * kw**2) ** 0.5))
        self.w = nn.Parameter(w)  # (n_out, n_in, kw, kw)
        self.b = nn.Parameter(torch.zeros(n_out))  # (n_out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, n_in, H, W) -> (B, n_out, H, W)
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """dall_e.encoder.EncoderBlock: id_path + post_gain * (relu, 3x3, relu, 3x3, relu, 3x3, relu, 1x1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, self.n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(self.n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, n_in, H, W) -> (B, n_out, H, W)
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """dall_e.decoder.DecoderBlock: id_path + post_gain * (relu, 1x1, relu, 3x3, relu, 3x3, relu, 3x3)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, self.n_hid, 1)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(self.n_hid, n_out, 3)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, n_in, H, W) -> (B, n_out, H, W)
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """dall_e.encoder.Encoder: (B, 3, H, W) mapped pixels -> (B, vocab_size, H/8, W/8) logits.

    Group k (k = 1..4) has `n_blk_per_group` blocks of width 2**(k-1) * n_hid; a 2x max-pool ends
    groups 1-3, hence 8x downsampling. Only group_count=4 is supported (as in the original,
    whose layer list is written out for four groups).
    """

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        if group_count != 4:
            raise ValueError(f"only group_count=4 is supported, got {group_count}")
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group

        def group(n_in: int, n_out: int, pool: bool) -> nn.Sequential:
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers)) for i in range(n_blk_per_group)
            ]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        h = n_hid
        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", Conv2d(input_channels, 1 * h, 7)),
                    ("group_1", group(1 * h, 1 * h, pool=True)),
                    ("group_2", group(1 * h, 2 * h, pool=True)),
                    ("group_3", group(2 * h, 4 * h, pool=True)),
                    ("group_4", group(4 * h, 8 * h, pool=False)),
                    (
                        "output",
                        nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(8 * h, vocab_size, 1, use_float16=False))])),
                    ),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, input_channels, H, W) -> (B, vocab_size, H/8, W/8)
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected input (B, {self.input_channels}, H, W), got {tuple(x.shape)}")
        return self.blocks(x)


class DalleDecoder(nn.Module):
    """dall_e.decoder.Decoder: (B, vocab_size, h, w) one-hot codes -> (B, 2 * output_channels, 8h, 8w).

    The output holds logit-Laplace statistics: the first `output_channels` channels are mu (pass
    through sigmoid then `unmap_pixels` for an image), the rest are log-scales.
    """

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        if group_count != 4:
            raise ValueError(f"only group_count=4 is supported, got {group_count}")
        self.group_count, self.n_init, self.n_hid, self.n_blk_per_group = group_count, n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = group_count * n_blk_per_group

        def group(n_in: int, n_out: int, upsample: bool) -> nn.Sequential:
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DecoderBlock(n_in if i == 0 else n_out, n_out, n_layers)) for i in range(n_blk_per_group)
            ]
            if upsample:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            return nn.Sequential(OrderedDict(layers))

        h = n_hid
        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", Conv2d(vocab_size, n_init, 1, use_float16=False)),
                    ("group_1", group(n_init, 8 * h, upsample=True)),
                    ("group_2", group(8 * h, 4 * h, upsample=True)),
                    ("group_3", group(4 * h, 2 * h, upsample=True)),
                    ("group_4", group(2 * h, 1 * h, upsample=False)),
                    ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(1 * h, 2 * output_channels, 1))]))),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, vocab_size, h, w) -> (B, 2 * output_channels, 8h, 8w)
        if x.dim() != 4 or x.shape[1] != self.vocab_size:
            raise ValueError(f"expected input (B, {self.vocab_size}, h, w), got {tuple(x.shape)}")
        return self.blocks(x)


# ----------------------------------------------------------------------------- tokenizer


class DalleDVAE(nn.Module):
    """The DALL-E dVAE as an `ImageTokenizer` (codebook_size 8192, downsample 8).

    `decoder` is optional: without it the tokenizer is encode-only and `decode` raises.
    """

    def __init__(self, encoder: DalleEncoder, decoder: DalleDecoder | None = None) -> None:
        super().__init__()
        if decoder is not None and decoder.vocab_size != encoder.vocab_size:
            raise ValueError(f"encoder has {encoder.vocab_size} codes but decoder {decoder.vocab_size}")
        self.encoder = encoder
        self.decoder = decoder
        self.codebook_size: int = encoder.vocab_size
        self.downsample: int = 2 ** (encoder.group_count - 1)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, H/8, W/8) int64 code indices."""
        d = self.downsample
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"image height and width must be multiples of {d}, got {tuple(images.shape[2:])}")
        if not torch.is_floating_point(images):
            raise TypeError(f"expected float images in [0, 1], got {images.dtype}")
        w = self.encoder.blocks.input.w
        x = map_pixels(images.to(device=w.device, dtype=w.dtype))  # (B, 3, H, W)
        logits = self.encoder(x)  # (B, 8192, H/8, W/8)
        return logits.argmax(dim=1).long()  # (B, H/8, W/8)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code indices -> (B, 3, 8h, 8w) float in [0, 1]."""
        if self.decoder is None:
            raise RuntimeError(
                "this DALL-E dVAE was loaded encode-only (no decoder weights); "
                "pass decoder_path to DalleDVAE.from_files to decode tokens"
            )
        if tokens.dim() != 3:
            raise ValueError(f"expected tokens (B, h, w), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"expected integer tokens, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        w = self.decoder.blocks.input.w
        z = F.one_hot(tokens.to(w.device).long(), self.codebook_size)  # (B, h, w, 8192)
        z = z.permute(0, 3, 1, 2).to(w.dtype)  # (B, 8192, h, w)
        stats = self.decoder(z).float()  # (B, 6, 8h, 8w)
        return unmap_pixels(torch.sigmoid(stats[:, :3]))  # (B, 3, 8h, 8w)

    @classmethod
    def from_files(
        cls,
        encoder_path: str | Path,
        decoder_path: str | Path | None = None,
        *,
        map_location: str | torch.device = "cpu",
        encoder_kwargs: dict[str, Any] | None = None,
        decoder_kwargs: dict[str, Any] | None = None,
    ) -> DalleDVAE:
        """Build the published architecture and load state_dict files (see `convert_published`).

        `encoder_kwargs` / `decoder_kwargs` override the published sizes (for tests and
        variants). Errors (`FileNotFoundError`, `DalleWeightsError`) name the file.
        """
        encoder = DalleEncoder(**(encoder_kwargs or {}))
        _load_into(encoder, encoder_path, map_location, "encoder")
        decoder = None
        if decoder_path is not None:
            decoder = DalleDecoder(**(decoder_kwargs or {}))
            _load_into(decoder, decoder_path, map_location, "decoder")
        return cls(encoder, decoder).eval()


# ----------------------------------------------------------------------------- loading


def _read_state_dict(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"DALL-E dVAE weight file not found: {path}")
    if not path.is_file():
        raise DalleWeightsError(f"{path}: not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "dall_e" in str(e):
            raise DalleWeightsError(
                f"{path}: this is a pickled dall_e module (the published encoder.pkl/decoder.pkl format), "
                "not a state_dict; convert it once with "
                "models.dalle_dvae.convert_published(path_in, path_out) and load the output"
            ) from e
        raise DalleWeightsError(f"{path}: not a torch state_dict file loadable with weights_only=True ({_short(e)})") from e
    except Exception as e:  # garbage bytes, truncated zip, ...
        raise DalleWeightsError(f"{path}: not a torch file ({type(e).__name__}: {_short(e)})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise DalleWeightsError(f"{path}: expected a state_dict (a dict of name -> tensor), got {type(obj).__name__}")
    return obj


def _load_into(module: nn.Module, path: str | Path, map_location: str | torch.device, what: str) -> None:
    path = Path(path)
    state = _read_state_dict(path, map_location)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]  # in module order
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
        raise DalleWeightsError(
            f"{path}: does not match the DALL-E dVAE {what} architecture "
            f"({type(module).__name__}); " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _short(e: BaseException, limit: int = 200) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return s[:limit]


# ----------------------------------------------------------------------------- published pickles

# Globals a published dall_e pickle may reference; everything else is refused. Storage types are
# resolved by torch.load itself before reaching `find_class`.
_DALL_E_CLASSES: dict[tuple[str, str], type] = {
    ("dall_e.utils", "Conv2d"): Conv2d,
    ("dall_e.encoder", "EncoderBlock"): EncoderBlock,
    ("dall_e.encoder", "Encoder"): DalleEncoder,
    ("dall_e.decoder", "DecoderBlock"): DecoderBlock,
    ("dall_e.decoder", "Decoder"): DalleDecoder,
}
_ALLOWED_GLOBALS: set[tuple[str, str]] = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("__builtin__", "set"),  # protocol-2 pickles name builtins the Python 2 way
    ("builtins", "dict"),
    ("__builtin__", "dict"),
    ("torch", "device"),
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.upsampling", "Upsample"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DALL_E_CLASSES:
            return _DALL_E_CLASSES[(module, name)]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (not in the DALL-E dVAE allowlist)")


class _RestrictedPickleModule:
    """What `torch.load(pickle_module=...)` needs: `Unpickler` and `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: io.BufferedIOBase, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(f, **kwargs).load()


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """state_dict of an unpickled module, read from its __dict__ (robust to torch-version skew)."""
    d = vars(obj)
    for name, p in (d.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach().clone().contiguous()
    for name, b in (d.get("_buffers") or {}).items():
        if b is not None and name not in (d.get("_non_persistent_buffers_set") or set()):
            out[prefix + name] = b.detach().clone().contiguous()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def convert_published(path_in: str | Path, path_out: str | Path) -> Path:
    """Convert a published `encoder.pkl` / `decoder.pkl` (pickled dall_e module) to a state_dict file.

    Uses a restricted unpickler: only the dall_e classes (mapped onto this module's classes),
    torch's tensor-rebuild helpers and a few torch.nn containers are allowed. This narrows, but
    does not remove, the risk of unpickling: only convert the official files.
    Returns `path_out`, which `DalleDVAE.from_files` then loads with weights_only=True.
    """
    path_in, path_out = Path(path_in), Path(path_out)
    if not path_in.exists():
        raise FileNotFoundError(f"DALL-E dVAE published file not found: {path_in}")
    try:
        obj = torch.load(path_in, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except pickle.UnpicklingError as e:
        raise DalleWeightsError(f"{path_in}: cannot convert ({_short(e)})") from e
    except Exception as e:
        raise DalleWeightsError(f"{path_in}: not a torch file ({type(e).__name__}: {_short(e)})") from e
    if not isinstance(obj, (DalleEncoder, DalleDecoder)):
        raise DalleWeightsError(
            f"{path_in}: expected a pickled dall_e Encoder or Decoder, got {type(obj).__name__}"
        )
    state: dict[str, torch.Tensor] = OrderedDict()
    _collect_tensors(obj, "", state)
    if not state:
        raise DalleWeightsError(f"{path_in}: the pickled module holds no parameters")
    path_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_out.with_name(path_out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path_out)
    return path_out
