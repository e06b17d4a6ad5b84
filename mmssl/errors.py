"""Typed errors of the package; the CLIs turn them into one-line messages."""


class MMSSLError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MMSSLError, ValueError):
    """A configuration key, value or file is wrong; the message names the key."""


class DataError(MMSSLError, ValueError):
    """A data directory or file is unusable; the message names the file and the defect."""


class DivergedError(MMSSLError, RuntimeError):
    """A loss term became NaN or infinite.

    Attributes: ``epoch`` (1-based epoch in which it happened) and ``term``
    (the metric name of the loss term, e.g. ``train/loss_d``).
    """

    def __init__(self, epoch: int, term: str, value: float = float("nan")):
        self.epoch, self.term, self.value = int(epoch), str(term), float(value)
        super().__init__(f"training diverged at epoch {self.epoch}: {self.term} = {self.value}")

    def __reduce__(self):  # picklable across processes (Ray workers)
        return (DivergedError, (self.epoch, self.term, self.value))
