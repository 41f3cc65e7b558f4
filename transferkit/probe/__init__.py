"""Linear probes on codes: LinearProbe with C by cross-validation (`linear`), its calibrated probabilities
(`calibration`), its file format (`fileformat`), evaluation (`metrics`), the layer sweep (`sweep`) and a probe
folder with its extractor (`saved`).

May import `runtime`, `data`, `models`, `codes` and `errors`: a probe works on any array of codes.
"""
