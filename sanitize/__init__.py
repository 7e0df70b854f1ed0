"""sanitize: find and drop targeted clean-label poisons in image-classification training data."""

__version__ = "0.1.0"

from sanitize.config import ScanConfig, TrainConfig  # noqa: E402
from sanitize.errors import DataError, SanitizeError  # noqa: E402
from sanitize.scan import ScanResult, scan  # noqa: E402

__all__ = ["DataError", "SanitizeError", "ScanConfig", "ScanResult", "TrainConfig", "scan", "__version__"]
