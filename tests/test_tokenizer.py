import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ctfgen
from ctfgen.artifacts import ArtifactError
from ctfgen.data.codes import CodeDataset
from ctfgen.data.datasets import build_dataset
from ctfgen.data.transforms import ImageTransform, uint8_to_float
from ctfgen.tokenizer.extract import extract_codes
from ctfgen.tokenizer.llamagen import NON_WEIGHT_KEYS, convert_state_dict, import_llamagen_vq
from ctfgen.tokenizer.losses import PatchDiscriminator, PerceptualLoss
from ctfgen.tokenizer.model import VQConfig, VQTokenizer
from ctfgen.tokenizer.presets import preset_config
from ctfgen.tokenizer.quantizer import VectorQuantizer
from ctfgen.tokenizer.train import TokenizerTrainConfig, TokenizerTrainer, evaluate_tokenizer, psnr

TINY = dict(image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
            z_channels=8, codebook_size=64, codebook_dim=4, norm_groups=4, attention=True)


def tiny(**kw) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(**{**TINY, **kw}))


def test_quantizer_normalises_and_picks_nearest():
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    assert torch.allclose(vq.codebook.norm(dim=1), torch.ones(16))
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    brute = torch.cdist(flat, vq.codebook).argmin(1)
    assert torch.equal(out.codes.flatten(), brute)
    assert torch.equal(vq.lookup(z.detach()), out.codes)
    # straight-through: the quantised output's gradient reaches the encoder output
    out.quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.allclose(out.commitment_loss, 0.25 * out.codebook_loss)


def test_quantizer_reseeds_dead_codes():
    vq = VectorQuantizer(8, 4)
    before = vq.codebook.clone()
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 5]] = True
    cands = F.normalize(torch.randn(3, 4), dim=1)
    assert vq.reseed(dead, cands, torch.Generator().manual_seed(0)) == 2
    after = vq.codebook
    assert torch.equal(after[~dead], before[~dead])
    assert all(torch.cdist(after[i:i + 1], cands).min() < 0.05 for i in (1, 5))


def test_encode_decode_shapes_dtypes_range():
    model = tiny().eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    y = model.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1
    rec, out = model(x)
    assert torch.allclose(rec.clamp(-1, 1), y, atol=1e-5) and torch.equal(out.codes, codes)


def test_bad_inputs_to_encode_decode():
    model = tiny().eval()
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="codes must lie in"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer codes"):
        model.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="norm groups"):
        VQConfig(**{**TINY, "norm_groups": 3}).validate()


def test_save_load_round_trip_and_fingerprint(tmp_path):
    model = tiny().eval()
    fp = ctfgen.save_tokenizer(model, tmp_path / "tok")
    loaded = ctfgen.load_tokenizer(tmp_path / "tok")
    assert loaded.fingerprint == fp and loaded.config == model.config and not loaded.training
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.allclose(loaded.codebook, model.codebook)
    assert ctfgen.save_tokenizer(tiny(codebook_size=32), tmp_path / "other") != fp
    with pytest.raises(ArtifactError, match="not a folder"):
        ctfgen.load_tokenizer(tmp_path / "missing")


def test_small_preset_layout():
    cfg = preset_config("small")
    assert (cfg.grid_size, cfg.codebook_size, cfg.codebook_dim, cfg.downsample) == (8, 4096, 8, 4)
    assert preset_config("vq-16").grid_size == 16
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        preset_config("vq-99")


def test_psnr_and_losses():
    x = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 10 * np.log10(4 / 0.04)), atol=1e-4)
    d = PatchDiscriminator(1, channels=8, n_layers=2)
    assert d(torch.randn(2, 1, 32, 32)).shape[1] == 1


