"""Stored episodes seen with other tools: Rerun recordings and MCAP files (Foxglove).

Reads the lakehouse's tables (``steps`` or ``demonstrations``, with ``episodes`` and ``interventions``) into
one :class:`~views.episodes.Episode` per episode and writes it out in a viewer's own format::

    from views import load_episodes, write_rrd, write_mcap

    episodes = load_episodes(lake, ["actor-01-3f2a1b9c-000004"])      # or where="task = 'drawer-open-v3'"
    write_rrd(episodes, "episode.rrd")                                 # rerun episode.rrd
    write_mcap(episodes[0], "episode.mcap")                            # open in Foxglove

It imports only ``lakehouse`` (to read) from this repository; ``sop view`` and ``sop export mcap`` call it.
"""

from views.episodes import Episode, EpisodeNotFoundError, Takeover, load_episodes

__all__ = ["Episode", "EpisodeNotFoundError", "Takeover", "load_episodes", "log_episode", "write_mcap", "write_rrd"]


def __getattr__(name: str) -> object:
    # rerun and mcap load only for the command that needs them
    if name in ("log_episode", "write_rrd"):
        from views import rerun_log

        return getattr(rerun_log, name)
    if name == "write_mcap":
        from views.mcap_export import write_mcap

        return write_mcap
    raise AttributeError(name)
