"""Fine-tuning: the training loop (`loop`) and its config (`config`), what a run trains on (`loaders`: hold-out,
transforms, loaders), the optimizer and the LR schedule in cycles (`schedule`), resumable checkpoints
(`checkpoint`), the run directory (`rundir`), resuming or extending a run from its directory alone (`resume`), the
best model's validation report (`evaluation`), the frozen-prefix activation cache (`prefix_cache`), the LR range
test (`lr_finder`), and the options for small data: an average of the weights (`averaging`), mixup/cutmix (`mixing`)
and a head started from a fitted linear probe (`head_init`, LP-FT).

May import `runtime`, `data`, `models`, `codes` (device and precision), `probe` (metrics) and `errors`.
"""
