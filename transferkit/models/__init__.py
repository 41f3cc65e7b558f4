"""Backbones and what is done to them: timm models with their weights (`backbones`, `weights`), the one vocabulary
of layers and their feature maps (`layers`), stages and heads for fine-tuning (`stages`), BatchNorm folding
(`fold_bn`), locally connected layers (`locally_connected`).

May import `runtime`, `data` and `errors`.
"""
