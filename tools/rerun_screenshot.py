"""Render an .rrd with Rerun's own viewer, headless, into a PNG: the viewer is spawned without a window
(software Vulkan works: Mesa's lavapipe), the recording opened, the time cursor put on a frame, a screenshot taken.

    python tools/rerun_screenshot.py episode.rrd docs/rerun-episode.png --frame 40
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

from rerun.experimental import ViewerClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rrd")
    parser.add_argument("png")
    parser.add_argument("--frame", type=int, default=None, help="Step to put the time cursor on.")
    parser.add_argument("--settle-s", type=float, default=12.0, help="Wait for the start-up notices to fade.")
    args = parser.parse_args()
    rerun = shutil.which("rerun", path=str(Path(sys.executable).parent)) or "rerun"  # the venv's viewer
    viewer = ViewerClient.spawn(headless=True, port=free_port(), hide_welcome_screen=True, executable_path=rerun)
    try:
        viewer.open(args.rrd)
        time.sleep(2)
        if args.frame is not None:
            viewer.set_time("frame", sequence=args.frame, play_state="paused")
        time.sleep(args.settle_s)
        viewer.save_screenshot(args.png)
    finally:
        viewer.quit()
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
