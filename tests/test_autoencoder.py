import torch

from ldm.autoencoder import downsampling_factor, images_to_latents, latents_to_images


def test_latents_are_the_vae_posterior_scaled_by_scaling_factor(tiny_model):
    vae = tiny_model.vae
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(3)
        latents = images_to_latents(vae, images)
        torch.manual_seed(3)
        expected = vae.encode(images).latent_dist.sample() * 0.18215
    assert latents.shape == (2, 4, 16 // downsampling_factor(vae), 16 // downsampling_factor(vae))
    torch.testing.assert_close(latents, expected)


def test_decoding_undoes_the_scaling(tiny_model):
    vae = tiny_model.vae
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(latents_to_images(vae, latents), vae.decode(latents / 0.18215).sample)


def test_downsampling_factor_counts_the_vae_stages(tiny_model):
    assert downsampling_factor(tiny_model.vae) == 2  # two blocks: one downsampling stage
