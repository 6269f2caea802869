"""The ``sop`` command line, the shared settings, and the local orchestration of the whole loop.

One verb per module in :mod:`sop.commands`; :mod:`sop.settings` holds every setting (``SOP_…``
environment overrides, validated at start); :mod:`sop.stack` brings the local stack up and down.
"""
