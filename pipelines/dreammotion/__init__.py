"""DreamMotion (Jeong et al., ECCV 2024): zero-shot video editing by self-similar score distillation."""
