"""The test suite, a package so that its helpers are imported by their full name.

pytest (rootdir-based ``prepend`` import mode) puts the directory above the
first folder without an ``__init__.py`` on ``sys.path``, that is the
repository root, so ``tests.helpers`` and ``tests.cross.drivers`` import
with no path set-up; subprocess workers are started as ``python -m
tests.<package>.<module>`` from the root for the same reason.
"""