def test_perceptual_loss_from_local_file(tmp_path):
    from safetensors.torch import save_file

    # random weights in torchvision's VGG16 key layout
    layout, sd, c = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512], {}, 3
    i = 0
    for v in layout:
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3) * 0.05
        sd[f"features.{i}.bias"] = torch.zeros(v)
        c, i = v, i + 2
    save_file(sd, tmp_path / "vgg.safetensors")
    loss = PerceptualLoss(tmp_path / "vgg.safetensors")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0 and loss(x, -x).item() > 0
    save_file({"other": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="VGG16"):
        PerceptualLoss(tmp_path / "bad.safetensors")


def synthetic_npz(path, n=64, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = np.zeros((n, size, size), np.uint8)
    labels = rng.integers(0, 3, n)
    for i, c in enumerate(labels):  # class-dependent stripes, so there is structure to learn
        images[i, :, c::3] = 200
    np.savez(path, images=images, labels=labels)
    return path


def train_cfg(tmp_path, **kw):
    args = dict(out=str(tmp_path / "tok"), data=str(synthetic_npz(tmp_path / "d.npz", n=160)), preset="small", image_size=16,
                codebook_size=64, batch_size=8, steps=6, save_every=3, log_every=2, image_every=3, reseed_every=2,
                report_limit=16)
    return TokenizerTrainConfig(**{**args, **kw})


def test_training_improves_and_writes_artifacts(tmp_path):
    cfg = train_cfg(tmp_path, steps=30, lr=3e-3)
    trainer = TokenizerTrainer(cfg)
    x = torch.stack([trainer.test_set[i][0] for i in range(16)])
    before = psnr(trainer.model.eval().decode(trainer.model.encode(x)), x).mean()
    report = trainer.fit(progress=False)
    assert report["psnr_db"] > before + 3
    out = tmp_path / "tok"
    for name in ("config.json", "model.safetensors", "checkpoint.pt", "report.json", "reconstructions.png"):
        assert (out / name).is_file(), name
    assert list((out / "logs").iterdir())
    assert 0 < report["codebook_usage_pct"] <= 100 and report["perplexity"] >= 1
    assert ctfgen.load_tokenizer(out).fingerprint == report["fingerprint"]


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = TokenizerTrainer(train_cfg(tmp_path / "a"))
    straight.fit(progress=False)
    first = TokenizerTrainer(train_cfg(tmp_path / "b", steps=3))
    first.fit(progress=False)
    second = TokenizerTrainer(train_cfg(tmp_path / "b"))
    second.fit(resume=True, progress=False)
    for (k, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_evaluate_counts_usage():
    model = tiny().eval()
    data = [(torch.rand(1, 16, 16) * 2 - 1, 0) for _ in range(4)]
    report = evaluate_tokenizer(model, data, batch_size=2)
    codes = model.encode(torch.stack([d[0] for d in data]))
    assert report["codebook_usage_pct"] == pytest.approx(100 * len(codes.unique()) / 64)
    assert report["images"] == 4


def test_extract_codes_stores_views_and_training_draws_one(tmp_path):
    model = tiny().eval()
    model.fingerprint = "abc"
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(5) % 2)
    np.savez(tmp_path / "set_train.npz", images=images, labels=np.arange(5) % 2)
    data = build_dataset(str(tmp_path / "set.npz"), "train", 16, 1, views="flip")
    meta = extract_codes(model, data, tmp_path / "codes", views="flip", batch_size=2, progress=False)
    ds = CodeDataset(tmp_path / "codes")
    assert meta["count"] == 10 and meta["items"] == 5 and meta["views"] == ["original", "hflip"]
    assert len(ds) == 5 and ds.views == 2 and ds.grid == (8, 8) and ds.fingerprint == "abc"
    assert ds.codes.dtype == np.int16 and ds.num_classes == 2
    x = uint8_to_float(images)
    assert np.array_equal(ds.codes[1], model.encode(x[1:2]).numpy()[0])  # view 0 of item 1
    assert np.array_equal(ds.codes[5 + 1], model.encode(x[1:2].flip(-1)).numpy()[0])  # view 1 of item 1
    codes, label = ds[1]
    assert torch.equal(codes, torch.from_numpy(ds.codes[1].astype(np.int64)).flatten()) and label == 1
    batch_codes, batch_labels = ds.batch(torch.tensor([3, 0]))
    assert batch_codes.shape == (2, 64) and batch_labels.tolist() == [0, 1]  # no generator: view 0
    drawn = {tuple(ds.batch(torch.tensor([2]), torch.Generator().manual_seed(s))[0][0, :4].tolist()) for s in range(20)}
    assert drawn == {tuple(ds.codes[2].reshape(-1)[:4].tolist()), tuple(ds.codes[7].reshape(-1)[:4].tolist())}
    with pytest.raises(ValueError, match="empty"):
        extract_codes(model, [], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="same views"):
        extract_codes(model, data, tmp_path / "y", views="ten-crop", progress=False)


def test_ten_crop_views():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8))
    views = ImageTransform(16, 1, views="ten-crop")(img)
    base = ImageTransform(18, 1)(img)  # the 1.1x centre crop: round(1.1 * 16) = 18
    assert views.shape == (10, 1, 16, 16)
    assert torch.equal(views[0], base[:, 1:17, 1:17]) and torch.equal(views[1], base[:, :16, :16])
    assert torch.equal(views[4], base[:, 2:, 2:]) and torch.equal(views[5], views[0].flip(-1))
    assert ImageTransform(16, 1, views="flip")(img).shape == (2, 1, 16, 16)


