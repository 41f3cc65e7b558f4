"""Linear probes on codes: LinearProbe with C by cross-validation, evaluation and the layer sweep (`linear`).

May import `runtime`, `data` and `errors`: a probe works on any array of codes.
"""
