"""Training: the loop, losses, optimizers and schedules, EMA, SAM, distillation, distributed helpers."""
