"""Episodes as Rerun recordings: one recording per episode (recording id = episode id), logged column-wise.

    rec = rr.RecordingStream("sop", recording_id=episode.episode_id)
    log_episode(rec, episode)            # to whatever sink rec has (a viewer, a file, a gRPC server)
    write_rrd(episodes, "out.rrd")       # several episodes: one .rrd holding one recording each

Two timelines: ``frame`` (the step index) and ``time`` (when the step was executed, or when a frame was
exposed for camera images that carry a capture time). What is logged, by entity path:

``cameras/<name>``             every camera image as stored (JPEG/PNG bytes, not re-encoded)
``state/proprio``              the robot state, one series per dimension
``action/<i>/executed``        the action the robot executed (the human's while in control) …
``action/<i>/proposed``        … against the policy's proposal of the same step, one plot per dimension
``control/human``              1 while the human drove the step (the steps' controller column)
``control/takeover``           1 inside a takeover span from the ``interventions`` events (online episodes)
``rewards/reward``             RECAP reward per step
``rewards/return``             ``mc_return``, ``value`` (V(o_t), when a value model scored it), ``advantage``
``events``                     takeovers and hand-backs (operator, reason), policy version, the outcome

Recording properties (``episode``): task, instruction, actor, outcome, policy versions, the source table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import rerun as rr
import rerun.blueprint as rrb

from views.episodes import Episode

APPLICATION_ID = "sop"
MEDIA_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}
EXECUTED, PROPOSED = (46, 160, 255), (255, 160, 40)


def _times(frames: np.ndarray, time_us: np.ndarray) -> list[rr.TimeColumn]:
    return [rr.TimeColumn("frame", sequence=frames.astype(np.int64)),
            rr.TimeColumn("time", timestamp=time_us.astype("datetime64[us]"))]


def _series(rec: rr.RecordingStream, path: str, frames: np.ndarray, time_us: np.ndarray, values: np.ndarray) -> None:
    """One scalar series (n,) or a bundle of series (n, d) at ``path``; NaN rows are left out."""
    keep = ~np.isnan(values) if values.ndim == 1 else ~np.isnan(values).all(axis=1)
    if not keep.any():
        return
    rec.send_columns(path, indexes=_times(frames[keep], time_us[keep]),
                     columns=rr.Scalars.columns(scalars=values[keep]))


def blueprint(episode: Episode) -> rrb.Blueprint:
    """Cameras and the event log on the left, executed vs proposed action per dimension in the middle,
    control, rewards and state on the right; the ``frame`` timeline plays at the episode's own step rate."""
    span_s = (episode.time_us[-1] - episode.time_us[0]) / 1e6
    control_hz = round((episode.num_steps - 1) / span_s, 1) if episode.num_steps > 1 and span_s > 0 else 30.0
    action_dim = episode.vectors("action").shape[1]
    left = [rrb.Spatial2DView(origin=f"cameras/{c}", name=c) for c in episode.cameras]
    left.append(rrb.TextLogView(origin="events", name="events"))
    actions = [rrb.TimeSeriesView(origin=f"action/{i}", name=f"action[{i}]: executed vs proposed")
               for i in range(action_dim)]
    right = [rrb.TimeSeriesView(origin="control", name="control: human / takeover"),
             rrb.TimeSeriesView(origin="rewards/reward", name="reward"),
             rrb.TimeSeriesView(origin="rewards/return", name="return · value · advantage"),
             rrb.TimeSeriesView(origin="state", name="state")]
    return rrb.Blueprint(
        rrb.Horizontal(rrb.Vertical(*left), rrb.Grid(*actions), rrb.Vertical(*right), column_shares=[2, 3, 2]),
        rrb.BlueprintPanel(state="collapsed"), rrb.SelectionPanel(state="collapsed"),
        rrb.TimePanel(state="collapsed", timeline="frame", fps=control_hz),
    )


