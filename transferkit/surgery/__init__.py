"""Network surgery: FC layers as convolutions (`fc_to_conv`), dense prediction on images of any size (`dense`),
at chosen scales (`multiscale`) with its files (`dense_files`) and limits (`params`), receptive fields
(`receptive_field`), ONNX export (`export`) and the per-layer summary (`summary`).

May import the layers below it (`runtime`, `data`, `models`, `codes`, `probe`, `finetune`) and `errors`.
"""
