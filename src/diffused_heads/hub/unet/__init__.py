"""The denoising UNet (linked from the repository's `unet/` folder)."""
