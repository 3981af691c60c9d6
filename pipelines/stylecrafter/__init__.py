"""StyleCrafter (Liu et al., SIGGRAPH Asia 2024): text-to-video in the style of reference images."""
