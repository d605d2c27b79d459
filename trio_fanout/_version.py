"""The version, in one place: the package metadata, ``trio_fanout.__version__`` and
``trio-fanout --version`` all read it from here."""

__version__ = "0.1.0"
