"""Ecosystem formats: SOP's tables in and out of the data formats other robot-learning tools read.

``bridges.lerobot``: the LeRobotDataset v3.0 layout (``sop export lerobot`` / ``sop import lerobot``).

A bridge reads and writes the lakehouse (``lakehouse``), the image bytes of the wire contract (``schemas``)
and computes RECAP columns for imported episodes (``rewards``); no stage of the loop imports it.
"""
