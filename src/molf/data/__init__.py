"""molf.data: benchmark loaders (sql, med, fact), shared tokenization and the SFT collator.

Exports load lazily: ``import molf.data.config`` (done by every config parse) stays cheap.
"""

from molf._lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "molf.data.config",
    "SFTCollator": "molf.data.encoding",
    "encode_example": "molf.data.encoding",
    "encode_prompt": "molf.data.encoding",
    "build_train_dataset": "molf.data.builder",
    "load_examples": "molf.data.builder",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
