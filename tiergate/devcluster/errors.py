"""Errors of the development control plane, one type per boundary."""


class DevClusterError(Exception):
    """Base of everything the test bed raises."""


class BuildError(DevClusterError):
    """A binary could not be built; the message carries the tail of the build log."""


class StartError(DevClusterError):
    """A component died or never became ready; the message carries its log tail."""
