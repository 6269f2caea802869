"""The reward maths of RECAP, in one home both the stream processor and the learner import
(neither imports the other): rewards, returns, n-step advantages and indicators (``rewards.recap``,
numpy only), and their settings (``rewards.config.RecapConfig``). No I/O, no torch, no stage code.
"""
