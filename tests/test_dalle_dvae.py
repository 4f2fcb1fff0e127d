"""DALL-E dVAE adapter (models/dalle_dvae.py): architecture, tokenizer interface, weight loading.

The real weights cannot be downloaded here, so loading is tested with randomly initialised
models of the same architecture, saved as a state_dict and as a whole-module pickle whose
classes carry the `dall_e.*` module paths of the published files.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from models.dalle_dvae import (
    Conv2d,
    DalleDecoder,
    DalleDVAE,
    DalleEncoder,
    DalleWeightsError,
    DecoderBlock,
    EncoderBlock,
    convert_published,
    map_pixels,
    unmap_pixels,
)
from models.tokenizer import ImageTokenizer

SMALL_ENC = {"n_hid": 64}  # same layer names as the published model, ~30x fewer parameters
SMALL_DEC = {"n_hid": 64, "n_init": 32}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _conv(n_in: int, n_out: int, kw: int) -> int:
    return n_out * n_in * kw * kw + n_out


def _published_encoder_params(n_hid=256, n_blk=2, vocab=8192, c_in=3) -> int:
    """Parameter count of dall_e.encoder.Encoder, worked out independently from its layer list."""

    def block(n_in, n_out):
        h = n_out // 4
        idp = _conv(n_in, n_out, 1) if n_in != n_out else 0
        return idp + _conv(n_in, h, 3) + _conv(h, h, 3) + _conv(h, h, 3) + _conv(h, n_out, 1)

    widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
    total = _conv(c_in, n_hid, 7) + _conv(8 * n_hid, vocab, 1)
    for g in range(4):
        total += sum(block(widths[g] if i == 0 else widths[g + 1], widths[g + 1]) for i in range(n_blk))
    return total


def _published_decoder_params(n_init=128, n_hid=256, n_blk=2, vocab=8192, c_out=3) -> int:
    def block(n_in, n_out):
        h = n_out // 4
        idp = _conv(n_in, n_out, 1) if n_in != n_out else 0
        return idp + _conv(n_in, h, 1) + _conv(h, h, 3) + _conv(h, h, 3) + _conv(h, n_out, 3)

    widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
    total = _conv(vocab, n_init, 1) + _conv(n_hid, 2 * c_out, 1)
    for g in range(4):
        total += sum(block(widths[g] if i == 0 else widths[g + 1], widths[g + 1]) for i in range(n_blk))
    return total


@pytest.fixture(scope="module")
def full_encoder() -> DalleEncoder:
    torch.manual_seed(0)
    return DalleEncoder().eval()


@pytest.fixture(scope="module")
def small_dvae() -> DalleDVAE:
    torch.manual_seed(1)
    return DalleDVAE(DalleEncoder(**SMALL_ENC), DalleDecoder(**SMALL_DEC)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, 3, 32, 32)


# ----------------------------------------------------------------------------- architecture


def test_published_size_parameter_counts(full_encoder):
    assert _n_params(full_encoder) == _published_encoder_params() == 53_786_240
    assert _n_params(DalleDecoder()) == _published_decoder_params() == 43_829_766


def test_published_layer_names(full_encoder):
    sd = full_encoder.state_dict()
    assert len(sd) == 2 * (1 + 1 + 4 * 2 * 4 + 3)  # input, output, 8 blocks x 4 convs, 3 id_paths
    assert sd["blocks.input.w"].shape == (256, 3, 7, 7)
    assert sd["blocks.group_2.block_1.id_path.w"].shape == (512, 256, 1, 1)
    assert sd["blocks.group_4.block_2.res_path.conv_4.b"].shape == (2048,)
    assert sd["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in sd  # identity when widths match
    dec = DalleDecoder(**SMALL_DEC).state_dict()
    assert dec["blocks.input.w"].shape == (32, 8192, 1, 1)
    assert dec["blocks.output.conv.w"].shape == (6, 64, 1, 1)  # 2 x 3 logit-Laplace channels


def test_full_size_encode_shape_and_range(full_encoder):
    m = DalleDVAE(full_encoder)
    assert isinstance(m, ImageTokenizer)
    assert (m.codebook_size, m.downsample) == (8192, 8)
    tokens = m.encode(torch.rand(1, 3, 32, 32))
    assert tokens.shape == (1, 4, 4) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 8192


# ----------------------------------------------------------------------------- tokenizer


def test_encode_is_argmax_of_logits_on_mapped_pixels(small_dvae, images):
    tokens = small_dvae.encode(images)
    assert tokens.shape == (2, 4, 4) and tokens.dtype == torch.int64
    with torch.no_grad():
        logits = small_dvae.encoder(map_pixels(images))  # (B, 8192, 4, 4)
    assert logits.shape == (2, 8192, 4, 4)
    assert torch.equal(tokens, logits.argmax(1))


def test_decode_shape_and_range(small_dvae, images):
    assert isinstance(small_dvae, ImageTokenizer)
    out = small_dvae.decode(small_dvae.encode(images))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_encode_rejects_bad_input(small_dvae):
    with pytest.raises(ValueError, match="multiples of 8"):
        small_dvae.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small_dvae.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="token ids"):
        small_dvae.decode(torch.full((1, 2, 2), 8192))


def test_map_unmap_pixels():
    x = torch.rand(2, 3, 8, 8)
    y = map_pixels(x)
    assert float(y.min()) >= 0.1 - 1e-6 and float(y.max()) <= 0.9 + 1e-6
    assert torch.allclose(map_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 0.9]))
    assert torch.allclose(unmap_pixels(y), x, atol=1e-6)
    assert torch.equal(unmap_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))  # clamped


def test_decode_without_decoder_raises(small_dvae, images):
    m = DalleDVAE(small_dvae.encoder)
    assert not m.has_decoder
    with pytest.raises(RuntimeError, match="encode-only.*decoder_path"):
        m.decode(m.encode(images))


# ----------------------------------------------------------------------------- loading


def test_state_dict_round_trip(tmp_path, small_dvae, images):
    enc, dec = tmp_path / "encoder.pt", tmp_path / "decoder.pt"
    torch.save(small_dvae.encoder.state_dict(), enc)
    torch.save(small_dvae.decoder.state_dict(), dec)
    loaded = DalleDVAE.from_files(enc, dec, encoder_kwargs=SMALL_ENC, decoder_kwargs=SMALL_DEC)
    tokens = small_dvae.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), small_dvae.decode(tokens))
    encode_only = DalleDVAE.from_files(str(enc), encoder_kwargs=SMALL_ENC)
    assert encode_only.decoder is None and torch.equal(encode_only.encode(images), tokens)


_SHIM_NAMES = {
    Conv2d: ("dall_e.utils", "Conv2d"),
    EncoderBlock: ("dall_e.encoder", "EncoderBlock"),
    DalleEncoder: ("dall_e.encoder", "Encoder"),
    DecoderBlock: ("dall_e.decoder", "DecoderBlock"),
    DalleDecoder: ("dall_e.decoder", "Decoder"),
}


def _save_like_published(model: torch.nn.Module, path, monkeypatch, zipfile: bool = True) -> None:
    """torch.save(model) with every dall_e-derived class pickled under its original module path."""
    mods = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.utils", "dall_e.encoder", "dall_e.decoder")}
    shims = {}
    for cls, (mod, name) in _SHIM_NAMES.items():
        shim = type(name, (cls,), {"__module__": mod, "__qualname__": name})
        setattr(mods[mod], name, shim)
        shims[cls] = shim
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    originals = {}
    for sub in model.modules():
        if type(sub) in shims:
            originals[sub] = type(sub)
            sub.__class__ = shims[type(sub)]
    try:
        torch.save(model, path, _use_new_zipfile_serialization=zipfile)
    finally:
        for sub, cls in originals.items():
            sub.__class__ = cls
    for name in mods:  # the real loader must not depend on these being importable
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # legacy format, shim classes
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_published_pickle_converts_and_loads(tmp_path, small_dvae, images, monkeypatch, zipfile):
    """Both torch serialization formats, since the published files predate torch 2 (unverified which)."""
    enc_pkl, dec_pkl = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    _save_like_published(small_dvae.encoder, enc_pkl, monkeypatch, zipfile)
    _save_like_published(small_dvae.decoder, dec_pkl, monkeypatch, zipfile)
    assert b"dall_e.encoder" in (_pickle_bytes(enc_pkl) if zipfile else enc_pkl.read_bytes())

    # loading the pickle directly is refused with a pointer to the converter
    with pytest.raises(DalleWeightsError, match=r"encoder\.pkl.*convert_published"):
        DalleDVAE.from_files(enc_pkl, encoder_kwargs=SMALL_ENC)

    enc_pt = convert_published(enc_pkl, tmp_path / "out" / "encoder.pt")
    dec_pt = convert_published(dec_pkl, tmp_path / "out" / "decoder.pt")
    assert enc_pt == tmp_path / "out" / "encoder.pt" and enc_pt.exists()
    assert set(torch.load(enc_pt, weights_only=True)) == set(small_dvae.encoder.state_dict())
    loaded = DalleDVAE.from_files(enc_pt, dec_pt, encoder_kwargs=SMALL_ENC, decoder_kwargs=SMALL_DEC)
    tokens = small_dvae.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), small_dvae.decode(tokens))


def _pickle_bytes(path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_convert_refuses_foreign_globals(tmp_path, capsys):
    path = tmp_path / "evil.pkl"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(DalleWeightsError, match=r"evil\.pkl.*refusing to unpickle global _*builtin_*\.print"):
        convert_published(path, tmp_path / "out.pt")
    assert "must never run" not in capsys.readouterr().out
    assert not (tmp_path / "out.pt").exists()


def test_missing_file_error_names_path(tmp_path):
    missing = tmp_path / "nope" / "encoder.pt"
    with pytest.raises(FileNotFoundError, match=r"nope/encoder\.pt"):
        DalleDVAE.from_files(missing)
    with pytest.raises(FileNotFoundError, match=r"nope/encoder\.pt"):
        convert_published(missing, tmp_path / "out.pt")


def test_garbage_file_error_names_path(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file\x00\x01\x02" * 10)
    with pytest.raises(DalleWeightsError, match=r"garbage\.pt: not a torch"):
        DalleDVAE.from_files(garbage)
    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(DalleWeightsError, match=r"tensor\.pt: expected a state_dict"):
        DalleDVAE.from_files(not_a_dict)


def test_wrong_architecture_lists_keys_and_shapes(tmp_path, small_dvae):
    path = tmp_path / "wrong.pt"
    sd = dict(small_dvae.encoder.state_dict())
    sd.pop("blocks.input.b")
    sd["blocks.extra.w"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(DalleWeightsError) as info:
        DalleDVAE.from_files(path, encoder_kwargs=SMALL_ENC)
    msg = str(info.value)
    assert str(path) in msg and "encoder architecture" in msg
    assert "missing keys (1): blocks.input.b" in msg
    assert "unexpected keys (1): blocks.extra.w" in msg

    # a small-width file loaded into the published-size encoder: shape mismatches, named
    torch.save(small_dvae.encoder.state_dict(), path)
    with pytest.raises(DalleWeightsError, match=r"shape mismatches \(\d+\): blocks\.") as info:
        DalleDVAE.from_files(path)
    assert "blocks.input.w: file (64, 3, 7, 7) vs model (256, 3, 7, 7)" in str(info.value)

    # an encoder file passed as the decoder
    torch.save(small_dvae.encoder.state_dict(), path)
    with pytest.raises(DalleWeightsError, match=r"decoder architecture.*missing keys"):
        DalleDVAE.from_files(path, path, encoder_kwargs=SMALL_ENC, decoder_kwargs=SMALL_DEC)
