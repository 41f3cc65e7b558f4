"""Fine-tuning: the training loop and its config (`loop`), resumable checkpoints (`checkpoint`), the frozen-prefix
activation cache (`prefix_cache`) and the LR range test (`lr_finder`).

May import `runtime`, `data`, `models`, `codes` (device and precision), `probe` (metrics) and `errors`.
"""
