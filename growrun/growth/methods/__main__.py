"""python -m growrun.growth.methods: the registry's presets (configs/growth/ files), comma-separated,
as `make methods` sweeps them (growth=...)."""
from growrun.growth.methods import presets

print(",".join(presets()))