# --- LlamaGen import: a random state dict in LlamaGen's exact key layout --------------------------

def llamagen_state_dict(cfg: VQConfig) -> dict[str, torch.Tensor]:
    """Keys and shapes of LlamaGen's VQModel for `cfg`, filled with random numbers."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, c_in, c_out, k):
        sd[f"{name}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5
        sd[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.1

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def res(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for m in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{m}", c, c, 1)

    ch, mult, nres = cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            res(f"encoder.conv_blocks.{i}.res.{j}", c_in, ch * m)
            c_in = ch * m
            if i == len(mult) - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c_in)
        if i != len(mult) - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c_in, c_in, 3)
    for side in ("encoder", "decoder"):
        c = ch * mult[-1]
        res(f"{side}.mid.0", c, c), attn(f"{side}.mid.1", c), res(f"{side}.mid.2", c, c)
    norm("encoder.norm_out", c_in), conv("encoder.conv_out", c_in, cfg.z_channels, 3)
    conv("decoder.conv_in", cfg.z_channels, ch * mult[-1], 3)
    c_in = ch * mult[-1]
    for n, i_level in enumerate(reversed(range(len(mult)))):
        for j in range(nres + 1):
            res(f"decoder.conv_blocks.{n}.res.{j}", c_in, ch * mult[i_level])
            c_in = ch * mult[i_level]
            if i_level == len(mult) - 1:
                attn(f"decoder.conv_blocks.{n}.attn.{j}", c_in)
        if i_level != 0:
            conv(f"decoder.conv_blocks.{n}.upsample.conv", c_in, c_in, 3)
    norm("decoder.norm_out", c_in), conv("decoder.conv_out", c_in, cfg.in_channels, 3)
    conv("quant_conv", cfg.z_channels, cfg.codebook_dim, 1)
    conv("post_quant_conv", cfg.codebook_dim, cfg.z_channels, 1)
    sd["quantize.embedding.weight"] = torch.randn(cfg.codebook_size, cfg.codebook_dim, generator=g)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


def reference_forward(sd, cfg: VQConfig, x):
    """LlamaGen's VQ math written out directly on its state dict: encode -> codes -> decode."""
    groups, ch_mult = cfg.norm_groups, cfg.channel_mult

    def conv(h, name, stride=1, pad=None):
        w = sd[f"{name}.weight"]
        return F.conv2d(h, w, sd[f"{name}.bias"], stride, w.shape[-1] // 2 if pad is None else pad)

    def gn(h, name):
        return F.group_norm(h, groups, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def res(h, name):
        y = conv(F.silu(gn(conv(F.silu(gn(h, f"{name}.norm1")), f"{name}.conv1"), f"{name}.norm2")), f"{name}.conv2")
        return (conv(h, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in sd else h) + y

    def attn(h, name):
        b, c, hh, ww = h.shape
        y = gn(h, f"{name}.norm")
        q, k, v = (conv(y, f"{name}.{m}").reshape(b, c, -1) for m in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
        return h + conv(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww), f"{name}.proj_out")

    h = conv(x, "encoder.conv_in")
    for i in range(len(ch_mult)):
        for j in range(cfg.num_res_blocks):
            h = res(h, f"encoder.conv_blocks.{i}.res.{j}")
            if f"encoder.conv_blocks.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"encoder.conv_blocks.{i}.attn.{j}")
        if i != len(ch_mult) - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), f"encoder.conv_blocks.{i}.downsample.conv", stride=2, pad=0)
    h = res(attn(res(h, "encoder.mid.0"), "encoder.mid.1"), "encoder.mid.2")
    h = conv(conv(F.silu(gn(h, "encoder.norm_out")), "encoder.conv_out"), "quant_conv")
    z = F.normalize(h.permute(0, 2, 3, 1), dim=-1)
    emb = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    d = (z ** 2).sum(-1, keepdim=True) + (emb ** 2).sum(-1) - 2 * z @ emb.T
    codes = d.argmin(-1)
    h = conv(conv(emb[codes].permute(0, 3, 1, 2), "post_quant_conv"), "decoder.conv_in")
    h = res(attn(res(h, "decoder.mid.0"), "decoder.mid.1"), "decoder.mid.2")
    for n in range(len(ch_mult)):
        for j in range(cfg.num_res_blocks + 1):
            h = res(h, f"decoder.conv_blocks.{n}.res.{j}")
            if f"decoder.conv_blocks.{n}.attn.{j}.q.weight" in sd:
                h = attn(h, f"decoder.conv_blocks.{n}.attn.{j}")
        if n != len(ch_mult) - 1:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.conv_blocks.{n}.upsample.conv")
    return codes, conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out")


def test_llamagen_vq16_key_layout_maps_completely():
    cfg = preset_config("vq-16")
    with torch.device("meta"):
        model = VQTokenizer(cfg)
        sd = llamagen_state_dict(cfg)
    converted = convert_state_dict({k: v for k, v in sd.items()}, model)
    assert set(converted) == set(model.state_dict())
    assert len(converted) == len(sd) - len(NON_WEIGHT_KEYS)
    with pytest.raises(ValueError, match="unmapped LlamaGen keys"):
        convert_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="left without a value"):
        convert_state_dict({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, model)


def test_llamagen_import_gives_the_same_numbers():
    cfg = VQConfig(image_size=16, in_channels=3, base_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                   z_channels=16, codebook_size=128, codebook_dim=8, norm_groups=32, attention=True)
    sd = llamagen_state_dict(cfg)
    # wrapped as LlamaGen saves it, with a DDP prefix
    model = import_llamagen_vq({"model": {f"module.{k}": v for k, v in sd.items()}, "steps": 3}, image_size=16)
    assert model.config == cfg
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref_codes, ref_images = reference_forward(sd, cfg, x)
    assert torch.equal(model.encode(x), ref_codes)
    assert torch.allclose(model.decode(ref_codes), ref_images.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="not a LlamaGen VQ checkpoint"):
        import_llamagen_vq({"model": {"foo": torch.zeros(1)}})


def test_llamagen_import_cli(tmp_path):
    from ctfgen.cli import main

    cfg = VQConfig(image_size=16, in_channels=3, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                   z_channels=16, codebook_size=64, codebook_dim=8, norm_groups=32, attention=True)
    torch.save({"model": llamagen_state_dict(cfg)}, tmp_path / "vq.pt")
    main(["import-llamagen", "--vq", str(tmp_path / "vq.pt"), "--image-size", "16", "--out", str(tmp_path / "tok")])
    assert ctfgen.load_tokenizer(tmp_path / "tok").config == cfg
