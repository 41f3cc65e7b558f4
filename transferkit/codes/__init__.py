"""CNN codes: the scikit-learn FeatureExtractor (`extractor`), pooling (`pooling`), the ONNX Runtime engine
(`ort_engine`), what makes two sets of codes interchangeable (`spec`: CodeSpec, from which every cache and
engine key derives), feature folders on disk (`store`), the content-addressed code cache (`cache`) and the
`extract` job.

May import `runtime`, `data`, `models` and `errors`.
"""
