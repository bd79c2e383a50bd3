"""TrimVLM online half: serving code with no torch on its default path."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trimvlm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
