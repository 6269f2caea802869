"""Example queries over the lakehouse (shown in the README, runnable with ``sop sql``); name -> SQL."""

from __future__ import annotations

EXAMPLES: dict[str, str] = {
    "success_rate_last_hour": """
SELECT task, policy_version,
       count(*) AS episodes,
       avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) AS success_rate
FROM episodes
WHERE end_time >= now() - INTERVAL 1 HOUR
GROUP BY task, policy_version
ORDER BY task, policy_version
""".strip(),
    "success_rate_by_task_and_policy": """
SELECT task, policy_version,
       count(*) AS episodes,
       avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) AS success_rate
FROM episodes
GROUP BY task, policy_version
ORDER BY task, policy_version
""".strip(),
    "intervention_rate_by_actor": """
SELECT actor_id,
       count(*) AS episodes,
       avg(CASE WHEN num_interventions > 0 THEN 1.0 ELSE 0.0 END) AS share_of_episodes_with_takeover,
       sum(num_interventions) / count(*) AS takeovers_per_episode,
       sum(human_steps) / sum(num_steps) AS human_step_share
FROM episodes
GROUP BY actor_id
ORDER BY actor_id
""".strip(),
    "episode_length_distribution": """
SELECT task,
       count(*) AS episodes,
       min(num_steps) AS min_steps,
       quantile_cont(num_steps, 0.5) AS median_steps,
       quantile_cont(num_steps, 0.9) AS p90_steps,
       max(num_steps) AS max_steps,
       histogram(num_steps // 25 * 25) AS steps_histogram_25
FROM episodes
GROUP BY task
ORDER BY task
""".strip(),
    "takeovers": """
SELECT episode_id, actor_id, task, operator_id, reason,
       step_index AS start_step, end_step, end_step - step_index AS human_steps, end_reason
FROM (
    SELECT *,
           lead(step_index) OVER w AS end_step,
           lead(kind) OVER w AS next_kind,
           lead(reason) OVER w AS end_reason
    FROM interventions
    WINDOW w AS (PARTITION BY episode_id ORDER BY step_index, event_time_us)
)
WHERE kind = 'STARTED' AND next_kind = 'ENDED'
ORDER BY episode_id, start_step
""".strip(),
    "success_rate_per_hour": """
SELECT task, date_trunc('hour', end_time) AS hour,
       count(*) AS episodes,
       avg(CASE WHEN outcome = 'SUCCESS' THEN 1.0 ELSE 0.0 END) AS success_rate
FROM episodes
GROUP BY ALL
ORDER BY hour, task
""".strip(),
    "positive_advantage_share": """
SELECT task, advantage_source,
       count(*) AS steps,
       avg(CASE WHEN controller = 'HUMAN' THEN 1.0 ELSE 0.0 END) AS human_share,
       avg(CASE WHEN advantage > 0 THEN 1.0 ELSE 0.0 END) AS positive_share
FROM steps
WHERE advantage IS NOT NULL
GROUP BY ALL
ORDER BY task
""".strip(),
    "ingest_lag": """
SELECT date_trunc('minute', ingest_time) AS minute,
       count(*) AS steps,
       avg(epoch_ms(ingest_time) - epoch_ms(event_time)) / 1000.0 AS mean_lag_s
FROM steps
GROUP BY ALL
ORDER BY minute
""".strip(),
}
