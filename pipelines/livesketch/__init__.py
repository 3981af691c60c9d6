"""LiveSketch: animate a vector sketch by score distillation from a text-to-video model."""
