"""LeRobotDataset v3.0 in and out of SOP's tables (``sop export lerobot``, ``sop import lerobot``).

    from bridges.lerobot import export_lerobot, import_lerobot

    export_lerobot(lake, Path("datasets/sop-demos"), table="demonstrations", where="outcome = 'SUCCESS'")
    import_lerobot(lake, Path("datasets/their-demos"), task_map={"open the drawer": "drawer-open-v3"})

The layout and the column mapping: :mod:`bridges.lerobot.layout`; statistics: :mod:`bridges.lerobot.stats`;
MP4 through PyAV: :mod:`bridges.lerobot.video`.
"""

from bridges.lerobot.export import ExportError, ExportOptions, ExportReport, export_lerobot, plan_export
from bridges.lerobot.importer import IMPORT_APP_PREFIX, ImportReport, import_lerobot
from bridges.lerobot.layout import LayoutError
from bridges.lerobot.video import CODECS, VideoCodec, VideoError

__all__ = ["CODECS", "IMPORT_APP_PREFIX", "ExportError", "ExportOptions", "ExportReport", "ImportReport", "LayoutError",
           "VideoCodec", "VideoError", "import_lerobot",
           "export_lerobot", "plan_export"]
