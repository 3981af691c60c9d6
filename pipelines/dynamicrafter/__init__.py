"""DynamiCrafter (Xing et al., ECCV 2024): animate a still image with a text-to-video diffusion prior."""
