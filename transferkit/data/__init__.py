"""Datasets: ImageFolder trees, CSV manifests and IDX files (`datasets`: reading, scanning, decoding, transforms,
content hashing).

May import `runtime` and `errors`; nothing above.
"""
