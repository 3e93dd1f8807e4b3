"""Compiled models as importable modules: this package's path is the model cache.

``mixc.backends.generated.importable`` writes each generated file here under a name keyed by the
plan hash; a process that unpickles a model (``torch.load(..., weights_only=False)``) imports the
same name and finds the file in the same cache (``$MIXC_CACHE_DIR``, ``$XDG_CACHE_HOME/mixc`` or
``~/.cache/mixc``).
"""

from mixc.backends.generated import cache_dir

__path__ = [str(cache_dir())]
