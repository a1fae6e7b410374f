import pytest
import torch

from latentct.models.dcgan import Discriminator, Generator
from latentct.models.vae import VAE, Decoder, Encoder, kl_divergence


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_generator_interface(size):
    z = torch.randn(3, 16)
    g = Generator(latent_dim=16, image_size=size, ngf=8)
    x = g(z)
    assert g.latent_dim == 16 and x.shape == (3, 1, size, size) and x.abs().max() <= 1
    assert Discriminator(image_size=size, ndf=8, spectral=True, minibatch_std=True)(x).shape == (3,)
    vae = VAE(latent_dim=16, image_size=size, ch=8)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (3, 16)
    assert vae.decoder.latent_dim == 16 and vae.decoder(z).shape == x.shape
    with pytest.raises(ValueError, match="power of two"):
        Generator(image_size=48)


def test_paper_dcgan_has_the_studys_layer_shapes():
    z, ngf, ndf = 32, 128, 128
    conv_t = [(z, 16 * ngf), (16 * ngf, 8 * ngf), (8 * ngf, 4 * ngf), (4 * ngf, 2 * ngf), (2 * ngf, ngf), (ngf, 1)]
    bn_g = [16 * ngf, 8 * ngf, 4 * ngf, 2 * ngf, ngf]
    assert n_params(Generator(z, 128, ngf)) == sum(i * o * 16 for i, o in conv_t) + 2 * sum(bn_g)
    conv = [(1, ndf), (ndf, 2 * ndf), (2 * ndf, 4 * ndf), (4 * ndf, 8 * ndf), (8 * ndf, 16 * ndf), (16 * ndf, 1)]
    bn_d = [2 * ndf, 4 * ndf, 8 * ndf, 16 * ndf]
    assert n_params(Discriminator(128, ndf)) == sum(i * o * 16 for i, o in conv) + 2 * sum(bn_d)


def _res_block(i, o):  # conv1 + bn1 + conv2 + bn2 + skip conv, with biases
    h = o // 2
    return (i * h * 9 + h) + 2 * h + (h * o * 9 + o) + 2 * o + (i * o * 9 + o)


def test_paper_vae_has_the_studys_layer_shapes():
    ch, z = 64, 32
    dec = [z, 16 * ch, 8 * ch, 8 * ch, 4 * ch, 2 * ch, ch, ch // 2]
    expected = sum(_res_block(i, o) for i, o in zip(dec, dec[1:])) + (ch // 2 * 9 + 1)
    assert n_params(Decoder(z, 128, ch)) == expected
    enc = [1, ch, 2 * ch, 4 * ch, 8 * ch, 8 * ch]
    expected = sum(_res_block(i, o) for i, o in zip(enc, enc[1:])) + 2 * (8 * ch * z * 16 + z)
    assert n_params(Encoder(z, 128, ch)) == expected


def test_losses_fall_on_a_fixed_tiny_batch():
    torch.manual_seed(0)
    x = torch.full((8, 1, 32, 32), -1.0)   # air, each with a body of its own size (noise could not be learnt)
    for k in range(8):
        x[k, :, 16 - 2 - k:16 + 2 + k, 16 - 3 - k:16 + 3 + k] = 0.3
    vae = VAE(latent_dim=8, image_size=32, ch=8)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        recon, mu, logvar = vae(x)
        loss = torch.nn.functional.mse_loss(recon, x) + 0.01 * kl_divergence(mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    d = Discriminator(32, 8)
    fake = Generator(8, 32, 8)(torch.randn(8, 8)).detach()
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    d_losses = []
    for _ in range(30):
        loss = bce(d(x), torch.ones(8)) + bce(d(fake), torch.zeros(8))
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_losses.append(loss.item())
    assert d_losses[-1] < 0.5 * d_losses[0]


def test_every_vae_starts_in_the_middle_of_tanh_and_learns_to_use_z():
    """The decoder's output layer starts at zero, so no seed's first images sit in tanh's flat tails (where phantom
    seed 835 collapsed to one image); a few steps on two different images then reconstruct both far better than
    any one image can (the collapse's level: 0.14 here)."""
    x = torch.full((2, 1, 32, 32), -1.0)
    x[1, :, 8:24, 8:24] = 0.5                                            # air, and a body
    one_image = torch.nn.functional.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    for seed in (0, 835):
        torch.manual_seed(seed)
        vae = VAE(latent_dim=8, image_size=32, ch=8)
        assert torch.equal(vae.decoder(torch.randn(4, 8)), torch.zeros(4, 1, 32, 32))
        opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
        for _ in range(60):
            recon, mu, logvar = vae(x)
            mse = torch.nn.functional.mse_loss(recon, x)
            opt.zero_grad()
            (mse + 0.01 * kl_divergence(mu, logvar)).backward()
            opt.step()
        assert one_image == pytest.approx(0.1406, abs=1e-3) and mse.item() < one_image / 3


def test_a_narrow_resnet_reconstructor_trains_channels_last_with_the_gradients_of_the_reference():
    """A ResNet reconstructor of width 4 has strided shortcuts with 4-16 input channels, the case where oneDNN's
    strided 1x1 backward on channels_last input corrupts memory (a crash or wrong gradients on AVX2). Its
    shortcut must equal a 1x1 convolution of stride 2, and its channels_last float gradients the float64
    reference's, step after step."""
    import torch.nn.functional as F

    from latentct.models.reconstructor import BasicBlock, make_reconstructor

    block = BasicBlock(4, 8, stride=2).double().eval()
    conv, bn = block.down
    for size in ((9, 9), (8, 8), (7, 10)):            # ResNet's block: the shortcut a 1x1 convolution of stride 2
        x = torch.randn(3, 4, *size, dtype=torch.float64)
        inner = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), torch.relu(inner + bn(F.conv2d(x, conv.weight, stride=2))))
    torch.manual_seed(0)
    fast = make_reconstructor("resnet", 6, 4, channels=3).to(memory_format=torch.channels_last)
    reference = make_reconstructor("resnet", 6, 4, channels=3).double()
    reference.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        a, b = (torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2))
        grads = []
        for model, cast in ((fast, lambda t: t.contiguous(memory_format=torch.channels_last)),
                            (reference, torch.Tensor.double)):
            model.zero_grad()
            logits, shift = model(cast(a), cast(b))
            (logits.pow(2).mean() + shift.pow(2).mean()).backward()
            grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
        error = float((grads[0] - grads[1]).norm() / grads[1].norm())
        assert error < 1e-4, error                                   # float against float64: about 1e-6