def log_episode(rec: rr.RecordingStream, episode: Episode, *, with_blueprint: bool = True) -> None:
    """Log everything of ``episode`` to ``rec`` (see the module doc for the entity paths)."""
    frames, time_us = episode.step_index, episode.time_us
    rec.send_recording_name(f"{episode.task} · {episode.episode_id}")
    versions = episode.policy_versions()
    rec.send_property("episode", rr.AnyValues(
        episode_id=episode.episode_id, task=episode.task, instruction=episode.instruction, actor_id=episode.actor_id,
        outcome=episode.outcome, num_steps=episode.num_steps, table=episode.table,
        policy_versions=", ".join(v for _, v in versions)))

    for camera in episode.cameras:
        at, blobs, media, when = [], [], [], []
        for i, step in enumerate(episode.steps):
            for image in step["images"] or ():
                if image["camera"] == camera:
                    at.append(frames[i])
                    when.append(image.get("capture_time_us") or time_us[i])
                    blobs.append(image["data"])
                    media.append(MEDIA_TYPES.get(str(image["encoding"]).lower(), "image/jpeg"))
        rec.send_columns(f"cameras/{camera}", indexes=_times(np.array(at), np.array(when)),
                         columns=rr.EncodedImage.columns(blob=blobs, media_type=media))

    proprio = episode.vectors("proprio")
    rec.log("state/proprio", rr.SeriesLines(names=[f"proprio[{i}]" for i in range(proprio.shape[1])]), static=True)
    _series(rec, "state/proprio", frames, time_us, proprio)
    executed, proposed = episode.vectors("action"), episode.vectors("policy_action")
    for i in range(executed.shape[1]):
        rec.log(f"action/{i}/executed", rr.SeriesLines(names=f"executed[{i}]", colors=[EXECUTED], widths=2.0), static=True)
        _series(rec, f"action/{i}/executed", frames, time_us, executed[:, i])
        if i < proposed.shape[1]:
            rec.log(f"action/{i}/proposed", rr.SeriesLines(names=f"proposed[{i}]", colors=[PROPOSED], widths=1.0),
                    static=True)
            _series(rec, f"action/{i}/proposed", frames, time_us, proposed[:, i])

    human = episode.human.astype(np.float64)
    rec.log("control/human", rr.SeriesLines(names="human in control", colors=[(220, 60, 60)], widths=2.0), static=True)
    _series(rec, "control/human", frames, time_us, human)
    takeovers = episode.takeovers()
    if episode.table == "steps":
        inside = np.zeros(episode.num_steps)
        for span in takeovers:
            inside[(frames >= span.start_step) & (frames < span.end_step)] = 1.0
        rec.log("control/takeover", rr.SeriesLines(names="takeover span (interventions)", colors=[(150, 90, 220)]),
                static=True)
        _series(rec, "control/takeover", frames, time_us, inside)

    rec.log("rewards/reward", rr.SeriesLines(names="reward", colors=[(90, 200, 120)]), static=True)
    _series(rec, "rewards/reward", frames, time_us, episode.scalars("reward"))
    for name, column, colour in (("return", "mc_return", (90, 200, 120)), ("value", "value", (240, 200, 60)),
                                 ("advantage", "advantage", (230, 90, 160))):
        rec.log(f"rewards/return/{name}", rr.SeriesLines(names=column, colors=[colour]), static=True)
        _series(rec, f"rewards/return/{name}", frames, time_us, episode.scalars(column))

    _log_events(rec, episode, versions)
    if with_blueprint:
        rec.send_blueprint(blueprint(episode))


def _log_events(rec: rr.RecordingStream, episode: Episode, versions: list[tuple[int, str]]) -> None:
    step_time = dict(zip(episode.step_index.tolist(), episode.time_us.tolist(), strict=True))
    last_time = int(episode.time_us[-1])
    events: list[tuple[int, int, str, str]] = []  # frame, time_us, text, level
    events += [(frame, step_time[frame], f"policy version {version}", "INFO") for frame, version in versions]
    for span in episode.takeovers():
        events.append((span.start_step, span.start_time_us, f"takeover by {span.operator_id}: {span.reason}", "WARN"))
        if span.end_reason is not None:
            events.append((span.end_step, span.end_time_us or last_time, f"handed back: {span.end_reason}", "INFO"))
    if not episode.takeovers():  # offline episodes: the controller column is all there is
        human = episode.human
        for i in np.flatnonzero(np.diff(np.concatenate([[False], human])) != 0):
            frame = int(episode.step_index[i])
            events.append((frame, step_time[frame], "human drives" if human[i] else "policy drives", "INFO"))
    source = episode.summary.get("closed_by") if episode.summary else None
    events.append((int(episode.step_index[-1]), last_time,
                   f"episode ended: {episode.outcome}" + (f" (closed by {source})" if source else ""),
                   "INFO" if episode.outcome == "SUCCESS" else "WARN"))
    # one row per (frame, time): a dataframe query keeps one row per index value, so events at the same moment
    # are joined into one line
    merged: dict[tuple[int, int], tuple[list[str], str]] = {}
    for frame, when, text, level in sorted(events, key=lambda e: (e[0], e[1])):
        texts, was = merged.setdefault((frame, when), ([], level))
        texts.append(text)
        merged[(frame, when)] = (texts, "WARN" if "WARN" in (was, level) else level)
    keys = list(merged)
    rec.send_columns("events", indexes=_times(np.array([k[0] for k in keys]), np.array([k[1] for k in keys])),
                     columns=rr.TextLog.columns(text=[" · ".join(merged[k][0]) for k in keys],
                                                level=[merged[k][1] for k in keys]))


