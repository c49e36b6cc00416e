"""PatchCore: nearest-neighbour distance to a coreset of normal patches, one bank per class."""
from trainer.models import Method
from trainer.models.patchcore.coreset import greedy_coreset
from trainer.models.patchcore.model import PatchCore, PatchCoreConfig, fit

METHOD = Method(name="patchcore", config=PatchCoreConfig, model=PatchCore, fit=fit)

__all__ = ["METHOD", "PatchCore", "PatchCoreConfig", "greedy_coreset"]
