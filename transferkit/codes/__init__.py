"""CNN codes: the scikit-learn FeatureExtractor (`extractor`), pooling (`pooling`), how a run executes the
network (`engine`: engine and precision by run size, folding, bf16), the ONNX Runtime engine files
(`ort_engine`), what makes two sets of codes interchangeable (`spec`: CodeSpec, from which every cache and
engine key derives), feature folders on disk (`store`), the content-addressed code cache (`cache`) and the
`extract` job.

May import `runtime`, `data`, `models` and `errors`.
"""