def recording(episode: Episode) -> rr.RecordingStream:
    return rr.RecordingStream(APPLICATION_ID, recording_id=episode.episode_id)


def write_rrd(episodes: Sequence[Episode], path: str | Path, *,
              progress: Callable[[Episode], None] | None = None) -> Path:
    """Save ``episodes`` to one .rrd file: one recording per episode (merged with rerun's own ``rrd merge``
    when there are several). Returns the path written."""
    if not episodes:
        raise ValueError("no episodes to write")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sop-rrd-") as tmp:
        parts = []
        for n, episode in enumerate(episodes):
            part = Path(tmp) / f"{n:05d}.rrd"
            rec = recording(episode)
            rec.save(part)
            log_episode(rec, episode)
            rec.flush()
            rec.disconnect()
            parts.append(part)
            if progress is not None:
                progress(episode)
        if len(parts) == 1:
            shutil.move(parts[0], out)
        else:
            merge = subprocess.run([sys.executable, "-m", "rerun", "rrd", "merge", *map(str, parts), "-o", str(out)],
                                   capture_output=True, text=True)
            if merge.returncode != 0:
                raise RuntimeError(f"rerun rrd merge failed:\n{merge.stderr[-2000:]}")
    return out


class ViewerUnavailableError(RuntimeError):
    """No Rerun viewer can be started or reached: the message says why and what to do instead."""


def viewer_executable() -> str | None:
    """The Rerun viewer that ships with rerun-sdk: next to this Python (a virtual environment that is not
    activated is not on PATH), else the first ``rerun`` on PATH."""
    beside = Path(sys.executable).parent / "rerun"
    return str(beside) if beside.is_file() else shutil.which("rerun")


def spawn_problem(env: Mapping[str, str] | None = None, platform: str = sys.platform) -> str | None:
    """Why a native viewer cannot be spawned here (None when it can be tried): no viewer executable, or, on
    Linux, no display (the viewer would die at once, and the SDK would drop the data after ~10 s)."""
    env = os.environ if env is None else env
    if viewer_executable() is None:
        return "the Rerun viewer executable (installed with rerun-sdk) is not next to this Python nor on PATH"
    if platform.startswith("linux") and not any(env.get(k) for k in ("DISPLAY", "WAYLAND_DISPLAY", "WAYLAND_SOCKET")):
        return "there is no display (neither DISPLAY nor WAYLAND_DISPLAY is set), so a viewer window cannot open"
    return None


def stream_to_viewer(episodes: Sequence[Episode], *, spawn: bool = False, url: str | None = None,
                     progress: Callable[[Episode], None] | None = None, flush_timeout_s: float = 10.0) -> None:
    """Send ``episodes`` to a Rerun viewer: a new one (``spawn``) or the viewer or gRPC server listening at ``url``
    (``rerun+http://host:9876/proxy``; the default when neither is given). :class:`ViewerUnavailableError` when
    no viewer can be spawned here or nothing answers at ``url`` within ``flush_timeout_s``."""
    if spawn:
        problem = spawn_problem()
        if problem:
            raise ViewerUnavailableError(problem)
    for n, episode in enumerate(episodes):
        rec = recording(episode)
        if spawn and n == 0:
            rr.spawn(executable_path=viewer_executable(), recording=rec)
        else:
            rec.connect_grpc(url) if url else rec.connect_grpc()
        log_episode(rec, episode)
        try:
            rec.flush(timeout_sec=flush_timeout_s)
        except RuntimeError as exc:  # the SDK's way of saying that nothing accepted the connection
            raise ViewerUnavailableError(f"the recording could not be delivered to "
                                         f"{url or 'the default viewer address'}: {exc}") from None
        finally:
            rec.disconnect()
        if progress is not None:
            progress(episode)
