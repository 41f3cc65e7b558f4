"""What every job runs on: atomic writes (`atomic`), output folders transferkit owns (`outputs`: the guard every
writer calls), torchrun process groups (`distributed`), device and precision (`device`), and parameter limits
as plain data with their validation (`params`).

The lowest layer: it imports nothing from transferkit but `errors` (and the version).
"""
