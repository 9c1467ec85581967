"""deepfm: paper-faithful DeepFM (Guo et al., IJCAI 2017) for CTR prediction, from raw logs to a served model."""

from deepfm.errors import BundleError, DataError, DeepFMError, SchemaError

__version__ = "0.1.0"

__all__ = ["DeepFMError", "DataError", "SchemaError", "BundleError", "__version__"]


def __getattr__(name: str):  # lazy: `import deepfm` stays cheap for the CLI's --help
    if name == "DeepFMClassifier":
        from deepfm.estimator import DeepFMClassifier

        return DeepFMClassifier
    raise AttributeError(name)
