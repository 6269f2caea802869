"""Unit tests of every package. This conftest puts ``tests/unit`` on ``sys.path``, so the fake robots,
policies and operators of ``producer_fakes`` serve the tests of both ``producers`` and ``sim``."""
